"""``gemma2-quantize --format gguf``'s GGUF-only options: ``--imatrix`` and the split limits.

With ``--imatrix FILE`` the per-column importance of every weight comes from the file (llama.cpp's
``in_sum2 / counts``, ``formats.gguf.imatrix``) instead of being measured on calibration text, so the mse
method's blocks are exactly ``llama-quantize --imatrix``'s (llama.cpp's importance-weighted search, fed the same
weights); a weight without an entry gets llama.cpp's reference quantizer, as llama-quantize gives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from gemma2_convert.core.errors import ConfigError, name_list
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.gguf.imatrix import read_imatrix
from gemma2_convert.formats.gguf.names import gguf_name
from gemma2_convert.formats.registry import Checkpoint
from quant.policy import EMBEDDING_NAMES
from quant.spec import QuantSpec

IMATRIX_METHODS = ("mse", "hqq")
"""The methods that weight their search with a per-column importance (rtn has none; gptq its own Hessian)."""


CODE_METHODS = ("hqq", "gptq", "autoround")
"""The methods whose own scales and codes go into the GGUF blocks (Q4_0 / Q4_1 / Q8_0; not Q4_K)."""


class GGUFQuantizeOptions(Protocol):
    """The fields of ``pipeline.quantize.QuantizeOptions`` read here."""

    format: str
    method: str
    imatrix: Path | None
    split_max_size: str | int | None
    split_max_tensors: int | None
    bits: int

    def group(self) -> int | None: ...


def is_split(opts: GGUFQuantizeOptions) -> bool:
    """The output is a split GGUF set (either limit is given)."""
    return opts.split_max_size is not None or opts.split_max_tensors is not None


def check_gguf_options(opts: GGUFQuantizeOptions) -> None:
    """Refuse ``--imatrix`` and the split limits where they mean nothing, before any work."""
    if opts.format != "gguf" and (is_split(opts) or opts.imatrix is not None):
        flag = "--imatrix" if opts.imatrix is not None else "--split-max-size / --split-max-tensors"
        raise ConfigError(f"{flag} is for --format gguf (llama.cpp's files); --format hf shards by itself"
                          + ("" if opts.imatrix is None else " and measures importance on --calibration text"))
    if opts.imatrix is not None and opts.method not in IMATRIX_METHODS:
        raise ConfigError(f"--imatrix weights the scale search of --method {' or '.join(IMATRIX_METHODS)}; "
                          f"--method {opts.method} does not use one (use --method mse: llama-quantize's search)")
    group = opts.group()
    if (opts.format == "gguf" and opts.bits == 4 and group != 32 and opts.method in CODE_METHODS
            and getattr(opts, "bpw", None) is None and getattr(opts, "target_size", None) is None):
        raise ConfigError(f"--method {opts.method} writes its own codes into Q4_0 / Q4_1 blocks (--group-size 32); "
                          f"a group of {group} makes Q4_K, whose scales only llama.cpp's search chooses: use "
                          "--group-size 32, or --method mse for Q4_K")
    if opts.imatrix is not None and getattr(opts, "equalize", False):
        raise ConfigError("--imatrix holds the activations of the model as given, but --equalize rescales them; "
                          "leave out one of the two")


def file_importance(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], path: Path,
                    progress: Progress) -> dict[str, torch.Tensor]:
    """HF name -> the imatrix file's importance ``[cols]`` for every quantized weight it has an entry for; a
    length that is not the row length is an error (the file is for another model), a missing entry a warning."""
    im = read_imatrix(path)
    out, missing = {}, []
    for hf, spec in specs.items():
        if spec is None:
            continue
        qw = im.importance(gguf_name(hf))
        cols = ckpt.tensors[hf].shape[-1]
        if qw is not None and qw.numel() != cols:
            raise ConfigError(f"the imatrix entry for {gguf_name(hf)} has {qw.numel()} values, but its rows have "
                              f"{cols} columns: the imatrix was computed for another model", path)
        if qw is None and hf not in EMBEDDING_NAMES:
            missing.append(gguf_name(hf))
        elif qw is not None:
            out[hf] = qw
    if missing:
        progress.warn(f"{path}: no importance data for {len(missing)} quantized tensor(s), quantized without it "
                      f"as llama-quantize does: {name_list(missing)}")
    return out
