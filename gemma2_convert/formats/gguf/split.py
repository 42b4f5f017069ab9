"""Split GGUF: one model as several GGUF files, in the layout of llama.cpp's ``gguf-split`` (the Hub takes
files of at most 50 GB; a 27B in F16 is 54 GB).

Layout (llama.cpp ``tools/gguf-split/gguf-split.cpp``, ``src/llama.cpp`` ``llama_split_path``,
``src/llama-model-loader.cpp``; gguf-py ``GGUFWriter`` writes the same): the parts are named
``NAME-00001-of-0000N.gguf`` … ``NAME-0000N-of-0000N.gguf``; each is a complete GGUF v3 file holding whole
tensors. The first holds every metadata key of the model, then ``split.no`` (u16, 0-based),
``split.count`` (u16, N) and ``split.tensors.count`` (i32: the tensors of the whole model, in every part,
not of that part); the later parts hold only those three keys and their tensors. llama.cpp opens the set
from its first part, finds the others by name, checks each one's ``split.no`` and that the parts hold
``split.tensors.count`` tensors in all.

Ours add one key to every part, ``gemma2_convert.split_set`` (llama.cpp ignores it): a digest of the source
fingerprint and every part's header, written last, so a part of another set — the same model converted
again from other weights, or to another type — is found, not mixed in; and a part whose write never
finished still holds the placeholder. Sets made by gguf-split have no such key and get the structural checks.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from gemma2_convert.core.errors import ConfigError, FormatError
from gemma2_convert.core.units import human_bytes
from gemma2_convert.formats.gguf.file import GGUFFile, TensorInfo
from gemma2_convert.formats.gguf.metadata import PREFIX
from gemma2_convert.formats.gguf.values import (
    ALIGNMENT,
    Value,
    ValueType,
    string,
    string_bytes,
    value_bytes,
)
from gemma2_convert.formats.gguf.writer import TensorPlan, header_bytes, patch_string

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
K_SPLIT_SET = PREFIX + "split_set"
"""XXH3-128 (hex) of the source fingerprint and every part's header: the same in every part of one set."""
SET_PLACEHOLDER = "pending-" + "0" * 24
"""As long as the digest that replaces it once every part is written."""
MAX_PARTS = 65535
"""``split.count`` is a u16."""


# ---- names -----------------------------------------------------------------------------------

def split_prefix(path: Path) -> str:
    """``model.gguf`` → ``model``: what the part names start with (gguf-split's output prefix)."""
    return path.name.removesuffix(".gguf")


def part_name(prefix: str, no: int, count: int) -> str:
    """The name of part ``no`` (0-based, as ``split.no``) of ``count``: ``model-00002-of-00003.gguf``."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def part_pattern(path: Path) -> re.Pattern[str]:
    """The names of any split set written for ``path`` (whatever its part count)."""
    return re.compile(re.escape(split_prefix(path)) + r"-\d{5}-of-\d{5}\.gguf")


def first_part_name(name: str, no: int, count: int) -> str | None:
    """The first part's name, given part ``no`` of ``count`` named ``name``; None when the name does not
    follow the pattern (then the other parts cannot be found, by llama.cpp either)."""
    tail = f"-{no + 1:05d}-of-{count:05d}.gguf"
    if not name.endswith(tail) or len(name) == len(tail):
        return None
    return part_name(name[: -len(tail)], 0, count)


# ---- writing ---------------------------------------------------------------------------------

def split_keys(no: int, count: int, tensors: int) -> list[tuple[str, Value]]:
    """The keys every part holds, in gguf-split's order and types, then our set key."""
    return [(SPLIT_NO, Value(ValueType.UINT16, no)), (SPLIT_COUNT, Value(ValueType.UINT16, count)),
            (SPLIT_TENSORS, Value(ValueType.INT32, tensors)), (K_SPLIT_SET, string(SET_PLACEHOLDER))]


def _padded(n: int) -> int:
    return n + (-n % ALIGNMENT)


def _info_bytes(t: TensorPlan) -> int:
    """One tensor info in the header: name, n_dims, dims, type, offset (``writer.header_bytes``)."""
    return len(string_bytes(t.name)) + 4 + 8 * len(t.dims) + 4 + 8


def _kv_bytes(metadata: Sequence[tuple[str, Value]]) -> int:
    return sum(len(string_bytes(k)) + len(value_bytes(v)) for k, v in metadata)


@dataclass(frozen=True)
class Part:
    """One part to write: its metadata, tensors and header (written first, as in ``write_gguf``)."""

    metadata: list[tuple[str, Value]]
    tensors: list[TensorPlan]
    header: bytes

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(_padded(t.nbytes) for t in self.tensors)


