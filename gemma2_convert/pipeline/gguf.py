"""The GGUF commands as calls of the one pipeline: ``to-gguf`` (any input), ``orig-to-gguf`` (the original
formats) and ``gguf-to-hf`` (a GGUF, ours or llama.cpp's, dequantized into an HF directory)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.convert import ConvertResult, convert, original_options
from gemma2_convert.pipeline.verify import VerifyReport

Report = Callable[[VerifyReport], None] | None


def to_gguf(src: str | Path, out: str | Path, *, type_name: str = "f16", progress: Progress = SILENT,
            on_report: Report = None, **options: Any) -> ConvertResult:
    """Any checkpoint the project reads → GGUF of ``type_name`` (``options``: ConvertOptions fields)."""
    opts = ConvertOptions(to="gguf", command="to-gguf", gguf_type=type_name, **options)
    return convert(src, out, opts, progress, on_report)


def orig_to_gguf(ckpt: str | Path, out: str | Path, *, shape: ShapeOptions | None = None, type_name: str = "f16",
                 progress: Progress = SILENT, on_report: Report = None, **options: Any) -> ConvertResult:
    """Original checkpoint (gemma_pytorch or Flax/Orbax) → GGUF."""
    opts = original_options("gguf", "orig-to-gguf", shape, gguf_type=type_name, **options)
    return convert(ckpt, out, opts, progress, on_report)


def gguf_to_hf(src: str | Path, out: str | Path, *, progress: Progress = SILENT, on_report: Report = None,
               **options: Any) -> ConvertResult:
    """GGUF → Hugging Face directory, dequantizing; ``dtype`` auto = the recorded source dtype (float32 for
    files without our provenance); the tokenizer: ``tokenizer``, else one next to the file, else the one
    our GGUFs embed, else one rebuilt from the ``tokenizer.ggml.*`` keys (llama.cpp's GGUFs)."""
    opts = ConvertOptions(to="hf", command="gguf-to-hf", inputs=("gguf",), **options)
    return convert(src, out, opts, progress, on_report)
