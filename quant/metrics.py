"""Quality metrics for quantized weights and for logits (../shared/spec/QUANT_FORMATS.md §8).

Weight space (cheap, for unit tests): ``sqnr_db`` (torchao's ``compute_error``) and ``rel_rmse``;
``sqnr_db = -20·log10(rel_rmse)``. Output space (against reference logits): ``kl_divergence``
(llama-perplexity's per-token ``Σ p_ref·(log p_ref - log p_q)``, here over the whole vocabulary
without its log p < -16 cut-off, mean over positions),
``top1_agreement`` ("same top p") and ``perplexity``. Everything is computed in float64. The weight-space
sums run as one compiled pass (``quant/metrics_jit.py``) where numba is installed, unless ``compiled=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from quant import jit

BLOCK_ELEMENTS = 1 << 22
"""Elements per step of ``rel_rmse``: its float64 temporaries stay at a few times 32 MB for any tensor size."""


def rel_rmse(ref: Tensor, approx: Tensor, compiled: bool = True) -> float:
    """``‖ref - approx‖ / ‖ref‖`` (0 when equal; inf for a zero ``ref`` that differs), summed in float64
    over blocks of elements (``compiled``: as :func:`error_sums`)."""
    if ref.shape != approx.shape:
        ref, approx = torch.broadcast_tensors(ref, approx)
    r, a = ref.reshape(-1), approx.reshape(-1)
    return rel_rmse_blocks(((r[i:i + BLOCK_ELEMENTS], a[i:i + BLOCK_ELEMENTS])
                            for i in range(0, r.numel(), BLOCK_ELEMENTS)), compiled)


def rel_rmse_blocks(pairs: Iterable[tuple[Tensor, Tensor]], compiled: bool = True) -> float:
    """:func:`rel_rmse` of a tensor given as matching ``(ref, approx)`` blocks (e.g. rows decoded a few at a time)."""
    return rel_rmse_from_sums(error_sums(ref, approx, compiled) for ref, approx in pairs)


def error_sums(ref: Tensor, approx: Tensor, compiled: bool = True) -> tuple[float, float]:
    """``(Σ(ref - approx)², Σref²)`` of one block, in float64.

    ``compiled`` and numba installed (``quant/jit.py``): one compiled pass over float32 blocks of one shape,
    whose sums may differ from torch's in the last bits; otherwise (and always with False) torch's."""
    if compiled and jit.available() and ref.dtype == approx.dtype == torch.float32 and ref.shape == approx.shape:
        from quant.metrics_jit import error_sums as compiled_sums  # deferred: imports numba

        return compiled_sums(ref, approx)
    rb = ref.double()
    return float((rb - approx.double()).square().sum()), float(rb.square().sum())


def rel_rmse_from_sums(sums: Iterable[tuple[float, float]]) -> float:
    """:func:`rel_rmse` from the :func:`error_sums` of a tensor's blocks (added in the given order)."""
    num = den = 0.0
    for n, d in sums:
        num += n
        den += d
    if num == 0.0:
        return 0.0
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.inf


def sqnr_db(ref: Tensor, approx: Tensor, compiled: bool = True) -> float:
    """Signal-to-quantization-noise ratio ``20·log10(‖ref‖ / ‖ref - approx‖)`` in dB (inf when equal)."""
    return db_from_rel_rmse(rel_rmse(ref, approx, compiled))


def db_from_rel_rmse(e: float) -> float:
    """SQNR in dB from a relative RMSE ``e`` (inf when 0)."""
    return math.inf if e == 0.0 else -20.0 * math.log10(e)


METRIC_ROWS = 16
"""Positions per step of the KL and perplexity sums (float64 rows of a 256k vocabulary: 32 MB a step)."""

def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> float:
    """Mean over positions of ``KL(P‖Q) = Σ_v p·(log p - log q)``; logits ``[..., V]``, P = reference."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logit shapes differ: {list(logits_p.shape)} vs {list(logits_q.shape)}")
    n = math.prod(logits_p.shape[:-1])  # positions
    return kl_sum(logits_p, logits_q) / n if n else math.nan


def kl_sum(logits_p: Tensor, logits_q: Tensor) -> float:
    """``Σ`` over positions of ``KL(P‖Q)`` (``kl_divergence`` times the positions): batches' sums add up."""
    p2, q2 = logits_p.reshape(-1, logits_p.shape[-1]), logits_q.reshape(-1, logits_q.shape[-1])  # [N, V]
    total = 0.0
    for i in range(0, p2.shape[0], METRIC_ROWS):  # float64 temporaries of a few rows, not of [N, 256k]
        lp = torch.log_softmax(p2[i:i + METRIC_ROWS].double(), dim=-1)   # [n, V]
        lq = torch.log_softmax(q2[i:i + METRIC_ROWS].double(), dim=-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


def top1_agreement(logits_p: Tensor, logits_q: Tensor) -> float:
    """Fraction of positions where both argmaxes agree; logits ``[..., V]``."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logit shapes differ: {list(logits_p.shape)} vs {list(logits_q.shape)}")
    return float((logits_p.argmax(-1) == logits_q.argmax(-1)).double().mean())


def perplexity(logits: Tensor, targets: Tensor) -> float:
    """``exp(mean NLL)`` of ``targets[..., p]`` under ``logits[..., p, :]`` (``[..., P]`` and ``[..., P, V]``).

    The targets are already aligned with the positions that predict them: for a causal LM over
    ``ids [T]`` pass ``logits[:-1]`` and ``ids[1:]``.
    """
    if logits.shape[:-1] != targets.shape or targets.numel() == 0:
        raise ValueError(
            f"logits {list(logits.shape)} and targets {list(targets.shape)}: need [..., P, V] and [..., P], P ≥ 1"
        )
    return math.exp(nll_sum(logits, targets) / targets.numel())


def nll_sum(logits: Tensor, targets: Tensor) -> float:
    """``Σ -log p(target)`` over the positions (``perplexity`` is ``exp`` of its mean)."""
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # [N, V], [N]
    total = 0.0
    for i in range(0, flat.shape[0], METRIC_ROWS):
        logp = torch.log_softmax(flat[i:i + METRIC_ROWS].double(), dim=-1)  # [n, V]
        total -= float(logp.gather(-1, tgt[i:i + METRIC_ROWS, None].long()).sum())
    return total