def _limit_error(what: str, nbytes: int, max_bytes: int) -> ConfigError:
    return ConfigError(f"{what} takes {human_bytes(nbytes)} in a part of its own, more than --split-max-size "
                       f"{human_bytes(max_bytes)}; a part holds whole tensors, so choose a larger size")


def group_tensors(tensors: Sequence[TensorPlan], first_kv: int, later_kv: int, max_bytes: int | None,
                  max_tensors: int | None) -> list[list[TensorPlan]]:
    """Tensors in order, into as few parts as the limits allow: each part (header included) at most
    ``max_bytes``, at most ``max_tensors`` tensors. ``first_kv``/``later_kv``: metadata bytes of the first
    and of a later part. A tensor too large for a part of its own is a ConfigError naming it."""
    groups: list[list[TensorPlan]] = [[]]
    head, data = 24 + first_kv, 0  # magic, version, counts; the metadata; tensor infos as they are added
    for t in tensors:
        cur = groups[-1]
        size = _padded(head + _info_bytes(t)) + data + _padded(t.nbytes)
        full = (max_tensors is not None and len(cur) >= max_tensors) or (max_bytes is not None and size > max_bytes)
        if cur and full:
            groups.append([])
            cur, head, data = groups[-1], 24 + later_kv, 0
            size = _padded(head + _info_bytes(t)) + _padded(t.nbytes)
        if max_bytes is not None and size > max_bytes:
            raise _limit_error(f"tensor {t.name!r}" + (" with the model's metadata" if len(groups) == 1 else ""),
                               size, max_bytes)
        cur.append(t)
        head, data = head + _info_bytes(t), data + _padded(t.nbytes)
    if len(groups) > MAX_PARTS:
        raise ConfigError(f"the limits give {len(groups)} parts, more than a split GGUF can count ({MAX_PARTS}); "
                          "raise --split-max-size or --split-max-tensors")
    return groups


def plan_parts(metadata: Sequence[tuple[str, Value]], tensors: Sequence[TensorPlan], max_bytes: int | None,
               max_tensors: int | None) -> list[Part]:
    """The parts of a split GGUF of ``metadata`` and ``tensors`` under the limits (either may be None)."""
    keys = split_keys(0, 1, len(tensors))
    groups = group_tensors(tensors, _kv_bytes(metadata) + _kv_bytes(keys), _kv_bytes(keys), max_bytes, max_tensors)
    n = len(groups)
    metas = [list(metadata) + split_keys(0, n, len(tensors))] + [split_keys(i, n, len(tensors)) for i in range(1, n)]
    return [Part(m, g, header_bytes(m, g)) for m, g in zip(metas, groups)]


def set_digest(fingerprint: str, parts: Sequence[Part]) -> str:
    """The ``split_set`` value: the source fingerprint and every part's header (as planned)."""
    h = xxhash.xxh3_128(fingerprint.encode())
    for p in parts:
        h.update(struct.pack("<Q", len(p.header)))
        h.update(p.header)
    return h.hexdigest()


def seal_parts(paths: Sequence[Path], parts: Sequence[Part], fingerprint: str) -> None:
    """Once every part is written: fill in the set digest in each (the placeholder marks a part unfinished)."""
    digest = set_digest(fingerprint, parts)
    for path, part in zip(paths, parts, strict=True):
        patch_string(path, K_SPLIT_SET, SET_PLACEHOLDER, digest, within=len(part.header))


# ---- reading ---------------------------------------------------------------------------------

@dataclass
class PartFile:
    """A part of a set as found on disk: its file (None when missing or unreadable) and what is wrong with it."""

    path: Path
    file: GGUFFile | None
    problem: str = ""

    @property
    def nbytes(self) -> int:
        return self.file.size if self.file is not None else 0


