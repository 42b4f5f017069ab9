"""Orbax PyTree checkpoints of Flax Gemma 2 (google-deepmind/gemma, Kaggle ``flax`` archives), read
with tensorstore alone — jax is never imported (spec §2.2, §2.3).

A checkpoint directory holds ``_METADATA`` (JSON: the tree, one entry per leaf) and the arrays, one
zarr array per leaf named by its key path joined with ``.``. The arrays live either in an OCDBT
key-value store (``manifest.ocdbt`` + ``d/``; newer Orbax also leaves ``ocdbt.process_<n>/`` stores,
which the root manifest references) or, in older Orbax, in one directory per array (``<name>/.zarray``
+ chunks; ``zarr.json`` when ``use_zarr3``). A Kaggle archive is a directory holding ``tokenizer.model``
and the checkpoint directory (``gemma2-2b/``); either may be given.

Arrays are opened up front (metadata only) and read on ``load()``, one at a time; bfloat16 arrives
as ``ml_dtypes.bfloat16`` and is reinterpreted bit for bit as ``torch.bfloat16``.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma2_convert.errors import FormatError, UnsupportedError, check_names, name_list
from gemma2_convert.formats import flax_map as fm
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.registry import Checkpoint, register_reader
from gemma2_convert.lazy import LazyTensor, Shape

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
        else:
            others[name] = str(vtype)
    use_ocdbt = obj.get("use_ocdbt")
    return TreeMetadata(arrays, others, use_ocdbt if isinstance(use_ocdbt, bool) else None,
                        bool(obj.get("use_zarr3", False)))


# ---- the arrays ------------------------------------------------------------------------------

def _tensorstore():
    try:
        import tensorstore
    except ImportError:
        raise UnsupportedError(INSTALL) from None
    return tensorstore


def _ts_error(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def _ocdbt_bases(d: Path) -> list[Path]:
    """OCDBT stores, root first: the root manifest references the per-process stores it merged, which
    are read directly only for arrays the root does not list (a save that was never merged)."""
    procs = sorted(p for p in d.glob("ocdbt.process_*") if p.is_dir())
    return ([d] if (d / MANIFEST).is_file() else []) + procs


def _ocdbt_arrays(d: Path, meta: TreeMetadata, ts: Any, ctx: Any) -> dict[str, dict]:
    """Stored name → kvstore spec for every zarr array found in the OCDBT store(s)."""
    bases = _ocdbt_bases(d)
    if not bases:
        raise FormatError(f"{METADATA} says the arrays are in an OCDBT store, but there is no {MANIFEST} or "
                          "ocdbt.process_*/ directory; the checkpoint is incomplete", d)
    marker = "/zarr.json" if meta.use_zarr3 else "/.zarray"
    found: dict[str, dict] = {}
    for base in bases:
        if all(s in found for s in meta.arrays.values()):
            break
        spec = {"driver": "ocdbt", "base": base.resolve().as_uri() + "/"}
        try:
            keys = ts.KvStore.open(spec, context=ctx).result().list().result()
        except Exception as e:  # tensorstore raises ValueError/RuntimeError for unreadable stores
            raise FormatError(f"corrupt OCDBT store ({_ts_error(e)})", base / MANIFEST) from None
        for k in keys:
            name = k.decode("utf-8", "replace")
            if name.endswith(marker):
                found.setdefault(name[: -len(marker)], {**spec, "path": name[: -len(marker)] + "/"})
    return found


def _dir_arrays(d: Path, meta: TreeMetadata) -> dict[str, dict]:
    """Stored name → kvstore spec for the one-directory-per-array layout."""
    marker = "zarr.json" if meta.use_zarr3 else ".zarray"
    return {s: {"driver": "file", "path": str((d / s).resolve()) + "/"}
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


def open_arrays(d: Path, meta: TreeMetadata) -> dict[str, OrbaxArray]:
    """Open every array ``_METADATA`` lists; one FormatError lists all that are missing."""
    ts = _tensorstore()
    ctx = ts.Context()
    ocdbt = meta.use_ocdbt if meta.use_ocdbt is not None else bool(_ocdbt_bases(d))
    stored = _ocdbt_arrays(d, meta, ts, ctx) if ocdbt else _dir_arrays(d, meta)
    where = _store_name(d, ocdbt)
    missing = [n for n, s in meta.arrays.items() if s not in stored]
    if missing:
        raise FormatError(f"{len(missing)} array(s) listed in {METADATA} are missing from the checkpoint data: "
                          f"{name_list(missing)}; the checkpoint is incomplete", where)
    driver = "zarr3" if meta.use_zarr3 else "zarr"
    futures = {n: ts.open({"driver": driver, "kvstore": stored[s]}, read=True, context=ctx)
               for n, s in meta.arrays.items()}
    out = {}
    for name, fut in futures.items():
        try:
            store = fut.result()
        except Exception as e:  # tensorstore raises ValueError for unreadable zarr metadata
            raise FormatError(f"cannot open array {name} ({_ts_error(e)})", where) from None
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
    from gemma2_convert.tokenizer import read_spm

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


@register_reader("orbax", "an Orbax (Flax/JAX) checkpoint directory with _METADATA, or a Kaggle Flax archive "
                 "directory holding tokenizer.model and one", _detect)
def open_orbax(path: Path, options: ShapeOptions | None = None, tokenizer: str | Path | None = None,
               **_: object) -> Checkpoint:
    from gemma2_convert.tokenizer import find_tokenizer

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
