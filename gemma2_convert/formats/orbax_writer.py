"""Write a Gemma 2 model as an Orbax PyTree checkpoint, with tensorstore alone — jax is never imported.

The output is what google-deepmind/gemma's ``PyTreeCheckpointer`` saves (spec §2.2), so both our reader
and real Orbax restore it:

    _CHECKPOINT_METADATA   the handler and timestamps
    _METADATA              the tree: one entry per leaf, key path ``('transformer/layer_0/attn/q_einsum', 'w')``
    _sharding              each array on one device (what a restore without arguments needs)
    manifest.ocdbt, d/     one OCDBT store; each leaf a zarr v2 array named by its key path joined with '.'
                           (``transformer/layer_0/attn/q_einsum.w``), zstd level 1, one chunk per array
                           below Orbax's 2 GiB target data file size, bfloat16 as ml_dtypes' ``bfloat16``

The tree is the released semi-flat one with the released kernel layouts (flax_map's inverses); arrays are
written one at a time and the directory is renamed into place once complete. Real Orbax also leaves
``array_metadatas/`` and a per-process store ``ocdbt.process_0/`` that its root manifest merges; restoring
needs neither.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma2_convert.core.dtypes import FLOAT_DTYPES, dominant_dtype
from gemma2_convert.core.errors import TensorMismatchError, check_names
from gemma2_convert.core.lazy import LazyTensor, Shape
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats import flax_map as fm
from gemma2_convert.formats.dense import (
    checked_cast,
    materialize_tokenizer,
    output_dtype,
    tokenizer_bytes,
    tokenizer_file,
    tolerance,
)
from gemma2_convert.formats.gemma_pytorch import check_shapes
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.orbax import METADATA, tensorstore_module
from gemma2_convert.formats.output import atomic_output
from gemma2_convert.formats.registry import (
    Checkpoint,
    WriteJob,
    Writer,
    register_writer,
)
from reference.config import Gemma2Config
from reference.weights import expected_shapes

HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000,
                "compression": {"id": "zstd"}}  # Orbax's (tensorstore_utils._add_ocdbt_write_options)
TARGET_FILE_BYTES = 2**31
"""Orbax's default OCDBT target data file size: larger arrays are cut into chunks below it."""
COMMIT_BYTES = 1 << 30
"""Arrays buffered in one tensorstore transaction (one OCDBT commit) before it is committed."""
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def chunk_shape(shape: Shape, itemsize: int, limit: int = TARGET_FILE_BYTES) -> Shape:
    """The whole array, or (above ``limit`` bytes) the largest divisor of axis 0 whose chunk fits."""
    row = math.prod(shape[1:]) * itemsize
    if not shape or shape[0] * row <= limit:
        return shape
    n = max(k for k in range(1, shape[0] + 1) if shape[0] % k == 0 and k * row <= limit) if row <= limit else 1
    return (n, *shape[1:])