class GGUFSet:
    """A GGUF model given by its (first) file — a plain GGUF, or every part of a split set — read as one, with
    ``GGUFFile``'s view: ``path`` (the first file), ``version``, ``kv`` and ``kv_types`` (the first file's,
    where all the model's metadata is), ``tensors`` (of every part) and ``raw``."""

    def __init__(self, files: Sequence[GGUFFile]) -> None:
        first = files[0]
        self.files = list(files)
        self.path, self.version, self.kv, self.kv_types = first.path, first.version, first.kv, first.kv_types
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, GGUFFile] = {}
        for f in files:
            for name, info in f.tensors.items():
                self.tensors[name], self._owner[name] = info, f

    @property
    def split(self) -> bool:
        return SPLIT_COUNT in self.kv

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, from the part that holds it (``GGUFFile.raw``)."""
        return self._owner[name].raw(name)


def _int_key(f: GGUFFile, key: str) -> int | None:
    v = f.kv.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _later_part(path: Path, no: int, first: GGUFFile) -> PartFile:
    """Part ``no`` of the set ``first`` opens, checked against it."""
    count = first.kv[SPLIT_COUNT]
    if not path.exists():
        return PartFile(path, None, f"part {no + 1} of {count} of this split GGUF is missing: {path}; every part "
                                    "must lie beside the first, under the name it was written with")
    try:
        f = GGUFFile(path)
    except FormatError as e:
        return PartFile(path, None, f"part {no + 1} of {count} is unreadable: {e}")
    foreign = f"{path} is not part {no + 1} of this split GGUF (a part of another set?)"
    for key, want in ((SPLIT_NO, no), (SPLIT_COUNT, count), (SPLIT_TENSORS, first.kv.get(SPLIT_TENSORS))):
        if _int_key(f, key) != want:
            return PartFile(path, f, f"{foreign}: its {key} is {f.kv.get(key)!r}, expected {want}")
    ours, theirs = first.kv.get(K_SPLIT_SET), f.kv.get(K_SPLIT_SET)
    if ours is not None and theirs == SET_PLACEHOLDER:
        return PartFile(path, f, f"{path}: its write never finished ({K_SPLIT_SET} is still the placeholder); "
                                 "convert the model again")
    if ours is not None and theirs != ours:
        return PartFile(path, f, f"{foreign}: its {K_SPLIT_SET} is {theirs!r}, the first part's {ours!r}")
    return PartFile(path, f)


def _check_tensors(parts: list[PartFile], total: int | None) -> None:
    """Every tensor in one part only, and as many in all as ``split.tensors.count`` says."""
    seen: dict[str, Path] = {}
    for p in parts:
        if p.file is None or p.problem:
            continue
        dup = next((n for n in p.file.tensors if n in seen), None)
        if dup is not None:
            p.problem = f"{p.path} is not part of this split GGUF (a part of another set?): tensor {dup!r} is " \
                        f"also in {seen[dup].name}"
            continue
        seen.update(dict.fromkeys(p.file.tensors, p.path))
    if not any(p.problem for p in parts) and len(seen) != total:
        parts[0].problem = f"the {len(parts)} parts hold {len(seen)} tensors, but {SPLIT_TENSORS} is {total}"


def read_parts(path: Path) -> list[PartFile]:
    """The file at ``path`` and, when it is the first part of a split set, every other part, each with what is
    wrong with it ('' when fine). Only a first file that is no valid GGUF raises (its FormatError)."""
    first = GGUFFile(path)
    if SPLIT_COUNT not in first.kv:
        return [PartFile(path, first)]
    no, count, total = (_int_key(first, k) for k in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS))
    if no is None or count is None or total is None or not 0 <= no < count:
        keys = ", ".join(f"{k} {first.kv.get(k)!r}" for k in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS))
        return [PartFile(path, first, f"bad split keys: {keys}")]
    if no != 0:
        name = first_part_name(path.name, no, count)
        return [PartFile(path, first, f"this is part {no + 1} of {count} of a split GGUF; open its first part"
                                      + (f", {path.with_name(name)}" if name else ""))]
    name = first_part_name(path.name, 0, count) if count > 1 else path.name
    if name != path.name:
        return [PartFile(path, first, f"the first of {count} parts of a split GGUF, but not named "
                                      f"NAME-00001-of-{count:05d}.gguf, so the others cannot be found (llama.cpp "
                                      "cannot either); give the parts the names gguf-split gives them")]
    prefix = path.name[: -len(f"-00001-of-{count:05d}.gguf")]
    parts = [PartFile(path, first)] + [_later_part(path.with_name(part_name(prefix, i, count)), i, first)
                                       for i in range(1, count)]
    _check_tensors(parts, total)
    return parts


def open_set(path: str | Path) -> GGUFSet:
    """The GGUF at ``path`` — a plain file, or the first part of a split set — with every part checked; one
    FormatError names every missing, unreadable or foreign part."""
    parts = read_parts(Path(path))
    problems = [p.problem for p in parts if p.problem]
    if problems:
        raise FormatError("; ".join(problems), path)
    return GGUFSet([p.file for p in parts if p.file is not None])


__all__ = ["K_SPLIT_SET", "SPLIT_COUNT", "SPLIT_NO", "SPLIT_TENSORS", "GGUFSet", "Part", "PartFile", "open_set",
           "part_name", "part_pattern", "plan_parts", "read_parts", "seal_parts", "split_prefix"]
