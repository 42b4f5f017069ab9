"""The compressed-tensors ``pack-quantized`` HF directory (transformers + compressed-tensors, vLLM), written
from a quantization step: each quantized Linear becomes ``weight_packed`` / ``weight_scale`` (/
``weight_zero_point``) / ``weight_shape``, every other tensor is kept as it is."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from gemma2_convert import __version__
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.formats.registry import Checkpoint, WriteJob
from gemma2_convert.formats.tolerance import Tolerance
from quant.compressed_tensors import pack_quantized, packed_layout, quantization_config
from quant.qparams import scale_dtype_for
from quant.spec import QuantSpec

Codes = Callable[[str], tuple[Tensor, Tensor, "Tensor | None"]]
"""Weight name → (codes, scale, zero) of its quantization (``quant/qparams.py`` layout)."""


def layer_order(name: str) -> tuple[int, str]:
    """Embedding first, then layer by layer, then the rest (what GPTQ's sequential calibration needs)."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1, name
    return (0, name) if "embed" in name else (1 << 30, name)


def compressed_items(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], codes: Codes) -> list[tuple[str, LazyTensor]]:
    """The stream of stored tensors for the compressed-tensors HF layout, in layer order."""
    items: list[tuple[str, LazyTensor]] = []
    for name in sorted(ckpt.tensors, key=layer_order):
        lt, spec = ckpt.tensors[name], specs[name]
        if spec is None:
            items.append((name, lt))
            continue
        prefix = name.removesuffix(".weight")
        layout = packed_layout(prefix, lt.shape, spec, scale_dtype_for(lt.dtype))
        for part, (shape, dtype) in layout.items():
            def load(part: str = part, name: str = name, prefix: str = prefix, spec: QuantSpec = spec) -> Tensor:
                return pack_quantized(prefix, *codes(name), spec)[part]
            items.append((part, LazyTensor(shape, dtype, load)))
    return items


def prepare_compressed(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], codes: Codes,
                       need_bytes: int) -> WriteJob:
    """Plan the directory; ``need_bytes`` is the caller's size estimate (it knows the packing)."""
    # every Linear but lm_head must be listed (kept ones go to `ignore`): decoder projections and a classifier
    modules = {n.removesuffix(".weight"): s for n, s in specs.items()
               if s is not None or n.endswith("_proj.weight") or n == "score.weight"}
    qcfg = quantization_config(modules)

    def write(tmp: Path, progress: Progress) -> list[str]:
        files = write_hf_dir(tmp, ckpt.config, compressed_items(ckpt, specs, codes), tokenizer=ckpt.tokenizer,
                             extra_config={"quantization_config": qcfg}, on_tensor=progress.on_tensor,
                             provenance={"source": str(ckpt.path), "quantized_by": f"gemma2-quantize {__version__}"})
        return sorted(p.name for p in files)

    return WriteJob(ckpt.config, need_bytes, ckpt.nbytes, Tolerance.lossy(float("inf"), 0.0), write)
