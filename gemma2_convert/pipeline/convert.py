"""The library behind ``orig-to-hf``, ``orig-to-safetensors`` and ``verify``: read → cast → write → verify.

Tensors stream one at a time from the mmap'd source into the file being written (nothing holds the
model); the output goes to a temporary sibling that is verified, then renamed into place, so a failed
or interrupted run leaves nothing at the output path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma2_convert import __version__
from gemma2_convert.core.errors import ConfigError
from gemma2_convert.formats import Checkpoint, open_checkpoint
from gemma2_convert.formats.gemma_pytorch import open_orig
from gemma2_convert.core.units import parse_size
from gemma2_convert.formats.hf import config_for_output, write_hf_dir
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.torch_zip import check_integrity, fingerprint
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.output import atomic_output, check_output
from gemma2_convert.pipeline.verify import Tolerance, VerifyReport, require, verify
from gemma2_convert.formats.weight_check import WeightCheck
from reference.config import Gemma2Config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP16_WARNING = ("float16 output: Gemma 2 activations exceed the float16 range (about 65504) in real "
                "models, so inference in float16 may produce inf/NaN; prefer bfloat16 or float32")


@dataclass
class ConvertResult:
    """What a conversion wrote, and its verification report (None with ``verify_output=False``)."""

    output: Path
    files: list[str]
    nbytes: int
    config: Gemma2Config
    config_from: str
    report: VerifyReport | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def noting(warnings: list[str], warn: Callable[[str], None]) -> Callable[[str], None]:
    """A warning callback that also keeps each message in ``warnings`` (for the result / --json)."""
    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    return note


def resolve_dtype(name: str) -> torch.dtype | None:
    """'auto' → None (keep each tensor's dtype); otherwise the torch dtype."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(items: dict[str, LazyTensor], dtype: torch.dtype | None,
         check: WeightCheck | None = None) -> list[tuple[str, LazyTensor]]:
    """Lazily cast floating tensors to ``dtype`` (None keeps them). Each is checked by ``check`` (default:
    NaN/Inf and float16 overflow are errors) as it is loaded for writing, before the cast."""
    check = check or WeightCheck()
    out = []
    for name, t in items.items():
        if not t.dtype.is_floating_point:
            out.append((name, t))
            continue
        target = t.dtype if dtype is None else dtype
        fp16 = target == torch.float16 and t.dtype != torch.float16

        def load(x: torch.Tensor, name: str = name, target: torch.dtype = target, fp16: bool = fp16) -> torch.Tensor:
            check(name, x, to_fp16=fp16)
            return x if x.dtype == target else x.to(target)

        out.append((name, t.map(load, dtype=target)))
    return out


ORIGINAL_FORMATS = ("gemma_pytorch", "orbax")


def open_source(ckpt: str | Path, shape: ShapeOptions | None,
                tokenizer: str | Path | None = None) -> tuple[Checkpoint, dict[str, LazyTensor] | None]:
    """An original checkpoint — gemma_pytorch (with its tensors under their own names) or Flax/Orbax
    (auto-detected; then None for the original names)."""
    from gemma2_convert.core.errors import UnknownFormatError
    from gemma2_convert.formats import detect_format

    path = Path(ckpt)
    try:
        fmt = detect_format(path)
    except UnknownFormatError:
        fmt = None
    if fmt is None or fmt == "gemma_pytorch":
        return open_orig(path, shape)  # unrecognised input: the gemma_pytorch reader says what is wrong with it
    if fmt not in ORIGINAL_FORMATS:
        raise UnknownFormatError(f"this is a {fmt} checkpoint, not an original one (a gemma_pytorch model.ckpt or "
                                 "a Flax/Orbax directory); use `gemma2-convert verify` or `to-gguf` for it", path)
    opts: dict = {"options": shape}
    if tokenizer is not None:
        opts["tokenizer"] = Path(tokenizer)
    return open_checkpoint(path, **opts), None


def is_lossless(src: dict[str, LazyTensor], dtype: torch.dtype | None) -> bool:
    """True when every cast is exact (same dtype, or a 16-bit float widened to float32)."""
    return dtype is None or all(t.dtype == dtype or (dtype == torch.float32 and t.dtype in (torch.bfloat16,
                                                                                            torch.float16))
                                for t in src.values())


def source_files(src: Checkpoint) -> list[Path]:
    return [Path(f) for f in json.loads(src.metadata.get("files", "[]"))]


