"""``gemma2-convert inspect``: what a checkpoint is, and what is wrong with it.

Every format is read twice, cheaply: as stored (its own tensor table and metadata — validated, not
loaded) and as the canonical checkpoint (config, variant). The doctor (``doctor.py``) then looks for
known problems; it reads only the norms and a stray ``lm_head``, or every tensor with ``scan``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats import READERS, detect_format, open_checkpoint
from gemma2_convert.formats.orig_config import Dims, ShapeOptions, detect_variant
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.formats.stored import PartRow, TensorRow
from gemma2_convert.formats.weight_check import (
    FP16_OVERFLOW,
    describe_nonfinite,
    extremes,
)
from gemma2_convert.pipeline.doctor import Facts, Finding, diagnose
from reference.config import Gemma2Config


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
    parts: list[PartRow] = field(default_factory=list)
    """The files of a split checkpoint (a split GGUF's parts), with their sizes and problems."""

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
                "doctor": [asdict(f) for f in self.findings],
                **({"parts": [asdict(p) for p in self.parts]} if self.parts else {})}


def variant_of(cfg: Gemma2Config) -> str:
    """'2b' / '9b' / '27b' when the shapes are a published size's, else 'custom'."""
    return detect_variant(Dims.of(cfg)) or "custom"


def scan_tensors(ckpt: Checkpoint, progress: Progress = SILENT) -> dict[str, str]:
    """Every tensor read once: tensor → 'nonfinite: …', a float16-range note, or ''."""
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
        progress.on_tensor(name, lt.nbytes)
    return out


def _scan(ckpt: Checkpoint, progress: Progress) -> dict[str, str]:
    with progress.phase("scanning", ckpt.nbytes):
        return scan_tensors(ckpt, progress)


def inspect_path(path: str | Path, *, options: ShapeOptions | None = None, scan: bool = False,
                 progress: Progress = SILENT) -> Inspection:
    """Inspect any checkpoint this tool reads. A file that is broken as stored raises its
    ConversionError; one that is intact but not a readable Gemma 2 model is reported, with the reason
    as an ``error`` finding."""
    path = Path(path)
    fmt = detect_format(path)
    stored = READERS[fmt].stored(path)
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
                  scanned=_scan(ckpt, progress) if scan and ckpt is not None else None, parts=stored.parts)
    return Inspection(str(path), fmt, variant, cfg.to_hf_dict() if cfg is not None else stored.raw_config,
                      stored.rows, stored.metadata, stored.provenance, diagnose(facts), stored.parts)
