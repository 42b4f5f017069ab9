"""Orbax PyTree checkpoints of Flax Gemma 2 (google-deepmind/gemma, Kaggle ``flax`` archives), read
with tensorstore alone — jax is never imported (spec §2.2, §2.3).

A checkpoint directory holds ``_METADATA`` (JSON: the tree, one entry per leaf) and the arrays, one
zarr array per leaf named by its key path joined with ``.``. The arrays live either in an OCDBT
key-value store (``manifest.ocdbt`` + ``d/``; newer Orbax also leaves ``ocdbt.process_<n>/`` stores,
which the root manifest references) or, in older Orbax, in one directory per array (``<name>/.zarray``
+ chunks; ``zarr.json`` when ``use_zarr3``). A Kaggle archive is a directory holding ``tokenizer.model``
and the checkpoint directory (``gemma2-2b/``); either may be given.

Arrays are opened up front (metadata only, each zarr header checked against ``_METADATA`` and against
its chunks: zarr_check.py) and read on ``load()``, one at a time; bfloat16 arrives as
``ml_dtypes.bfloat16`` and is reinterpreted bit for bit as ``torch.bfloat16``.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma2_convert.core.errors import (
    FormatError,
    UnsupportedError,
    check_names,
    name_list,
)
from gemma2_convert.core.lazy import LazyTensor, Shape, dtype_nbytes
from gemma2_convert.formats import flax_map as fm
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.registry import Checkpoint, register_reader
from gemma2_convert.formats.stored import Stored, TensorRow
from gemma2_convert.formats.tokenizer.spm import find_tokenizer, read_spm
from gemma2_convert.formats.zarr_check import check_chunks

METADATA = "_METADATA"
MANIFEST = "manifest.ocdbt"
ARRAY_TYPES = ("jax.Array", "np.ndarray")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INSTALL = "reading Orbax checkpoints needs tensorstore: pip install 'gemma2-convert[flax]'"


# ---- finding the checkpoint ------------------------------------------------------------------

def _is_checkpoint_dir(d: Path) -> bool:
    return d.is_dir() and ((d / METADATA).is_file() or (d / MANIFEST).is_file()
                           or any(p.is_dir() for p in d.glob("ocdbt.process_*")))


def _children(d: Path) -> list[Path]:
    return sorted(c for c in d.iterdir() if _is_checkpoint_dir(c))


def checkpoint_dir(path: Path) -> Path:
    """The Orbax checkpoint directory: ``path`` itself, or the one inside a Kaggle archive directory."""
    if _is_checkpoint_dir(path):
        return path
    found = _children(path) if path.is_dir() else []
    if len(found) != 1:
        what = f"{len(found)} ({', '.join(c.name for c in found)})" if found else "none"
        raise FormatError(f"expected one Orbax checkpoint directory (with {METADATA}) here, found {what}; "
                          "pass the checkpoint directory itself", path)
    return found[0]


def _detect(p: Path) -> bool:
    return _is_checkpoint_dir(p) or (p.is_dir() and (p / "tokenizer.model").is_file() and len(_children(p)) == 1)


# ---- _METADATA -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeMetadata:
    arrays: dict[str, str]
    """Canonical Flax array name → stored name (the key path joined with '.')."""
    others: dict[str, str]
    """Leaves that are not arrays (canonical name → value type): unexpected in a Gemma checkpoint."""
    write_shapes: dict[str, Shape]
    """Canonical name → the shape each process wrote (newer Orbax): at most the array's shape."""
    use_ocdbt: bool | None
    use_zarr3: bool


def _key_path(key: str, entry: Any, where: Path) -> tuple[str, ...]:
    """The entry's key path from ``key_metadata``, else from the ``"('a', 'b')"`` key itself."""
    km = entry.get("key_metadata") if isinstance(entry, dict) else None
    if isinstance(km, list) and km and all(isinstance(k, dict) and isinstance(k.get("key"), str) for k in km):
        return tuple(k["key"] for k in km)
    try:
        keys = ast.literal_eval(key)
    except (ValueError, SyntaxError):
        keys = None
    if isinstance(keys, tuple) and keys and all(isinstance(k, (str, int)) for k in keys):
        return tuple(str(k) for k in keys)
    raise FormatError(f"tree_metadata entry {key!r} has no readable key path", where)