def tree_metadata(shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """``_METADATA`` of the released tree, leaves sorted like jax flattens a dict."""
    tree = {}
    for name in sorted(shapes):
        keys = fm.key_path(name)
        tree[str(keys)] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                           "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                              "write_shape": list(shapes[name])}}
    return {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


def _sharding(names: list[str]) -> dict[str, str]:
    one = json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
    return {base64.b64encode(n.encode()).decode(): one for n in sorted(names)}


def _numpy(t: torch.Tensor, np_dtype: np.dtype) -> np.ndarray:
    """The tensor's bits as numpy (bfloat16 reinterpreted as ml_dtypes.bfloat16, not rounded through float32)."""
    t = t.contiguous()
    return t.view(torch.uint16).numpy().view(np_dtype) if t.dtype == torch.bfloat16 else t.numpy()


def _assemble(shape: Shape, parts: list[fm.Part], dtype: torch.dtype) -> torch.Tensor:
    """One stored array from its parts; embedding rows past the vocabulary (padding) are zero."""
    if len(parts) == 1 and parts[0][0] is None and parts[0][1].shape == shape:
        return parts[0][1].load()
    out = torch.zeros(shape, dtype=dtype)
    for index, part in parts:
        t = part.load()
        out[index if index is not None else slice(0, t.shape[0])] = t
    return out


def _write_arrays(root: Path, ts: Any, d: fm.FlaxDims, tensors: Mapping[str, LazyTensor],
                  dtype: torch.dtype) -> dict[str, Shape]:
    """Every array into one OCDBT store under ``root``, committed about every COMMIT_BYTES; their shapes."""
    ts_dtype = getattr(ts, DTYPES[dtype])
    itemsize = ts_dtype.numpy_dtype.itemsize
    ctx = ts.Context()
    kv = {"driver": "ocdbt", "base": root.resolve().as_uri() + "/", "config": OCDBT_CONFIG,
          "target_data_file_size": TARGET_FILE_BYTES}
    shapes: dict[str, Shape] = {}
    txn, pending = ts.Transaction(), 0
    for name, shape, parts in fm.from_hf(tensors, d):
        meta = {"chunks": list(chunk_shape(shape, itemsize)), "compressor": {"id": "zstd", "level": 1}}
        store = ts.open({"driver": "zarr", "kvstore": {**kv, "path": name + "/"}, "metadata": meta}, create=True,
                        dtype=ts_dtype, shape=list(shape), context=ctx, transaction=txn).result()
        store.write(_numpy(_assemble(shape, parts, dtype), ts_dtype.numpy_dtype)).result()
        shapes[name], pending = shape, pending + math.prod(shape) * itemsize
        if pending >= COMMIT_BYTES:  # bounded memory, few OCDBT data files
            txn.commit_async().result()
            txn, pending = ts.Transaction(), 0
    txn.commit_async().result()
    return shapes


def check_orbax_input(cfg: Gemma2Config, tensors: Mapping[str, LazyTensor], rows: int | None, path: Path) -> torch.dtype:
    """The one dtype of ``tensors``, after checking names, shapes and ``rows`` against ``cfg``."""
    want = expected_shapes(cfg)
    check_names(want, tensors, path, what="tensors")
    check_shapes(want, {k: t.shape for k, t in tensors.items()}, path)
    if rows is not None and rows < cfg.vocab_size:
        raise TensorMismatchError(f"{rows} embedding rows cannot hold the vocabulary of {cfg.vocab_size}", path)
    dtypes = sorted({t.dtype for t in tensors.values()}, key=str)
    if len(dtypes) != 1 or dtypes[0] not in DTYPES:
        raise TensorMismatchError(f"expected tensors of one dtype of {', '.join(DTYPES.values())}, got "
                                  f"{', '.join(str(t).removeprefix('torch.') for t in dtypes)}", path)
    return dtypes[0]


def write_orbax_dir(out: Path, cfg: Gemma2Config, tensors: Mapping[str, LazyTensor], *, rows: int | None = None,
                    gating_transposed: bool = False) -> list[str]:
    """Write the checkpoint's files into ``out`` (an existing empty directory); returns their names."""
    dtype = check_orbax_input(cfg, tensors, rows, out)
    ts = tensorstore_module(out)
    t0 = time.time_ns()
    shapes = _write_arrays(out, ts, fm.dims_of(cfg, rows, gating_transposed), tensors, dtype)
    (out / METADATA).write_text(json.dumps(tree_metadata(shapes)))
    (out / "_sharding").write_text(json.dumps(_sharding(list(shapes))))
    (out / "_CHECKPOINT_METADATA").write_text(json.dumps({
        "item_handlers": HANDLER, "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": t0,
        "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}))
    return sorted(p.name for p in out.iterdir())


def write_orbax(path: str | Path, cfg: Gemma2Config, tensors: Mapping[str, LazyTensor], *, rows: int | None = None,
                gating_transposed: bool = False) -> Path:
    """Write HF-named tensors of ``cfg`` (one dtype: bfloat16, float16 or float32) as an Orbax checkpoint
    directory at ``path``, which must not exist or be empty; returns ``path``. ``rows``: embedding rows to
    store, ≥ the vocabulary (the released 256128 pad 256000; here with zero rows); ``gating_transposed``:
    gating_einsum [2, I, H] like the released 9B/27B, else [2, H, I] like the released 2B."""
    path = Path(path)
    check_orbax_input(cfg, tensors, rows, path)
    tensorstore_module(path)
    with atomic_output(path, directory=True) as tmp:
        write_orbax_dir(tmp, cfg, tensors, rows=rows, gating_transposed=gating_transposed)
    return path


def prepare_orbax(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> WriteJob:
    """Plan ``ckpt`` as an Orbax checkpoint directory (one dtype: ``--dtype``, or the source's most common),
    with the tokenizer.model beside its arrays."""
    dtype = output_dtype(ckpt, opts, progress) or FLOAT_DTYPES[dominant_dtype([t.dtype for t in ckpt.tensors.values()])]
    tensorstore_module(ckpt.path)
    tok = tokenizer_file(ckpt, opts, progress)
    items = dict(checked_cast(ckpt, ckpt.tensors, dtype, opts, progress))
    size = sum(t.nbytes for t in items.values())

    def write(tmp: Path, progress: Progress) -> list[str]:
        counted = {n: t.map(lambda x, n=n, b=t.nbytes: (progress.on_tensor(n, b), x)[1]) for n, t in items.items()}
        names = write_orbax_dir(tmp, ckpt.config, counted)
        tok_path = materialize_tokenizer(ckpt, tok, tmp)
        if tok_path is not None and tok_path.parent != tmp:
            shutil.copyfile(tok_path, tmp / "tokenizer.model")
        return sorted({*names, "tokenizer.model"} if (tmp / "tokenizer.model").exists() else names)

    return WriteJob(ckpt.config.replace(torch_dtype=DTYPES[dtype]), size + tokenizer_bytes(ckpt, tok) + (1 << 20),
                    size, tolerance(ckpt, dtype), write)


register_writer(Writer("orbax", "an Orbax (Flax/JAX) checkpoint directory, written with tensorstore (no JAX)",
                       directory=True, prepare=prepare_orbax, reads_back_as="orbax"))
