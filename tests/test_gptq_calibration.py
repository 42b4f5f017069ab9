"""GPTQ's calibration defaults: a token budget for the calibration sequences, act-order with static groups.

Numbers asserted: the budget gives 112 sequences of 128 tokens on the trained fixture (8 before) and never
fewer than 8; on that fixture, layer by layer through the quantized layers, the defaults (all sequences,
act-order, scales refit to the codes) give at most 0.7× the held-out KL of int4 g128 of the stop-24 settings
(8 sequences, natural column order, GPTQ's own scales).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma2_convert.formats import open_checkpoint
from gemma2_convert.pipeline.calibrate import (
    CALIBRATION_TOKENS,
    SequentialGPTQ,
    calibration_ids,
)
from quant.gptq_scales import ROUNDS
from tests.held_out import decoder_kl

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"


def test_calibration_budget() -> None:
    ckpt = open_checkpoint(MODEL)
    text = CAL.read_text()
    ids = calibration_ids(ckpt, text, 128)
    assert tuple(ids.shape) == (112, 128)  # all the text, in 127-token bodies after <bos>
    assert bool((ids[:, 0] == ckpt.config.bos_token_id).all())
    assert calibration_ids(ckpt, text, 128, 8).shape[0] == 8
    assert CALIBRATION_TOKENS // 2048 == 8  # the 2B/9B/27B keep their 8 × 2048 sequences
    assert calibration_ids(ckpt, text, 4096).shape[0] == 3  # a long sequence: what the text holds


def held_out_kl(ckpt, ids: torch.Tensor, act_order: bool, refine: int | None = ROUNDS) -> float:
    return decoder_kl(ckpt, "gptq", lambda layers: SequentialGPTQ(
        ckpt, layers, ids, scale_dtype=torch.bfloat16, act_order=act_order, refine=refine).result)


@pytest.mark.slow
def test_defaults_beat_stop24_gptq_by_0_7() -> None:
    """The defaults (all calibration sequences, act-order, scales refit to the codes:
    ``quant/gptq_scales.py``) give at most 0.7× the stop-24 settings' held-out KL (8 sequences, natural column
    order, GPTQ's own scales) on all of eval.txt (57 windows of 256): the issue's compressed-tensors goal.
    Measured 2026-12-08: 0.907e-4 vs 1.762e-4 (0.51×); over four calibration subsets (all 112 sequences, the
    first 111, the text from token 40 or 80) 0.49–0.53×, without the refit 0.45–0.59×; on a second model not
    tuned on (``tools/train_fixture.py --seed 1 --steps 150``) 0.50–0.59× with the refit, 0.54–0.68×
    without. With the calibration forward in bfloat16 (``calibration_dtype``, 2026-12-08 05:09, both sides):
    0.982e-4 vs 1.816e-4 (0.54×)."""
    ckpt = open_checkpoint(MODEL)
    text = CAL.read_text()
    old = held_out_kl(ckpt, calibration_ids(ckpt, text, 128, 8), act_order=False, refine=None)
    new = held_out_kl(ckpt, calibration_ids(ckpt, text, 128), act_order=True)
    assert new <= 0.7 * old, f"gptq defaults KL {new:.3e} vs stop-24 settings {old:.3e}: {new / old:.2f}×"