def read_tree_metadata(d: Path) -> TreeMetadata:
    """Parse and validate ``_METADATA``; FormatError names the file and what is wrong."""
    f = d / METADATA
    if not f.is_file():
        raise FormatError("missing: an Orbax checkpoint describes its tree in this file, so the checkpoint is "
                          "incomplete (interrupted download or save?)", f)
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"not valid JSON ({type(e).__name__}: {e}); the file is damaged", f) from None
    tree = obj.get("tree_metadata") if isinstance(obj, dict) else None
    if not isinstance(tree, dict) or not tree:
        raise FormatError("has no 'tree_metadata' object: not an Orbax PyTree checkpoint's metadata", f)
    arrays: dict[str, str] = {}
    others: dict[str, str] = {}
    write_shapes: dict[str, Shape] = {}
    for key, entry in tree.items():
        keys = _key_path(key, entry, f)
        value = entry.get("value_metadata", {}) if isinstance(entry, dict) else {}
        if not isinstance(value, dict):
            raise FormatError(f"tree_metadata entry {key!r}: value_metadata is not an object", f)
        if value.get("skip_deserialize"):
            continue
        name, vtype = fm.array_name(keys), value.get("value_type", "jax.Array")
        if name in arrays or name in others:
            raise FormatError(f"two leaves map to the array {name}", f)
        if vtype in ARRAY_TYPES:
            arrays[name] = ".".join(keys)
            ws = value.get("write_shape")
            if isinstance(ws, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in ws):
                write_shapes[name] = tuple(ws)
        else:
            others[name] = str(vtype)
    use_ocdbt = obj.get("use_ocdbt")
    return TreeMetadata(arrays, others, write_shapes, use_ocdbt if isinstance(use_ocdbt, bool) else None,
                        bool(obj.get("use_zarr3", False)))


# ---- the arrays ------------------------------------------------------------------------------

def tensorstore_module(where: Path | None = None) -> Any:
    """The tensorstore module (imported on first use: it is an optional extra); UnsupportedError says how to get it."""
    try:
        import tensorstore
    except ImportError:
        raise UnsupportedError(INSTALL, where) from None
    return tensorstore