def source_paths(src: Checkpoint) -> list[Path]:
    """The checkpoint path and its files: what an output may never replace."""
    return [src.path, *source_files(src)]


def fits_in_memory(src: Checkpoint, budget: int = 1 << 30) -> bool:
    """Whether two float32 copies of the model (source and output) fit in ``budget`` bytes. Above it the
    reference streams each layer from the mapped files per forward: verification runs only a few
    prompts, so re-reading costs little, and memory stays at one layer instead of two models."""
    return 2 * sum(t.numel for t in src.tensors.values()) * 4 < budget


def provenance(command: str, src: Checkpoint, options: dict) -> dict:
    """What made this artifact: converter version, source files (size, fingerprint), options."""
    files = source_files(src)
    return {
        "converter": f"gemma2-convert {__version__}",
        "command": command,
        "source": {
            "path": str(src.path.resolve()), "format": src.format, "int8": src.metadata.get("int8") == "true",
            "files": [{"name": f.name, "size": f.stat().st_size, "fingerprint": fingerprint(f)} for f in files],
        },
        "config_from": src.metadata.get("config_from", ""),
        "options": options,
    }


def _check_tokenizer(tok: Path, cfg: Gemma2Config, warn: Callable[[str], None]) -> None:
    from gemma2_convert.formats.tokenizer.spm import read_spm

    n = len(read_spm(tok).pieces)
    if n > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {n} pieces but the model's embedding has {cfg.vocab_size} rows; "
                          "is this the model's tokenizer?", tok)
    if n < cfg.vocab_size:
        warn(f"{tok}: tokenizer has {n} pieces, the embedding {cfg.vocab_size} rows (extra rows are unused)")


def _verify_output(src: Checkpoint, written: Path, final: Path, lossless: bool, n_tokens: int, quiet: bool,
                   on_report: Callable[[VerifyReport], None] | None) -> VerifyReport:
    """Source CRCs, then every tensor and the reference logits of ``written`` against ``src``."""
    from gemma2_convert.cli.console import spinner, verify_progress

    with spinner("verifying: source CRCs", quiet):
        check_integrity(source_files(src))
    with verify_progress(src.nbytes, quiet) as bar:
        rep = verify(src, open_checkpoint(written), tolerance=Tolerance() if lossless else Tolerance.cast(),
                     n_tokens=n_tokens, resident=fits_in_memory(src), on_tensor=bar.tensor, on_layer=bar.layer)
    rep.b = str(final)
    if on_report is not None:
        on_report(rep)
    require(rep)
    return rep


def _write_stream(total: int, label: str, quiet: bool, write: Callable[[Callable[[str, int], None]], object]):
    from gemma2_convert.cli.console import byte_progress

    with byte_progress(total, label, quiet) as bar:
        return write(bar.advance)


def orig_to_hf(
    ckpt: str | Path, out: str | Path, *, shape: ShapeOptions | None = None, tokenizer: str | Path | None = None,
    dtype: str = "auto", max_shard_size: str | int = "5GB", verify_output: bool = True, force: bool = False,
    n_tokens: int = 64, quiet: bool = False, warn: Callable[[str], None] = lambda m: None,
    on_report: Callable[[VerifyReport], None] | None = None, allow_nonfinite: bool = False,
) -> ConvertResult:
    """gemma_pytorch checkpoint → Hugging Face model directory (config, safetensors, tokenizer, provenance).

    ``allow_nonfinite``: write NaN/Inf weights (and float16 overflows) with a warning instead of failing."""
    t0 = time.perf_counter()
    try:
        parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(f"--max-shard-size: {e}") from None
    target = resolve_dtype(dtype)
    check_output(Path(out), force, [ckpt])  # fail before reading a large checkpoint
    src, _ = open_source(ckpt, shape, tokenizer)
    warnings: list[str] = []
    note = noting(warnings, warn)

    if target == torch.float16:
        note(FP16_WARNING)
    tok = Path(tokenizer) if tokenizer else src.tokenizer
    if tok is None:
        note(f"{ckpt}: no tokenizer.model found next to the checkpoint; writing no tokenizer files "
             "(pass --tokenizer)")
    else:
        if not tok.is_file():
            raise ConfigError("tokenizer file not found", tok)
        _check_tokenizer(tok, src.config, note)
    items = cast(src.tensors, target, WeightCheck(allow_nonfinite, note, src.path))
    prov = provenance("orig-to-hf", src, {"dtype": dtype, "max_shard_size": str(max_shard_size),
                                          "tokenizer": str(tok) if tok else None, "verify": verify_output})
    out = Path(out)
    report = None
    need = sum(t.nbytes for _, t in items) + (8 * tok.stat().st_size if tok else 0)
    with atomic_output(out, force, directory=True, need_bytes=need, inputs=source_paths(src)) as tmp:
        files = _write_stream(sum(t.nbytes for _, t in items), "writing", quiet, lambda cb: write_hf_dir(
            tmp, src.config, items, max_shard_size=max_shard_size, tokenizer=tok, provenance=prov, on_tensor=cb))
        if verify_output:
            report = _verify_output(src, tmp, out, is_lossless(src.tensors, target), n_tokens, quiet,
                                    on_report)
        names = sorted(p.name for p in files)
    nbytes = sum((out / n).stat().st_size for n in names)
    return ConvertResult(out, names, nbytes, config_for_output(src.config, items), src.metadata.get("config_from", ""),
                         report, warnings, time.perf_counter() - t0)


