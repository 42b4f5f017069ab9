"""The compute dtype of verification's forward passes: exact (float32) or fast (bfloat16), and what fast costs.

exact: float32, the reference forward identical to transformers eager (tests/test_reference_parity.py).
fast: bfloat16 weights and activations with the same precision policy as transformers' bf16 path (norms,
softmax, softcapped logits in float32): no cast of bf16 files, and bf16 matmuls (several times float32's rate
on CPUs with AVX512-BF16 or AMX). Both models run the same computation, so a lossless conversion (tensors
equal under the mapping, configs equivalent) still gives identical logits and the same verdict. What fast
changes is the size of a *real* difference: each model's logits move by bf16 rounding, measured below.
"""

from __future__ import annotations

import dataclasses

import torch

from gemma2_convert.formats.tolerance import Tolerance

COMPUTE = {"exact": torch.float32, "fast": torch.bfloat16}

FAST_BOUND = {"max_abs_logits": 0.75, "mean_kl": 5e-4, "top1": 0.97, "ppl_rel": 5e-3}
"""Fast against exact logits of the same model, the stated bound (tests/test_verify_fast.py holds it). Measured
on the trained fixture (tests/fixtures/gemma2-tiny-trained, 2026-12-07): default prompts max |Δ| 0.31, mean KL
1.6e-4, top-1 98.4 %, perplexity 0.13 % apart; 2,040 positions of eval.txt: max |Δ| 0.43, KL 2.0e-4, top-1
98.1 %, perplexity 0.004 % apart."""


def fast_tolerance(tol: Tolerance) -> Tolerance:
    """``tol`` for the fast mode: lossy bounds widened by the measured bf16 noise (KL by ``FAST_BOUND``'s
    mean_kl, top-1 by its shortfall from 100 %); exact and cast bounds unchanged (equal weights compute
    identical logits in any dtype)."""
    if tol.tensors_equal:
        return tol
    return dataclasses.replace(tol, max_kl=tol.max_kl + FAST_BOUND["mean_kl"],
                               min_top1=tol.min_top1 - (1.0 - FAST_BOUND["top1"]))