def _ts_error(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def _ocdbt_bases(d: Path) -> list[Path]:
    """OCDBT stores, root first: the root manifest references the per-process stores it merged, which
    are read directly only for arrays the root does not list (a save that was never merged)."""
    procs = sorted(p for p in d.glob("ocdbt.process_*") if p.is_dir())
    return ([d] if (d / MANIFEST).is_file() else []) + procs


Located = tuple[dict, frozenset[str]]
"""An array's kvstore spec and the keys stored under it (its chunks, and its header)."""


def _split(key: str, arrays: Mapping[str, Any]) -> tuple[str, str] | None:
    """(stored array name, key under it) of a store key, e.g. ``a/b.w/0.0`` → (``a/b.w``, ``0.0``)."""
    parts = key.split("/")
    for i in range(len(parts) - 1, 0, -1):
        if (head := "/".join(parts[:i])) in arrays:
            return head, "/".join(parts[i:])
    return None


def _ocdbt_arrays(d: Path, meta: TreeMetadata, ts: Any, ctx: Any) -> dict[str, Located]:
    """Stored name → (kvstore spec, keys) for every zarr array found in the OCDBT store(s)."""
    bases = _ocdbt_bases(d)
    if not bases:
        raise FormatError(f"{METADATA} says the arrays are in an OCDBT store, but there is no {MANIFEST} or "
                          "ocdbt.process_*/ directory; the checkpoint is incomplete", d)
    marker = "/zarr.json" if meta.use_zarr3 else "/.zarray"
    found: dict[str, dict] = {}
    keys: dict[str, set[str]] = {}
    for base in bases:
        if all(s in found for s in meta.arrays.values()):
            break
        spec = {"driver": "ocdbt", "base": base.resolve().as_uri() + "/"}
        try:
            listed = [k.decode("utf-8", "replace") for k in ts.KvStore.open(spec, context=ctx).result().list().result()]
        except Exception as e:  # tensorstore raises ValueError/RuntimeError for unreadable stores
            raise FormatError(f"corrupt OCDBT store ({_ts_error(e)})", base / MANIFEST) from None
        here = {k[: -len(marker)] for k in listed if k.endswith(marker)} - set(found)
        found.update({s: {**spec, "path": s + "/"} for s in here})
        for k in listed:
            if (hit := _split(k, here)) is not None:
                keys.setdefault(hit[0], set()).add(hit[1])
    return {s: (kv, frozenset(keys.get(s, ()))) for s, kv in found.items()}


def _dir_arrays(d: Path, meta: TreeMetadata) -> dict[str, Located]:
    """Stored name → (kvstore spec, keys) for the one-directory-per-array layout."""
    marker = "zarr.json" if meta.use_zarr3 else ".zarray"
    return {s: ({"driver": "file", "path": str((d / s).resolve()) + "/"},
                frozenset(f.relative_to(d / s).as_posix() for f in (d / s).rglob("*") if f.is_file()))
            for s in meta.arrays.values() if (d / s / marker).is_file()}


def _store_name(d: Path, ocdbt: bool) -> Path:
    return d / MANIFEST if ocdbt and (d / MANIFEST).is_file() else d


@dataclass(frozen=True)
class OrbaxArray:
    """One stored zarr array, opened (metadata read) but not read."""

    name: str
    shape: Shape
    dtype: torch.dtype
    store: Any
    """The opened tensorstore.TensorStore."""
    where: Path

    def lazy(self, index: int | slice | None = None) -> LazyTensor:
        if index is None:
            shape = self.shape
        elif isinstance(index, int):
            shape = self.shape[1:]
        else:
            shape = (len(range(*index.indices(self.shape[0]))), *self.shape[1:])
        return LazyTensor(shape, self.dtype, lambda: self.read(index))

    def read(self, index: int | slice | None = None) -> torch.Tensor:
        view = self.store if index is None else self.store[index]
        try:
            arr = np.ascontiguousarray(view.read().result())
        except Exception as e:  # tensorstore raises ValueError for missing or undecodable chunks
            raise FormatError(f"cannot read array {self.name} ({_ts_error(e)}); the data is damaged or "
                              "incomplete", self.where) from None
        if self.dtype == torch.bfloat16:  # ml_dtypes.bfloat16 → same bits, no float32 round trip
            return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def _check_header(name: str, shape: Shape, meta: TreeMetadata, where: Path) -> None:
    """The zarr header's shape must hold what ``_METADATA`` says was written (equal, unless sharded)."""
    ws = meta.write_shapes.get(name)
    if ws is not None and (len(ws) != len(shape) or any(w > s for w, s in zip(ws, shape))):
        raise FormatError(f"array {name}: its zarr header says shape {list(shape)}, but {METADATA} says "
                          f"{list(ws)} was written; the header and the tree disagree (the checkpoint is damaged)",
                          where)


def open_arrays(d: Path, meta: TreeMetadata) -> dict[str, OrbaxArray]:
    """Open every array ``_METADATA`` lists and check its header (zarr_check.py); one FormatError lists
    all that are missing, or names the first array whose header lies."""
    ts = tensorstore_module(d)
    ctx = ts.Context()
    ocdbt = meta.use_ocdbt if meta.use_ocdbt is not None else bool(_ocdbt_bases(d))
    stored = _ocdbt_arrays(d, meta, ts, ctx) if ocdbt else _dir_arrays(d, meta)
    where = _store_name(d, ocdbt)
    missing = [n for n, s in meta.arrays.items() if s not in stored]
    if missing:
        raise FormatError(f"{len(missing)} array(s) listed in {METADATA} are missing from the checkpoint data: "
                          f"{name_list(missing)}; the checkpoint is incomplete", where)
    driver = "zarr3" if meta.use_zarr3 else "zarr"
    futures = {n: ts.open({"driver": driver, "kvstore": stored[s][0]}, read=True, context=ctx)
               for n, s in meta.arrays.items()}
    stores = {}
    for name, fut in futures.items():
        try:
            stores[name] = fut.result()
        except Exception as e:  # tensorstore raises ValueError for unreadable zarr metadata
            raise FormatError(f"cannot open array {name} ({_ts_error(e)})", where) from None
        _check_header(name, tuple(int(x) for x in stores[name].shape), meta, where)
    if not meta.use_zarr3:  # zarr3 (sharding codec) chunks are not checked
        check_chunks({n: (st, stored[meta.arrays[n]][1]) for n, st in stores.items()}, where)
    out = {}
    for name, store in stores.items():
        dtype = TORCH_DTYPES.get(store.dtype.name)
        if dtype is None:
            raise UnsupportedError(f"array {name} has dtype {store.dtype.name}; supported: "
                                   f"{', '.join(TORCH_DTYPES)} (quantized Flax checkpoints are not)", where)
        out[name] = OrbaxArray(name, tuple(int(x) for x in store.shape), dtype, store, where)
    return out


# ---- the reader ------------------------------------------------------------------------------

def _tokenizer_pieces(tok: Path | None) -> int | None:
    if tok is None:
        return None

    return len(read_spm(tok).pieces)


def read_arrays(path: Path) -> tuple[Path, dict[str, OrbaxArray], fm.FlaxDims]:
    """The checkpoint directory, its arrays (names and shapes checked) and the dimensions they state."""
    d = checkpoint_dir(path)
    meta = read_tree_metadata(d)
    names = list(meta.arrays) + list(meta.others)
    layers = fm.num_layers(names)
    check_names(fm.flax_names(layers, fm.QKV.format(0) in meta.arrays), names, d / METADATA, what="arrays")
    arrays = open_arrays(d, meta)
    dims = fm.infer_dims({n: a.shape for n, a in arrays.items()}, layers, d)
    return d, arrays, dims


def stored_orbax(path: Path) -> Stored:
    """The arrays as the checkpoint stores them (names, shapes, dtypes; nothing read)."""
    d, arrays, _ = read_arrays(path)
    rows = [TensorRow(n, a.shape, str(a.dtype).removeprefix("torch."), math.prod(a.shape) * dtype_nbytes(a.dtype))
            for n, a in arrays.items()]
    meta = {"checkpoint_dir": "." if d == path else str(d.relative_to(path))}
    return Stored(rows, {n: a.lazy() for n, a in arrays.items()}, meta)


@register_reader("orbax", "an Orbax (Flax/JAX) checkpoint directory with _METADATA, or a Kaggle Flax archive "
                 "directory holding tokenizer.model and one", _detect, stored=stored_orbax, original=True)
def open_orbax(path: Path, options: ShapeOptions | None = None, tokenizer: str | Path | None = None,
               **_: object) -> Checkpoint:
    d, arrays, dims = read_arrays(Path(path))
    opts = options or ShapeOptions()
    given = opts.loaded_config()
    tok = Path(tokenizer) if tokenizer else find_tokenizer(d)
    pieces = None if given else _tokenizer_pieces(tok)  # a given config states the vocabulary
    vocab, vocab_from = fm.resolve_vocab(dims.rows, given.vocab_size if given else None, pieces, tok, d)
    cfg, how = fm.infer_flax_config(dims, vocab, opts, d)
    dtype = arrays[fm.EMBED].dtype
    if given is None:
        cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
    meta = {"source_format": "orbax", "config_from": how, "vocab_from": vocab_from,
            "embedding_rows": str(dims.rows), "checkpoint_dir": str(d),
            "gating_einsum": "[2, I, H]" if dims.gating_transposed else "[2, H, I]",
            "source_dtype": str(dtype).removeprefix("torch.")}
    return Checkpoint("orbax", Path(path), cfg, fm.to_hf(arrays, dims, cfg), tok, meta)