def orig_to_safetensors(
    ckpt: str | Path, out: str | Path, *, names: str = "hf", shape: ShapeOptions | None = None,
    dtype: str = "auto", verify_output: bool = True, force: bool = False, n_tokens: int = 64,
    quiet: bool = False, warn: Callable[[str], None] = lambda m: None,
    on_report: Callable[[VerifyReport], None] | None = None, allow_nonfinite: bool = False,
) -> ConvertResult:
    """gemma_pytorch checkpoint → one safetensors file with the config in its metadata."""
    from gemma2_convert.formats.single_safetensors import NAMES, write_single_safetensors

    t0 = time.perf_counter()
    if names not in NAMES:
        raise ConfigError(f"unknown --names {names!r}; choose one of {', '.join(NAMES)}")
    target = resolve_dtype(dtype)
    check_output(Path(out), force, [ckpt])
    src, orig = open_source(ckpt, shape)
    if orig is None and names == "orig":
        raise ConfigError(f"--names orig keeps gemma_pytorch names; {src.format} input has none (use --names hf)")
    warnings: list[str] = []
    note = noting(warnings, warn)

    if target == torch.float16:
        note(FP16_WARNING)
    items = cast(src.tensors if names == "hf" else orig, target, WeightCheck(allow_nonfinite, note, src.path))
    prov = provenance("orig-to-safetensors", src, {"dtype": dtype, "names": names, "verify": verify_output})
    out = Path(out)
    report = None
    need = sum(t.nbytes for _, t in items) + (1 << 20)
    with atomic_output(out, force, need_bytes=need, inputs=source_paths(src)) as tmp:
        _write_stream(sum(t.nbytes for _, t in items), "writing", quiet, lambda cb: write_single_safetensors(
            tmp, src.config, items, names=names, provenance=prov, on_tensor=cb))
        if verify_output:
            report = _verify_output(src, tmp, out, is_lossless(src.tensors, target), n_tokens, quiet,
                                    on_report)
    return ConvertResult(out, [out.name], out.stat().st_size, config_for_output(src.config, items),
                         src.metadata.get("config_from", ""), report, warnings, time.perf_counter() - t0)


def verify_paths(
    a: str | Path, b: str | Path, *, tolerance: str = "auto", max_kl: float = 0.05, min_top1: float = 0.9,
    n_tokens: int = 64, shape: ShapeOptions | None = None, quiet: bool = True,
) -> VerifyReport:
    """Compare any two checkpoints the reference reads; ``tolerance`` auto = exact when dtypes match.
    Progress bars (unless ``quiet``) follow the tensor comparison and the reference forward passes."""
    from gemma2_convert.cli.console import verify_progress

    ca, cb = open_checkpoint(a, options=shape), open_checkpoint(b, options=shape)
    if tolerance == "auto":
        same = all(cb.tensors[n].dtype == t.dtype for n, t in ca.tensors.items() if n in cb.tensors)
        tolerance = "exact" if same else "cast"
    tols = {"exact": Tolerance(), "cast": Tolerance.cast(), "lossy": Tolerance.lossy(max_kl, min_top1)}
    if tolerance not in tols:
        raise ConfigError(f"unknown tolerance {tolerance!r}; choose auto, {', '.join(tols)}")
    with verify_progress(ca.nbytes, quiet) as bar:
        return verify(ca, cb, tolerance=tols[tolerance], n_tokens=n_tokens, resident=fits_in_memory(ca),
                      on_tensor=bar.tensor, on_layer=bar.layer)
