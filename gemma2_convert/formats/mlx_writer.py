"""The ``mlx`` writer: an mlx-lm model directory that ``mlx_lm.load`` opens (``formats/mlx_layout.py``).

Two ways in: ``gemma2-quantize --format mlx`` (our methods' codes, ``prepare_mlx_quantized``), and
``convert --to mlx`` (``prepare_mlx``): dense tensors are written as they are (mlx-lm then runs the model
unquantized), quantized ones (``QuantTensor``) are moved into MLX's affine layout without re-quantizing
(``transcode_items``). Gemma 2's head is tied, so no ``lm_head`` is written; the embedding may be quantized.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemma2_convert import __version__
from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.compressed_writer import Codes, Layout, layer_order, packed_items
from gemma2_convert.formats.dense import (
    checked_cast,
    materialize_tokenizer,
    provenance,
    tokenizer_file,
)
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.formats.mlx_layout import MLX_LM_VERSION
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import (
    Checkpoint,
    WriteJob,
    Writer,
    register_writer,
)
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.formats.transcode_items import TranscodePlan, plan_transcode
from quant.mlx_affine import MLX_BITS, MLX_GROUP_SIZES, MODE, pack_affine
from quant.qparams import scale_dtype_for
from quant.spec import QuantSpec

"""Weight name → (codes, scale, zero) of its quantization (``quant/qparams.py`` layout)."""


def mlx_specs(specs: dict[str, QuantSpec | None], group_size: int | None) -> dict[str, QuantSpec | None]:
    """The policy's specs made MLX-storable: MLX has no per-channel scales, so a per-row spec (the int8
    embedding's) takes ``group_size``; a group or width MLX cannot hold is an error naming the choices."""
    out: dict[str, QuantSpec | None] = {}
    for name, spec in specs.items():
        if spec is not None and spec.group_size is None:
            if "embed" not in name and "lm_head" not in name or group_size is None:
                raise UnsupportedError(f"{name}: MLX stores groups of {', '.join(map(str, MLX_GROUP_SIZES))} "
                                       "columns, not one scale per row; pass --group-size 32, 64 or 128")
            spec = replace(spec, group_size=group_size)
        if spec is not None and (spec.group_size not in MLX_GROUP_SIZES or spec.bits not in MLX_BITS):
            raise UnsupportedError(f"{name}: {spec.bits}-bit groups of {spec.group_size} are not an MLX layout; "
                                   f"use bits {list(MLX_BITS)} and --group-size in {list(MLX_GROUP_SIZES)}")
        out[name] = spec
    return out


def mlx_quantization(params: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """config.json ``quantization``: the commonest ``(bits, group)`` as the default, other modules by name."""
    if not params:
        raise UnsupportedError("no module is quantized; write a plain checkpoint instead")
    (bits, group), _ = Counter(params.values()).most_common(1)[0]
    q: dict[str, Any] = {"group_size": group, "bits": bits, "mode": MODE}
    for prefix, (b, g) in sorted(params.items()):
        if (b, g) != (bits, group):
            q[prefix] = {"group_size": g, "bits": b, "mode": MODE}
    return q


def affine_layout(prefix: str, shape: tuple[int, ...], bits: int, group: int,
                  scale_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of one quantized module's three tensors."""
    out_f, in_f = shape
    return {f"{prefix}.weight": ((out_f, in_f * bits // 32), torch.uint32),
            f"{prefix}.scales": ((out_f, in_f // group), scale_dtype),
            f"{prefix}.biases": ((out_f, in_f // group), scale_dtype)}


def quantized_items(ckpt: Checkpoint, specs: dict[str, QuantSpec | None],
                    codes: Codes) -> list[tuple[str, LazyTensor]]:
    """The stored tensors, in layer order: each quantized weight's ``weight``/``scales``/``biases``."""
    def layout(prefix: str, lt: LazyTensor, spec: QuantSpec) -> Layout:
        return affine_layout(prefix, lt.shape, spec.bits, spec.group_len(lt.shape[1]), scale_dtype_for(lt.dtype))

    def pack(name: str, prefix: str, spec: QuantSpec) -> dict[str, Tensor]:
        parts = (f"{prefix}.weight", f"{prefix}.scales", f"{prefix}.biases")
        return dict(zip(parts, pack_affine(*codes(name), spec.bits)))

    return packed_items(ckpt, specs, layout, pack)


def write_job(ckpt: Checkpoint, items: list[tuple[str, LazyTensor]], quantization: dict[str, Any] | None,
              tolerance: Tolerance, tokenizer: Path | None, prov: dict[str, Any],
              finish: Callable[[], None] | None = None) -> WriteJob:
    """The job writing ``items`` as an mlx-lm directory (``quantization``: config.json's, None when dense);
    ``finish`` runs after the tensors are written (a transcode refuses inexact groups there)."""
    extra = {} if quantization is None else {"quantization": quantization, "quantization_config": quantization}
    size = sum(t.nbytes for _, t in items)

    def write(tmp: Path, progress: Progress) -> list[str]:
        files = write_hf_dir(tmp, ckpt.config, items, tokenizer=materialize_tokenizer(ckpt, tokenizer, tmp),
                             extra_config=extra, on_tensor=progress.on_tensor, provenance=prov)
        if finish is not None:
            finish()
        return sorted(p.name for p in files)

    return WriteJob(ckpt.config, size + (64 << 20 if tokenizer or ckpt.tokenizer_source else 0), ckpt.nbytes,
                    tolerance, write)


def prepare_mlx_quantized(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], codes: Codes) -> WriteJob:
    """Plan the directory for a quantization step (specs from ``mlx_specs``)."""
    params = {n.removesuffix(".weight"): (s.bits, s.group_size) for n, s in specs.items() if s is not None}
    prov = {"source": str(ckpt.path), "quantized_by": f"gemma2-quantize {__version__}", "mlx_lm": MLX_LM_VERSION}
    return write_job(ckpt, quantized_items(ckpt, specs, codes), mlx_quantization(params),  # type: ignore[arg-type]
                     Tolerance.lossy(float("inf"), 0.0), ckpt.tokenizer, prov)


def prepare_mlx(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> WriteJob:
    """``convert --to mlx``: dense tensors as they are, quantized ones moved into MLX's affine layout."""
    tok = tokenizer_file(ckpt, opts, progress)
    prov = provenance(ckpt, opts.command, {"tokenizer": str(tok) if tok else None, "verify": opts.verify,
                                           "mlx_lm": MLX_LM_VERSION})
    plan: TranscodePlan = plan_transcode(ckpt, "mlx", opts, progress)
    dense = {n: t for n, t in ckpt.tensors.items() if n not in plan.targets}
    items = dict(checked_cast(ckpt, dense, None, opts, progress)) | plan.items()
    ordered = sorted(items.items(), key=lambda kv: layer_order(kv[0]))
    quantization = mlx_quantization(plan.params()) if plan.targets else None
    job = write_job(ckpt, ordered, quantization, plan.tolerance(), tok, prov, plan.finish)
    if plan.targets:
        job.details["transcode"] = plan.details  # filled in as the tensors are recoded
    return job


register_writer(Writer("mlx", "an mlx-lm directory that mlx_lm.load opens (uint32 codes + scales + biases, or floats; "
                              f"mlx-lm {MLX_LM_VERSION} runs Gemma 2 without its sliding window)", directory=True,
                       prepare=prepare_mlx, reads_back_as="auto"))
