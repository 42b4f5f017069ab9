"""The one conversion pipeline: check output → open → plan → size check → atomic write → verify.

``convert(src, out, options)`` reads any registered input and writes any registered output
(``formats.registry``): tensors stream one at a time from the mapped source into the file being
written; the output goes to a temporary sibling that is verified against the source, then renamed
into place, so a failed or interrupted run leaves nothing at the output path. Every conversion
command is this one call with its options (``orig-to-hf`` = inputs restricted to the original
formats, ``to`` hf, and so on).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from gemma2_convert.core.errors import UnknownFormatError
from gemma2_convert.core.progress import SILENT, Progress, Warnings
from gemma2_convert.formats import READERS, Checkpoint, detect_format, open_checkpoint
from gemma2_convert.formats.compressed_writer import prepare_compressed_transcode
from gemma2_convert.formats.dense import source_files
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.output import atomic_output, check_output
from gemma2_convert.formats.registry import WriteJob, Writer, get_writer
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.pipeline.adapters import carry_tokenizer_files, with_adapters
from gemma2_convert.pipeline.compute import COMPUTE
from gemma2_convert.pipeline.verify import VerifyReport, require, verify
from reference.config import Gemma2Config

R = TypeVar("R")


@dataclass
class ConvertResult:
    """What a conversion wrote, and its verification report (None without verification)."""

    output: Path
    """The output (of a split GGUF: its first part, the file to open)."""
    format: str
    """The writer's name (hf, safetensors, gguf, orbax)."""
    files: list[str]
    nbytes: int
    config: Gemma2Config
    config_from: str
    report: VerifyReport | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    """Writer-specific facts (GGUF: ``type``, ``query_fold``, ``choices`` of a non-default type)."""


def open_input(src: str | Path, opts: ConvertOptions) -> Checkpoint:
    """Open ``src`` with the reader that recognises it, among ``opts.inputs`` when the command restricts them.

    An input no allowed reader recognises goes to the first allowed one, which says what is wrong with it
    (gguf-to-hf: the GGUF reader; orig-to-*: the gemma_pytorch reader); another readable format is refused
    with the command to use instead."""
    path, allowed = Path(src), opts.inputs
    try:
        fmt = allowed[0] if allowed is not None and len(allowed) == 1 else detect_format(path)
    except UnknownFormatError:
        if allowed is None:
            raise
        fmt = allowed[0]
    if allowed is not None and fmt not in allowed:
        wanted = (f"an original one ({', '.join(ORIGINALS)})" if set(allowed) == set(ORIGINALS)
                  else " or ".join(allowed))
        raise UnknownFormatError(f"this is a {fmt} checkpoint, not {wanted}; use `gemma2-convert convert` for it",
                                 path)
    options: dict[str, Any] = {"options": opts.shape}
    if opts.tokenizer is not None:
        options["tokenizer"] = opts.tokenizer
    return open_checkpoint(path, format=fmt, **options)


def source_paths(ckpt: Checkpoint) -> list[Path]:
    """The checkpoint path and its files (a split GGUF's parts): what an output may never replace."""
    return [ckpt.path, *source_files(ckpt), *ckpt.parts]


LOSSLESS_TOKENS = 8
"""Tokens per prompt of a lossless conversion's logits check: enough positions for every part of the forward
the config controls (attention over several positions, RoPE, both softcaps, the head) to run."""
LOSSY_TOKENS = 64
"""Tokens per prompt when the logits are the evidence (a cast that rounds, a quantized output)."""


def verify_plan(tolerance: Tolerance, opts: ConvertOptions) -> tuple[int, str]:
    """(tokens per prompt, compute mode) of a conversion's verification. A lossless plan (every tensor equal
    to its source after an exact cast, identical logits) passes only when every tensor and every forward field
    of the config are equal, and then the logits are equal for any input by construction: a confirmation, run
    on ``LOSSLESS_TOKENS`` in the fast mode (its verdict on equal weights is the exact mode's,
    ``pipeline.compute``). Otherwise the logits measure the loss: ``LOSSY_TOKENS`` in float32, as
    ``verify``."""
    lossless = tolerance.lossless
    return opts.n_tokens or (LOSSLESS_TOKENS if lossless else LOSSY_TOKENS), "fast" if lossless else "exact"


