"""Q4_0 / Q4_1 / Q5_0 / Q5_1 with an importance matrix: llama.cpp's ``quantize_row_q{4,5}_{0,1}_impl``.

Per 32-block, the error weights are ``qw_j · sqrt(sigma2 + x_j²)`` with ``sigma2 = Σx²/n_per_row`` over
the whole row and ``qw`` the per-column importance (mean squared input activation); Q4_0 then runs
``make_qx_quants(32, 8, …, rmse_type 1, weights)`` and Q4_1 ``make_qkx3_quants(32, 15, …, -0.9, 0.05, 36)``;
Q5_0 / Q5_1 the same with ``nmax`` 16 / 31 (ggml/src/ggml-quants.c; ../shared/spec/QUANT_FORMATS.md §1.2–1.3).
The blocks are stock Q4_0 / Q4_1 / Q5_0 / Q5_1:
llama.cpp decodes them as usual, the gain is in the choice of scales and codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant import gguf_kquants as kq
from quant import gguf_legacy as lg

QK = 32


def _element_major(x: Tensor) -> Tensor:
    """``[rows, cols]`` → ``[32, rows·cols/32]`` (one column per block), as the K-quant searches take it."""
    return x.reshape(-1, QK).T.contiguous()


def _weights(x: Tensor, quant_weights: Tensor) -> Tensor:
    """``qw_j · sqrt(sigma2 + x_j²)``, ``sigma2`` per row; ``x [rows, cols]`` float32."""
    sigma2 = kq.seq_sum(x * x, dim=1) / x.shape[1]  # [rows]
    return quant_weights.to(torch.float32)[None, :] * kq.sqrt_f32(sigma2[:, None] + x * x)


def _symmetric(w: Tensor, quant_weights: Tensor, nmax: int, pack) -> Tensor:
    """``quantize_row_q{4,5}_0_impl``: ``make_qx_quants`` with the error weights, per block of 32."""
    x = w.to(torch.float32)
    rows, cols = x.shape
    scale, levels = kq.make_qx_quants(_element_major(x), nmax, _element_major(_weights(x, quant_weights)))
    d = scale.to(torch.float16).reshape(rows, cols // QK)
    return pack(d, levels.T.to(torch.uint8).reshape(rows, cols // QK, QK))


def _with_min(w: Tensor, quant_weights: Tensor, nmax: int, pack) -> Tensor:
    """``quantize_row_q{4,5}_1_impl``: ``make_qkx2_quants`` with the error weights; ``m = -the_min``."""
    x = w.to(torch.float32)
    rows, cols = x.shape
    scale, the_min, levels = kq.make_qkx2_quants(_element_major(x), _element_major(_weights(x, quant_weights)),
                                                 nmax, -0.9, 0.05, 36)
    d = scale.to(torch.float16).reshape(rows, cols // QK)
    m = the_min.neg().to(torch.float16).reshape(rows, cols // QK)
    return pack(d, m, levels.T.to(torch.uint8).reshape(rows, cols // QK, QK))


def quantize_q4_0_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """float ``[rows, cols]`` → Q4_0 bytes ``[rows, cols/32·18]``."""
    return _symmetric(w, quant_weights, 8, lg.pack_q4_0)


def quantize_q4_1_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """float ``[rows, cols]`` → Q4_1 bytes ``[rows, cols/32·20]``."""
    return _with_min(w, quant_weights, 15, lg.pack_q4_1)


def quantize_q5_0_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """float ``[rows, cols]`` → Q5_0 bytes ``[rows, cols/32·22]``: Q4_0's search with ``nmax`` 16."""
    return _symmetric(w, quant_weights, 16, lg.pack_q5_0)


def quantize_q5_1_imatrix(w: Tensor, quant_weights: Tensor) -> Tensor:
    """float ``[rows, cols]`` → Q5_1 bytes ``[rows, cols/32·24]``: Q4_1's search with ``nmax`` 31."""
    return _with_min(w, quant_weights, 31, lg.pack_q5_1)


def with_imatrix(ref, impl):
    """A codec quantize function: the reference path without ``quant_weights``, ``impl`` with them."""

    def quantize(w: Tensor, quant_weights: Tensor | None = None) -> Tensor:
        return ref(w) if quant_weights is None else impl(w, quant_weights)

    return quantize
