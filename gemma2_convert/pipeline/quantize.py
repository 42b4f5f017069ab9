"""``gemma2-quantize``: int8 / int4 group-wise quantization of any checkpoint the project reads.

Stream: source tensors (lazy) → policy predicate → method (rtn / mse / hqq / gptq) → packed tensors
→ writer, one module at a time. GPTQ's calibration runs layer by layer as the writer asks for each
layer (``calibrate.SequentialGPTQ``). The output is written to a temporary sibling, verified against
the source with the reference model (``quality.py``) and only then renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gemma2_convert.core.errors import ConversionError, UnsupportedError
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.compressed_writer import prepare_compressed
from gemma2_convert.formats.gguf.quantized import prepare_gguf_quantized
from gemma2_convert.formats.gguf.split import part_pattern
from gemma2_convert.formats.mlx_writer import mlx_specs, prepare_mlx_quantized
from gemma2_convert.formats.output import check_free_space, check_output
from gemma2_convert.formats.registry import Checkpoint, open_checkpoint
from gemma2_convert.formats.weight_check import WeightCheck, checked_once
from gemma2_convert.pipeline.adapters import merged_for_quantizing
from gemma2_convert.pipeline.calibrate import (
    SequentialGPTQ,
    activation_importance,
    calibration_ids,
    read_text,
)
from gemma2_convert.pipeline.allocate import choose_types
from gemma2_convert.pipeline.autoround import AutoRoundSettings, autoround_engine
from gemma2_convert.pipeline.convert import run_job
from gemma2_convert.pipeline.imatrix_use import check_gguf_options, file_importance, is_split
from gemma2_convert.pipeline.equalize import fold_checkpoint, measure_scales
from gemma2_convert.pipeline.typed_gptq import TypedGPTQ
from gemma2_convert.pipeline.quality import (
    DEFAULT_EVAL_TEXT,
    check_quality,
    quality_report,
)
from quant.methods import quantize_weight
from quant.metrics import db_from_rel_rmse, rel_rmse
from quant.policy import default_policy
from quant.qparams import dequantize, scale_dtype_for
from quant.spec import QuantSpec

FORMATS = ("hf", "gguf", "mlx")
LAYERWISE = ("gptq", "autoround")
"""Methods run layer by layer on calibration activations (their codes come from an engine, not per weight)."""
DEFAULT_GROUP = {"hf": 128, "gguf": 32, "mlx": 64}


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = 4
    group_size: int | None | str = "auto"
    """Columns per scale; None = one per output channel; 'auto' = 128 for hf, 32 for gguf."""
    symmetric: bool = True
    method: str = "mse"
    format: str = "hf"
    embedding: str = "keep"
    calibration: Path | None = None
    eval_text: Path | None = None
    verify: bool = True
    force: bool = False
    allow_nonfinite: bool = False
    """Quantize NaN/Inf weights with a warning instead of failing."""
    split_max_size: str | int | None = None
    """gguf: split the output into parts of at most this size (``ConvertOptions.split_max_size``)."""
    split_max_tensors: int | None = None
    """gguf: split the output into parts of at most this many tensors."""
    imatrix: Path | None = None
    """gguf: a llama.cpp importance matrix (llama-imatrix's GGUF or legacy .dat) whose per-column importance
    replaces the one measured on calibration text, used as ``llama-quantize --imatrix`` uses it."""
    autoround: AutoRoundSettings = AutoRoundSettings()
    """--method autoround: steps, step size, batch (``pipeline/autoround.py``; ``FAST`` is the quicker one)."""
    adapters: tuple[Path, ...] = ()
    """PEFT LoRA adapter directories merged into the source first, in order (``convert --adapter``'s merge)."""
    bpw: float | None = None
    """gguf: bits per weight over the matrices; each tensor's GGUF type is chosen by measured error
    (``pipeline/allocate.py``) instead of ``--bits``/``--group-size``."""
    target_size: int | None = None
    """gguf: like ``bpw``, for a file of about this many bytes."""
    equalize: bool = False
    """Fold AWQ per-channel scales, measured on the calibration text, into the model before quantizing
    (``pipeline/equalize.py``; exact in float, so any method and format can use it)."""
    def group(self) -> int | None:
        return DEFAULT_GROUP[self.format] if self.group_size == "auto" else self.group_size  # type: ignore[return-value]


@dataclass
class TensorStat:
    name: str
    spec: str
    sqnr_db: float
    rel_rmse: float


@dataclass
class QuantizeResult:
    out: Path
    format: str
    quantized: int = 0
    kept: int = 0
    source_bytes: int = 0
    output_bytes: int = 0
    stats: list[TensorStat] = field(default_factory=list)
    quality: dict = field(default_factory=dict)


def plan_specs(ckpt: Checkpoint, opts: QuantizeOptions) -> dict[str, QuantSpec | None]:
    """The policy's verdict for every tensor (shape errors raised up front, before any work, naming the file)."""
    try:
        return {
            name: default_policy(name, t.shape, bits=opts.bits, group_size=opts.group(), symmetric=opts.symmetric,
                                 method=opts.method, embedding=opts.embedding)
            for name, t in ckpt.tensors.items()
        }
    except ConversionError as e:
        if e.path is not None:
            raise
        raise type(e)(str(e), ckpt.path) from None


class ModuleQuantizer:
    """Quantizes each weight once, when the writer first asks for one of its stored tensors."""
    def __init__(self, ckpt: Checkpoint, specs: dict[str, QuantSpec | None], stats: list[TensorStat],
                 gptq: Callable[[str], tuple] | None = None,
                 importance: dict[str, torch.Tensor] | None = None) -> None:
        self.ckpt, self.specs, self.stats, self.gptq = ckpt, specs, stats, gptq
        self.importance = importance or {}
        self.imatrix: Path | None = None
        """The importance matrix file ``importance`` comes from (then a weight without an entry gets llama.cpp's
        reference quantizer, as llama-quantize gives it)."""
        self.typed: TypedGPTQ | None = None
        """``--method gptq`` with an allocation: the engine writing each allocated decoder weight's blocks."""
        self._last: tuple[str, tuple] | None = None

    def codes(self, name: str, w: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None,
              gptq_scale: float = 1.0, record: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes, scale, zero) for weight ``name`` (or the given transformed ``w``); the latest result
        is kept for its sibling tensors. ``gptq_scale`` rescales GPTQ scales when ``w`` was rescaled."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        spec = self.specs[name]
        w = self.ckpt.tensors[name].load() if w is None else w
        sd = scale_dtype or scale_dtype_for(w.dtype)
        if spec.method in LAYERWISE and self.gptq is not None:
            q, s, z = self.gptq(name)
            s = (s.float() * gptq_scale).to(sd)
        else:
            q, s, z = quantize_weight(w, spec, name=name, importance=self.importance.get(name), scale_dtype=sd)
        if record:
            self.record(name, spec.label(), w, dequantize(q, s, z))
        self._last = (name, (q, s, z))
        return q, s, z

    def record(self, name: str, label: str, w: torch.Tensor, approx: torch.Tensor) -> None:
        self.record_error(name, label, rel_rmse(w, approx))  # in float64 blocks: no full-size copy of either

    def record_error(self, name: str, label: str, e: float) -> None:
        """Record a tensor's relative RMSE ``e`` (and its SQNR) for the quality report."""
        self.stats.append(TensorStat(name, label, db_from_rel_rmse(e), e))


def estimate_bytes(ckpt: Checkpoint, specs: dict[str, QuantSpec | None]) -> int:
    """About what the output takes: packed codes plus a scale (and zero) per group, kept tensors as they are."""
    total = 0
    for name, t in ckpt.tensors.items():
        spec = specs[name]
        if spec is None:
            total += t.nbytes
        else:
            groups = t.numel // (spec.group_size or t.shape[-1])
            total += t.numel * spec.bits // 8 + groups * 4 * (1 if spec.symmetric else 2)
    return total + (1 << 20)


def quantize_checkpoint(src: str | Path | Checkpoint, out: str | Path, opts: QuantizeOptions,
                        progress: Progress = SILENT) -> QuantizeResult:
    """Quantize ``src`` into ``out`` (written to a temporary sibling, verified, then renamed). Every
    weight is checked for NaN/Inf when it is first read (``opts.allow_nonfinite``: a warning).
    Progress: a phase of bytes per tensor written, then one of decoder layers of the quality report."""
    if opts.format not in FORMATS:
        raise UnsupportedError(f"format {opts.format!r}; choose one of {list(FORMATS)}")
    if opts.embedding == "q6_k" and opts.format != "gguf":
        raise UnsupportedError(f"--embedding q6_k is a GGUF type; use --format gguf, or int8 / int4 for --format "
                               f"{opts.format}")
    check_gguf_options(opts)
    if (opts.bpw is not None or opts.target_size is not None) and opts.format != "gguf":
        raise UnsupportedError("--bpw / --target-size choose GGUF types; use them with --format gguf")
    siblings = part_pattern(Path(out)) if is_split(opts) else None
    check_output(Path(out), opts.force, [*([] if isinstance(src, Checkpoint) else [src]), *opts.adapters], siblings)
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    ckpt = merged_for_quantizing(ckpt, opts.adapters, progress)
    ckpt = replace(ckpt, tensors=checked_once(ckpt.tensors, WeightCheck(opts.allow_nonfinite, progress.warn,
                                                                         ckpt.path)))
    specs = plan_specs(ckpt, opts)
    if opts.format == "mlx":
        specs = mlx_specs(specs, opts.group())
    if not any(specs.values()):
        raise UnsupportedError("no tensor of this checkpoint is quantizable by the policy", ckpt.path)
    check_free_space(Path(out), estimate_bytes(ckpt, specs))  # before calibration, which takes long
    source = ckpt  # the quality report compares against the model as given, not its folded form
    if opts.equalize:
        ckpt = fold_checkpoint(ckpt, measure_scales(ckpt, specs, _calibration(ckpt, opts), progress)[0])
    res = QuantizeResult(Path(out), opts.format, sum(s is not None for s in specs.values()),
                         sum(s is None for s in specs.values()), ckpt.nbytes)
    gptq = _gptq_engine(ckpt, specs, opts, progress) if opts.method in LAYERWISE else None
    if opts.imatrix is not None:
        importance = file_importance(ckpt, specs, opts.imatrix, progress)
    else:
        importance = _importance(ckpt, specs, opts) if opts.method in ("mse", "hqq") else None
    types = None
    if opts.bpw is not None or opts.target_size is not None:
        importance = importance or _importance(ckpt, specs, opts) or {}
        types = choose_types(ckpt, specs, importance, _calibration(ckpt, opts), opts.bpw, opts.target_size,
                             progress)
    mq = ModuleQuantizer(ckpt, specs, res.stats, gptq, importance)
    mq.imatrix = opts.imatrix
    if types is not None and opts.method == "gptq":
        mq.typed = TypedGPTQ(ckpt, types, importance or {}, _calibration(ckpt, opts))
    need = estimate_bytes(ckpt, specs)
    if opts.format == "hf":
        job = prepare_compressed(ckpt, specs, mq.codes, need)
    elif opts.format == "mlx":
        job = prepare_mlx_quantized(ckpt, specs, mq.codes)
    else:
        job = prepare_gguf_quantized(ckpt, specs, mq, opts.embedding, opts.allow_nonfinite, progress,
                                     split_max_size=opts.split_max_size, split_max_tensors=opts.split_max_tensors,
                                     imatrix=opts.imatrix, types=types)

    def check(tmp: Path) -> dict:
        res.output_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() \
            else sum(f.stat().st_size for f in tmp.parent.iterdir()) if siblings else tmp.stat().st_size
        if not opts.verify:
            return {}
        with progress.phase("reference forward", None, "layers"):
            quality = quality_report(source, open_checkpoint(tmp), read_text(opts.eval_text, DEFAULT_EVAL_TEXT),
                                     on_layer=progress.update)
        check_quality(quality, opts.bits, tmp)
        return quality

    files, quality = run_job(ckpt, Path(out), job, directory=opts.format in ("hf", "mlx"), force=opts.force,
                             progress=progress, check=check, label="quantizing", siblings=siblings)
    res.quality = quality or {}
    if siblings is not None:
        res.out = Path(out).parent / files[0]
    return res


def _calibration(ckpt: Checkpoint, opts: QuantizeOptions) -> torch.Tensor:

    text = read_text(opts.calibration, DEFAULT_EVAL_TEXT)
    seq_len = min(2 * ckpt.config.sliding_window, ckpt.config.max_position_embeddings, 2048)
    # gptq needs real calibration text; the activation importance of mse/hqq makes do with the built-in one
    return calibration_ids(ckpt, text, seq_len, shorter_ok=opts.calibration is None and opts.method != "gptq")


def _gptq_engine(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], opts: QuantizeOptions,
                 progress: Progress = SILENT):

    layers = {n: s for n, s in specs.items() if s is not None and "layers." in n}
    scale_dtype = torch.float16 if opts.format == "gguf" else None  # GGUF blocks store fp16 scales
    if opts.method == "autoround":
        return autoround_engine(ckpt, layers, _calibration(ckpt, opts), opts.autoround, scale_dtype, progress)
    return SequentialGPTQ(ckpt, layers, _calibration(ckpt, opts), scale_dtype=scale_dtype).result


def _importance(ckpt: Checkpoint, specs: dict[str, QuantSpec | None],
                opts: QuantizeOptions) -> dict[str, torch.Tensor] | None:
    """Activation-weighted error for mse/hqq when calibration text is given (or a tokenizer is there)."""
    if opts.calibration is None and ckpt.tokenizer is None:
        return None
    names = {n for n, s in specs.items() if s is not None and "layers." in n}
    return activation_importance(ckpt, names, _calibration(ckpt, opts))