class SourceCheck:
    """The source's checksums (its reader's ``integrity``: a gemma_pytorch zip's CRC-32s) computed in a
    thread while the output is written: the write mostly waits on the disk, the checksums on the CPU, so they
    overlap. ``result()`` waits for them and raises what they found; after a failed write nobody waits."""

    def __init__(self, ckpt: Checkpoint) -> None:
        integrity = READERS[ckpt.format].integrity
        self.error: BaseException | None = None
        self.thread = None if integrity is None else threading.Thread(
            target=self._run, args=(integrity, ckpt), name="source-checksums", daemon=True)
        if self.thread is not None:
            self.thread.start()

    def _run(self, integrity: Callable[[Checkpoint], None], ckpt: Checkpoint) -> None:
        try:
            integrity(ckpt)
        except BaseException as e:  # noqa: BLE001 -- raised again by result(), in the caller's thread
            self.error = e

    def result(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error


def verify_output(src: Checkpoint, written: Path, final: Path, writer: Writer, tolerance: Tolerance,
                  opts: ConvertOptions, progress: Progress,
                  on_report: Callable[[VerifyReport], None] | None = None,
                  checksums: SourceCheck | None = None) -> VerifyReport:
    """The source's checksums (``checksums``: started during the write; None: computed now), then every
    tensor and the reference logits of ``written`` against ``src`` (``verify_plan``); ``on_report`` sees the
    report before a failure raises (the CLI prints it)."""
    with progress.phase("verifying: source checksums"):
        (checksums or SourceCheck(src)).result()
    out = open_checkpoint(written, format=writer.reads_back_as)
    tokens, mode = verify_plan(tolerance, opts)
    rep = verify(src, out, tolerance=tolerance, n_tokens=tokens, dtype=COMPUTE[mode], progress=progress)
    rep.b = str(final)
    if rep.passed and mode == "fast":
        rep.proof.append(f"check: a lossless conversion, so equal tensors and configs give equal logits for "
                         f"every input; its logits confirm it on {tokens} tokens a prompt in {rep.compute} "
                         f"(`verify` compares {LOSSY_TOKENS} in float32)")
    if on_report is not None:
        on_report(rep)
    require(rep)
    return rep


def _size(path: Path, files: list[str]) -> int:
    return sum((path / n).stat().st_size for n in files) if path.is_dir() else path.stat().st_size


def run_job(ckpt: Checkpoint, out: Path, job: WriteJob, *, directory: bool, force: bool, progress: Progress,
            check: Callable[[Path], R] | None = None, label: str = "writing",
            siblings: re.Pattern[str] | None = None) -> tuple[list[str], R | None]:
    """Write a planned ``job`` into a temporary sibling of ``out`` (free space checked first), run ``check`` on
    it (verification: it raises when the output fails), and only then rename it into place. ``siblings``: the
    output is several files beside ``out`` (``Writer.siblings``), written into a temporary directory, checked
    from the first, and moved into place together."""
    result = None
    with atomic_output(out, force, directory=directory, need_bytes=job.need_bytes, inputs=source_paths(ckpt),
                       siblings=siblings) as tmp:
        target = tmp if siblings is None else tmp / out.name
        with progress.phase(label, job.source_bytes):
            files = job.write(target, progress) or [out.name]
        if check is not None:
            result = check(target if siblings is None else tmp / files[0])
    return files, result


def convert(src: str | Path, out: str | Path, opts: ConvertOptions, progress: Progress = SILENT,
            on_report: Callable[[VerifyReport], None] | None = None) -> ConvertResult:
    """Convert the checkpoint ``src`` (any readable format) to ``opts.to`` at ``out``, verified."""
    t0 = time.perf_counter()
    out = Path(out)
    writer = get_writer(opts.to)
    siblings = writer.siblings(out, opts) if writer.siblings is not None else None
    check_output(out, opts.force, [src, *opts.adapters], siblings)  # fail before reading a large checkpoint
    notes = Warnings(progress)
    ckpt, adapted = with_adapters(open_input(src, opts), opts.adapters, notes)
    # a quantized source kept quantized in compressed-tensors (``--keep-quantized``): the hf writer's other form
    job = (writer.name == "hf" and prepare_compressed_transcode(ckpt, opts, notes)) or writer.prepare(ckpt, opts, notes)
    if adapted:
        job.details["adapters"] = adapted
        if writer.name == "hf":
            carry_tokenizer_files(job, opts.adapters)

    checksums = SourceCheck(job.source or ckpt) if opts.verify else None  # while the output is written

    def check(tmp: Path) -> VerifyReport:
        final = out if siblings is None else out.parent / tmp.name
        return verify_output(job.source or ckpt, tmp, final, writer, job.tolerance, opts, notes, on_report,
                             checksums)

    files, report = run_job(ckpt, out, job, directory=writer.directory, force=opts.force, progress=notes,
                            check=check if opts.verify else None, siblings=siblings)
    config_from = ckpt.metadata.get("config_from") or ("GGUF metadata" if ckpt.format == "gguf" else "stored config")
    output, nbytes = ((out, _size(out, files)) if siblings is None else
                      (out.parent / files[0], sum((out.parent / n).stat().st_size for n in files)))
    return ConvertResult(output, writer.name, sorted(files), nbytes, job.config, config_from, report,
                         notes.messages, time.perf_counter() - t0, job.details)


ORIGINALS = tuple(name for name, r in READERS.items() if r.original)
"""Readers of Google's original layouts: what the orig-to-* commands accept."""


def original_options(to: str, command: str, shape: ShapeOptions | None, **options: Any) -> ConvertOptions:
    """The options of an orig-to-* command: the original formats in, ``to`` out."""
    return replace(ConvertOptions(to=to, command=command, inputs=ORIGINALS, shape=shape), **options)


def orig_to_hf(ckpt: str | Path, out: str | Path, *, shape: ShapeOptions | None = None, progress: Progress = SILENT,
               on_report: Callable[[VerifyReport], None] | None = None, **options: Any) -> ConvertResult:
    """gemma_pytorch / Orbax checkpoint → Hugging Face model directory (``options``: ConvertOptions fields)."""
    return convert(ckpt, out, original_options("hf", "orig-to-hf", shape, **options), progress, on_report)


def orig_to_safetensors(ckpt: str | Path, out: str | Path, *, shape: ShapeOptions | None = None,
                        progress: Progress = SILENT, on_report: Callable[[VerifyReport], None] | None = None,
                        **options: Any) -> ConvertResult:
    """gemma_pytorch / Orbax checkpoint → one safetensors file with the config in its metadata."""
    return convert(ckpt, out, original_options("safetensors", "orig-to-safetensors", shape, **options), progress,
                   on_report)
