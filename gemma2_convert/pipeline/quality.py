"""Quality of a quantized checkpoint against its source: KL, top-1 agreement and perplexity on text.

Both models run in the reference (fp32 compute). The quantized one keeps its weights packed and
dequantizes each layer as it runs, so no dense copy of it is ever made.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gemma2_convert.core.memory import fits_resident
from gemma2_convert.core.errors import VerificationError
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.pipeline.verify import (DEFAULT_TEXT, compare_logits, reference_model, sentencepiece_of,
                                            token_windows, track_layers)

DEFAULT_EVAL_TEXT = (DEFAULT_TEXT + "\n\n") * 3
"""Built-in held-out text; pass ``--eval FILE`` for a real evaluation set."""

KL_LIMITS = {8: 0.01, 4: 0.25}
"""Mean KL(source ‖ quantized) above which verification fails; set loose enough for a tiny random model,
tight enough to catch a broken format (wrong scale, nibble order or layout gives KL ≫ 1)."""


def eval_prompts(ckpt: Checkpoint, text: str, seq_len: int, max_seqs: int = 64) -> list[torch.Tensor]:
    """Token windows [1, seq_len] of ``text`` (tokenizer of the source), or seeded random ids without one."""
    sp = sentencepiece_of(ckpt) if ckpt.tokenizer is not None else None
    if sp is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, ckpt.config.vocab_size, (1, seq_len), generator=g) for _ in range(2)]
    return token_windows(sp, ckpt.config, text, seq_len, max_seqs)


def weight_bytes(ckpt: Checkpoint) -> tuple[int, int]:
    """(bytes the reference holds for the weights, bytes of the same weights dense in fp32)."""
    held = sum(t.stored_nbytes if t.packed else t.nbytes for t in ckpt.tensors.values())
    dense = sum(t.numel * 4 for t in ckpt.tensors.values())
    return held, dense


def quality_report(src: Checkpoint, out: Checkpoint, text: str,
                   on_layer: Callable[[int, int], None] | None = None) -> dict:
    """KL / top-1 / perplexities of ``out`` vs ``src`` over ``text``, plus the memory the weights take.
    Small models are held in float32; larger ones stream each layer from the mapped files (the
    quantized weights stay packed either way). ``on_layer(done, total)``: progress per decoder layer."""
    cfg = src.config
    seq_len = min(4 * cfg.sliding_window, cfg.max_position_embeddings, 1024)
    prompts = eval_prompts(src, text, seq_len)
    resident = fits_resident(2 * 4 * sum(t.numel for t in src.tensors.values()))
    models = reference_model(src, torch.float32, resident), reference_model(out, torch.float32, resident)
    if on_layer is not None:
        track_layers(models, len(prompts), on_layer)
    m = compare_logits(*models, prompts)
    held, dense = weight_bytes(out)
    return {**m, "weights_bytes_packed": held, "weights_bytes_dense_fp32": dense}


def check_quality(q: dict, bits: int, path: Path) -> None:
    """VerificationError when the mean KL exceeds the documented limit for ``bits``."""
    limit = KL_LIMITS.get(bits, KL_LIMITS[4])
    if q["mean_kl"] > limit:
        raise VerificationError(
            f"mean KL {q['mean_kl']:.4g} > {limit} (int{bits} limit), top-1 {q['top1']:.2%}; output removed. "
            "Try --method gptq or a smaller --group-size, or --no-verify to keep it anyway", path)
