"""Activation-aware equalization (AWQ) folded exactly into a Gemma 2 decoder layer: pure functions.

A per-input-channel scale ``s [in] > 0`` moves difficulty from activations to weights: ``x W^T =
(x / s)(W · s)^T``. It is exact only where something before the matmul can absorb ``1 / s``:

* ``input_layernorm`` → q/k/v and ``pre_feedforward_layernorm`` → gate/up: Gemma 2's RMSNorm multiplies by
  ``(1 + w)`` after normalizing (GEMMA2_FORMATS.md §4.7.2), so ``w' = (1 + w) / s − 1`` and the following
  weights' columns ``× s`` give the same output;
* ``up_proj`` → ``down_proj``: ``gelu(gate x) · (up x)`` is linear in ``up x``, so up's rows ``/ s`` and
  down's columns ``× s``;
* ``v_proj`` → ``o_proj``: attention output is ``softmax(q kᵀ) v``, linear in ``v`` per KV head (the
  weights do not depend on v), so v's rows ``/ s`` and o's columns ``× s`` — o's column ``n·D + d`` of query
  head ``n`` takes the scale of its KV head ``n // (N / K)`` (GQA shares a KV head between query heads).

Not foldable (left alone): o_proj's and down_proj's outputs go through the post-norms, whose RMS couples
every channel; q/k rows go through RoPE, which rotates channel pairs.

Scales are chosen as in AWQ: ``s = mean|x|^α`` normalized to a geometric mean-ish centre
(``s / √(max·min)``), ``α`` from a grid by the smallest output error of the quantized weights on
calibration activations. ``α = 0`` (``s = 1``) is in the grid, so the chosen scales never measure worse
than none on the calibration sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHAS = tuple(i / 10 for i in range(11))
"""AWQ's grid of exponents (0 = no scaling)."""

FakeQuant = Callable[[Tensor], Tensor]
"""``w [out, in]`` → its quantize-dequantize round trip (the method's codes decoded), float32."""


def fold_norm(w: Tensor, s: Tensor) -> Tensor:
    """Zero-centred RMSNorm weight ``w [H]`` absorbing ``1 / s``: ``(1 + w) / s − 1`` (float32)."""
    return (1.0 + w.float()) / s - 1.0


def snap_scales(w: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """Scales ``s' ≈ s`` for which the folded norm ``(1 + w) / s' − 1`` is exactly a ``dtype`` value (the norm
    is then stored in its own dtype and a bf16 model loads it without rounding): round the folded norm to
    ``dtype`` and solve for ``s'``. A channel whose rounded ``1 + w'`` is not positive keeps ``s = 1``."""
    one_w = 1.0 + w.double()
    folded = (one_w / s.double() - 1.0).to(dtype).double()
    snapped = one_w / (1.0 + folded)
    ok = (1.0 + folded > 0) & (one_w != 0)
    return torch.where(ok, snapped, torch.ones_like(snapped)).float()


def scale_cols(w: Tensor, s: Tensor) -> Tensor:
    """``w [out, in] · s [in]`` per column (float32)."""
    return w.float() * s[None, :]


def scale_rows(w: Tensor, s: Tensor) -> Tensor:
    """``w [out, in] / s [out]`` per row (float32)."""
    return w.float() / s[:, None]


def o_proj_scales(s_v: Tensor, n_heads: int, n_kv: int) -> Tensor:
    """The o_proj column scales ``[N·D]`` matching v_proj's row scales ``s_v [K·D]`` (query head n reads
    KV head ``n // (N / K)``, as ``repeat_kv`` does)."""
    d = s_v.numel() // n_kv
    per_kv = s_v.view(n_kv, d)                                             # [K, D]
    return per_kv.repeat_interleave(n_heads // n_kv, dim=0).reshape(-1)   # [N·D]


def awq_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """``mean|x|^α`` per channel ``[in]``, centred so ``max · min = 1`` (AWQ's normalization), float32."""
    s = act_mean.float().clamp_min(1e-5).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).clamp_min(1e-4)


def output_error(x: Tensor, weights: Sequence[Tensor], s: Tensor, fake_quant: FakeQuant) -> float:
    """``Σ ‖x Wᵀ − (x / s) Q(W · s)ᵀ‖²`` over ``weights``, ``x [n, in]`` float32."""
    xs = x / s
    err = 0.0
    for w in weights:
        ref = x @ w.float().T                                               # [n, out]
        err += float((ref - xs @ fake_quant(scale_cols(w, s)).T).square().sum())
    return err


def search_scales(x: Tensor, weights: Sequence[Tensor], fake_quant: FakeQuant,
                  alphas: Sequence[float] = ALPHAS, act: Tensor | None = None,
                  expand: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, float, float]:
    """The AWQ scales for the matmuls ``weights`` sharing the input ``x [n, in]``: ``(s, α, error ratio to
    s = 1)``, the error of each ``α`` measured with the quantized weights. ``act``: the channel means the
    scales are made of (default ``mean|x|`` per column); ``expand``: maps them to the ``[in]`` columns
    (o_proj: a KV head's scales repeated for its query heads)."""
    act = x.abs().mean(0) if act is None else act
    grow = expand or (lambda s: s)
    best: tuple[float, float, Tensor] | None = None
    base = 0.0
    for a in alphas:
        s = awq_scales(act, a) if a else torch.ones_like(act)
        e = output_error(x, weights, grow(s), fake_quant)
        base = e if a == 0 else base
        if best is None or e < best[0]:
            best = (e, a, s)
    assert best is not None
    return best[2], best[1], best[0] / base if base else 1.0


@dataclass(frozen=True)
class LayerScales:
    """The four foldable scales of one decoder layer (ones = untouched)."""

    attn: Tensor
    """``[H]``: input_layernorm → q/k/v columns."""
    mlp: Tensor
    """``[H]``: pre_feedforward_layernorm → gate/up columns."""
    down: Tensor
    """``[I]``: up_proj rows → down_proj columns."""
    v: Tensor
    """``[K·D]``: v_proj rows → o_proj columns (per KV head, repeated for its query heads)."""


FOLDED = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "pre_feedforward_layernorm.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
"""The tensors of a decoder layer (names after ``model.layers.i.``) a fold changes; the post-norms stay."""


def fold_tensor(key: str, w: Tensor, sc: LayerScales, n_heads: int, n_kv: int) -> Tensor | None:
    """Tensor ``key`` of a decoder layer (its name after ``model.layers.i.``) with the scales folded in,
    float32; None for a tensor equalization leaves alone (the post-norms)."""
    a = "self_attn."
    rules: dict[str, Callable[[], Tensor]] = {
        "input_layernorm.weight": lambda: fold_norm(w, sc.attn),
        a + "q_proj.weight": lambda: scale_cols(w, sc.attn),
        a + "k_proj.weight": lambda: scale_cols(w, sc.attn),
        a + "v_proj.weight": lambda: scale_rows(scale_cols(w, sc.attn), sc.v),
        a + "o_proj.weight": lambda: scale_cols(w, o_proj_scales(sc.v, n_heads, n_kv)),
        "pre_feedforward_layernorm.weight": lambda: fold_norm(w, sc.mlp),
        "mlp.gate_proj.weight": lambda: scale_cols(w, sc.mlp),
        "mlp.up_proj.weight": lambda: scale_rows(scale_cols(w, sc.mlp), sc.down),
        "mlp.down_proj.weight": lambda: scale_cols(w, sc.down),
    }
    rule = rules.get(key)
    return None if rule is None else rule()
