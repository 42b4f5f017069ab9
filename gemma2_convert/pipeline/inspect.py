"""``gemma2-convert inspect``: what a checkpoint is, and what is wrong with it.

Every format is read twice, cheaply: as stored (its own tensor table and metadata — validated, not
loaded) and as the canonical checkpoint (config, variant). The doctor (``doctor.py``) then looks for
known problems; it reads only the norms and a stray ``lm_head``, or every tensor with ``scan``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.pipeline.doctor import Facts, Finding, diagnose
from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats import detect_format, open_checkpoint
from gemma2_convert.formats.orig_config import Dims, ShapeOptions, detect_variant
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.core.lazy import LazyTensor, dtype_nbytes
from reference.config import Gemma2Config


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]
    type: str
    """As the format stores it: safetensors ``BF16``, GGUF ``Q4_K``, torch ``int8``, …"""
    nbytes: int


@dataclass
class Stored:
    """A checkpoint as its format stores it."""

    rows: list[TensorRow]
    tensors: dict[str, LazyTensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None
    raw_config: dict[str, Any] | None = None
    gguf_kv: dict[str, Any] | None = None
    special_tokens: dict[str, bool] | None = None


@dataclass
class Inspection:
    path: str
    format: str
    variant: str
    config: dict[str, Any] | None
    tensors: list[TensorRow]
    metadata: dict[str, Any]
    provenance: dict[str, Any] | None
    findings: list[Finding]

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "variant": self.variant, "config": self.config,
                "tensors": [asdict(r) | {"shape": list(r.shape)} for r in self.tensors],
                "total_bytes": self.total_bytes, "metadata": self.metadata, "provenance": self.provenance,
                "doctor": [asdict(f) for f in self.findings]}


def summary(v: Any) -> Any:
    """A metadata value short enough to show: long arrays and blobs become a count."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, str) and len(v) > 120:
        return f"{v[:60]}… ({len(v)} characters)"
    if isinstance(v, list):
        return f"[{len(v)} × {type(v[0]).__name__}]" if len(v) > 8 else [summary(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _json_text(text: str | None) -> dict[str, Any] | None:
    try:
        obj = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _torch_rows(state: dict[str, torch.Tensor]) -> list[TensorRow]:
    return [TensorRow(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
            for n, t in state.items()]


def _safetensors_rows(files: list[Path]) -> tuple[list[TensorRow], dict[str, LazyTensor], dict[str, str]]:
    from gemma2_convert.formats.safetensors import SafetensorsFile

    rows, tensors, meta = [], {}, {}
    for fn in files:
        f = SafetensorsFile(fn)
        meta = meta or dict(f.metadata)
        for n in f.names():
            e = f.header[n]
            rows.append(TensorRow(n, tuple(e["shape"]), e["dtype"], e["data_offsets"][1] - e["data_offsets"][0]))
            tensors[n] = f.lazy(n)
    return rows, tensors, meta


def _hf(path: Path) -> Stored:
    from gemma2_convert.formats.hf import shard_files

    files = shard_files(path)
    rows, tensors, st_meta = _safetensors_rows([path / f for f in files])
    raw = _json_file(path / "config.json")
    meta: dict[str, Any] = {"files": files, **{f"safetensors.{k}": summary(v) for k, v in st_meta.items()}}
    quant = (raw or {}).get("quantization_config")
    if isinstance(quant, dict):
        meta["quantization"] = f"{quant.get('quant_method')} ({quant.get('format', '?')})"
    tok_cfg = _json_file(path / "tokenizer_config.json") or {}
    added = tok_cfg.get("added_tokens_decoder")
    special = ({str(e.get("content")): bool(e.get("special")) for e in added.values() if isinstance(e, dict)}
               if isinstance(added, dict) else None)
    return Stored(rows, tensors, meta, _json_file(path / "gemma2_convert.json"), raw, special_tokens=special)


def _single(path: Path) -> Stored:
    from gemma2_convert.formats.single_safetensors import CONFIG_KEY, PROVENANCE_KEY

    rows, tensors, meta = _safetensors_rows([path])
    shown = {k: summary(v) for k, v in meta.items() if k not in (CONFIG_KEY, PROVENANCE_KEY)}
    return Stored(rows, tensors, shown, _json_text(meta.get(PROVENANCE_KEY)), _json_text(meta.get(CONFIG_KEY)))


def _gguf(path: Path) -> Stored:
    from gemma2_convert.formats.gguf.metadata import K_HF_CONFIG, K_NORM_RESIDUAL, PREFIX
    from gemma2_convert.formats.gguf.reader import GGUFFile, dequantize, stored_dtype

    f = GGUFFile(path)
    rows = [TensorRow(t.name, t.shape, t.type_name, t.nbytes) for t in f.tensors.values()]
    tensors = {t.name: LazyTensor(t.shape, stored_dtype(t), lambda t=t: dequantize(f, t)) for t in f.tensors.values()}
    ours = {k: v for k, v in f.kv.items() if k.startswith(PREFIX)}
    prov = {k.removeprefix(PREFIX): summary(v) for k, v in ours.items()
            if not k.startswith(K_NORM_RESIDUAL) and k != K_HF_CONFIG}
    residuals = sum(k.startswith(K_NORM_RESIDUAL) for k in ours)
    if residuals:
        prov["norm_residual"] = f"low bits of {residuals} norm tensor(s)"
    meta = {"gguf_version": f.version, **{k: summary(v) for k, v in f.kv.items() if not k.startswith(PREFIX)}}
    raw = _json_text(f.kv.get(K_HF_CONFIG)) if isinstance(f.kv.get(K_HF_CONFIG), str) else None
    return Stored(rows, tensors, meta, prov or None, raw, gguf_kv=f.kv)


def _gemma_pytorch(path: Path) -> Stored:
    from gemma2_convert.formats.gemma_pytorch import read_state

    files, state = read_state(path)
    meta = {"files": [str(f.relative_to(path)) if f != path else f.name for f in files],
            "int8": any(n.endswith("weight_scaler") for n in state)}
    return Stored(_torch_rows(state), {n: LazyTensor.of(t) for n, t in state.items()}, meta)


def _orbax(path: Path) -> Stored:
    from gemma2_convert.formats.orbax import read_arrays

    d, arrays, _ = read_arrays(path)
    rows = [TensorRow(n, a.shape, str(a.dtype).removeprefix("torch."), math.prod(a.shape) * dtype_nbytes(a.dtype))
            for n, a in arrays.items()]
    meta = {"checkpoint_dir": "." if d == path else str(d.relative_to(path))}
    return Stored(rows, {n: a.lazy() for n, a in arrays.items()}, meta)


STORED: dict[str, Callable[[Path], Stored]] = {
    "hf": _hf, "safetensors": _single, "gguf": _gguf, "gemma_pytorch": _gemma_pytorch, "orbax": _orbax,
}


def variant_of(cfg: Gemma2Config) -> str:
    """'2b' / '9b' / '27b' when the shapes are a published size's, else 'custom'."""
    return detect_variant(Dims.of(cfg)) or "custom"


def scan_tensors(ckpt: Checkpoint, on_tensor: Callable[[str, int], None] | None = None) -> dict[str, str]:
    """Every tensor read once: tensor → 'nonfinite: …', a float16-range note, or ''."""
    from gemma2_convert.formats.weight_check import FP16_OVERFLOW, describe_nonfinite, extremes

    out = {}
    for name, lt in ckpt.tensors.items():
        t = lt.load()
        problem = ""
        if t.is_floating_point() and t.numel():
            lo, hi = extremes(t)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                problem = "nonfinite: " + describe_nonfinite(t)
            elif max(-lo, hi) >= FP16_OVERFLOW:
                problem = (f"max |w| {max(-lo, hi):.4g} is beyond the float16 range: a float16 output "
                           "(--dtype float16, --type f16) is refused")
        out[name] = problem
        if on_tensor is not None:
            on_tensor(name, lt.nbytes)
    return out


def inspect_path(path: str | Path, *, options: ShapeOptions | None = None, scan: bool = False,
                 on_tensor: Callable[[str, int], None] | None = None) -> Inspection:
    """Inspect any checkpoint this tool reads. A file that is broken as stored raises its
    ConversionError; one that is intact but not a readable Gemma 2 model is reported, with the reason
    as an ``error`` finding."""
    path = Path(path)
    fmt = detect_format(path)
    stored = STORED[fmt](path)
    ckpt: Checkpoint | None = None
    error = None
    try:
        ckpt = open_checkpoint(path, format=fmt, options=options)
    except ConversionError as e:
        error = str(e)
    cfg = ckpt.config if ckpt is not None else None
    variant = variant_of(cfg) if cfg is not None else "unknown"
    facts = Facts(path, fmt, ckpt, error, variant, stored.raw_config, stored.gguf_kv,
                  {r.name: r.shape for r in stored.rows}, stored.tensors, stored.special_tokens,
                  scanned=scan_tensors(ckpt, on_tensor) if scan and ckpt is not None else None)
    return Inspection(str(path), fmt, variant, cfg.to_hf_dict() if cfg is not None else stored.raw_config,
                      stored.rows, stored.metadata, stored.provenance, diagnose(facts))
