"""What the float (dense) writers — HF directory, single safetensors, Orbax — share: the output dtype,
the cast with its weight check, the tokenizer to ship, the provenance record and the tolerance."""

from __future__ import annotations

from pathlib import Path

import torch

from gemma2_convert import __version__
from gemma2_convert.core.dtypes import FP16_WARNING, is_widening, resolve_dtype
from gemma2_convert.core.errors import ConfigError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.formats.tokenizer.spm import find_tokenizer, read_spm
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.formats.torch_zip import fingerprint
from gemma2_convert.formats.weight_check import WeightCheck


def output_dtype(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> torch.dtype | None:
    """The dtype every float tensor is written in (None: each keeps its own); warns for float16."""
    name = ckpt.default_dtype if opts.dtype == "auto" and ckpt.default_dtype else opts.dtype
    target = resolve_dtype(name)
    if target == torch.float16:
        progress.warn(FP16_WARNING)
    return target


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
        out.append((name, checked_to(name, t, target, check)))
    return out


def checked_to(name: str, t: LazyTensor, target: torch.dtype, check: WeightCheck) -> LazyTensor:
    """``t`` cast to ``target``, checked by ``check`` as it is loaded. A ``t`` with ``rows`` keeps them (a
    writer may stream it by blocks of rows): each block is checked as it is read (``WeightCheck.passes``), and
    the first block that fails has the whole tensor checked, so the error or warning counts and locates as
    ``load`` does (the memory of a whole decode, on that path only; reported once)."""
    fp16 = target == torch.float16 and t.dtype != torch.float16

    def load() -> torch.Tensor:
        x = t.load()
        check(name, x, to_fp16=fp16)
        return x if x.dtype == target else x.to(target)

    if t.rows is None:
        return LazyTensor(t.shape, target, load, t.stored_nbytes, t.prefetch)
    source_rows, reported = t.rows, []

    def rows(a: int, b: int) -> torch.Tensor:
        x = source_rows(a, b)
        if not reported and not WeightCheck.passes(x, to_fp16=fp16):
            reported.append(True)
            check(name, t.load(), to_fp16=fp16)  # raises, or warns (--allow-nonfinite)
        return x if x.dtype == target else x.to(target)

    return LazyTensor(t.shape, target, load, t.stored_nbytes, t.prefetch, rows)


def checked_cast(ckpt: Checkpoint, tensors: dict[str, LazyTensor], dtype: torch.dtype | None,
                 opts: ConvertOptions, progress: Progress) -> list[tuple[str, LazyTensor]]:
    """``cast`` with the weight check the options ask for (errors name the source)."""
    return cast(tensors, dtype, WeightCheck(opts.allow_nonfinite, progress.warn, ckpt.path))


def tolerance(ckpt: Checkpoint, dtype: torch.dtype | None) -> Tolerance:
    """Exact when every cast is exact (kept, or a 16-bit float widened); else equal after the cast."""
    exact = all(is_widening(t.dtype, dtype) for t in ckpt.tensors.values())
    return Tolerance() if exact else Tolerance.cast()


def tokenizer_file(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> Path | None:
    """The tokenizer.model to ship: the option, else the one found with the source; checked against the
    embedding. None (with a warning) when there is none and the source embeds none either (a GGUF's
    ``tokenizer_blob`` is the embedded model or the one rebuilt from its ``tokenizer.ggml.*`` keys)."""
    tok = opts.tokenizer or ckpt.tokenizer or find_tokenizer(ckpt.path)
    if tok is None:
        if ckpt.tokenizer_blob is None:
            what = ("the GGUF embeds neither a tokenizer.model nor a SentencePiece vocabulary (tokenizer.ggml.*), "
                    "and no tokenizer.model lies next to it") if ckpt.format == "gguf" \
                else "no tokenizer.model found next to the checkpoint"
            progress.warn(f"{ckpt.path}: {what}; writing no tokenizer files (pass --tokenizer)")
        return None
    tok = Path(tok)
    if not tok.is_file():
        raise ConfigError("tokenizer file not found", tok)
    n = len(read_spm(tok).pieces)
    if n > ckpt.config.vocab_size:
        raise ConfigError(f"tokenizer has {n} pieces but the model's embedding has {ckpt.config.vocab_size} rows; "
                          "is this the model's tokenizer?", tok)
    if n < ckpt.config.vocab_size:
        progress.warn(f"{tok}: tokenizer has {n} pieces, the embedding {ckpt.config.vocab_size} rows (extra rows "
                      "are unused)")
    return tok


def materialize_tokenizer(ckpt: Checkpoint, tok: Path | None, out_dir: Path) -> Path | None:
    """``tok``, or the tokenizer the source embeds written into ``out_dir`` (then read from there)."""
    if tok is not None or ckpt.tokenizer_blob is None:
        return tok
    path = out_dir / "tokenizer.model"
    path.write_bytes(ckpt.tokenizer_blob)
    return path


def tokenizer_bytes(ckpt: Checkpoint, tok: Path | None) -> int:
    """Room the tokenizer files take (tokenizer.json is several times the model file)."""
    return 8 * (tok.stat().st_size if tok is not None else len(ckpt.tokenizer_blob or b""))


def source_files(ckpt: Checkpoint) -> list[Path]:
    """The files a reader recorded as the checkpoint's (gemma_pytorch zips); empty for the others."""
    import json

    return [Path(f) for f in json.loads(ckpt.metadata.get("files", "[]"))]


def provenance(ckpt: Checkpoint, command: str, options: dict) -> dict:
    """What made this artifact: command, source (path, format, files with size and fingerprint), options."""
    files = source_files(ckpt)
    other = {k: v for k, v in ckpt.metadata.items() if k not in ("files", "int8", "config_from")}
    return {
        "converter": f"gemma2-convert {__version__}",
        "command": command,
        "source": {
            "path": str(ckpt.path.resolve()), "format": ckpt.format, "int8": ckpt.metadata.get("int8") == "true",
            "files": [{"name": f.name, "size": f.stat().st_size, "fingerprint": fingerprint(f)} for f in files],
            "metadata": other,
        },
        "config_from": ckpt.metadata.get("config_from", ""),
        "options": options,
    }
