"""The reference forward pass against transformers' eager Gemma2ForCausalLM."""

from __future__ import annotations

import pytest
import torch

from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model


def _diff_report(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    idx = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))
    return f"max |Δ| {d.max().item():.3e} at {idx}: ours {a[idx].item():.6f} vs transformers {b[idx].item():.6f}"


def _ids(cfg, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_fp32_logits_match_transformers(name):
    cfg = TINY_CONFIGS[name]
    hf = make_hf_model(cfg)
    ours = Gemma2ForCausalLM.from_tensors(cfg, hf_state_dict(hf))
    T = 3 * cfg.sliding_window + 5  # crosses the window several times
    ids = _ids(cfg, 2, T)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    got = ours(ids)
    assert got.shape == (2, T, cfg.vocab_size)
    assert (got - ref).abs().max() <= 1e-4, _diff_report(got, ref)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_fp32_left_padding(name):
    """A left-padded batch: real positions match transformers given the same position ids, and
    match the unpadded sequence run alone."""
    cfg = TINY_CONFIGS[name]
    hf = make_hf_model(cfg, seed=3)
    ours = Gemma2ForCausalLM.from_tensors(cfg, hf_state_dict(hf))
    T, pad = 3 * cfg.sliding_window, 5
    ids = _ids(cfg, 2, T, seed=4)
    ids[1, :pad] = cfg.pad_token_id
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits.float()
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4, _diff_report(got[real], ref[real])
    alone = ours(ids[1:, pad:])
    assert (got[1, pad:] - alone[0]).abs().max() <= 1e-4, _diff_report(got[1, pad:], alone[0])


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_bf16_matches_transformers(name, tmp_path):
    """bf16 as users run it: transformers' from_pretrained(dtype=bf16) vs ours on the same directory."""
    import transformers

    cfg = TINY_CONFIGS[name]
    make_hf_model(cfg, seed=5).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                           attn_implementation="eager")
    ours = from_pretrained(tmp_path, Gemma2ForCausalLM, dtype=torch.bfloat16)
    ids = _ids(cfg, 2, 3 * cfg.sliding_window + 2, seed=6)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    got = ours(ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    report = f"bf16 top-1 agreement {agree:.4f}; " + _diff_report(got, ref)
    assert agree >= 0.99, report
    assert (got - ref).abs().max() <= 0.125, report  # at most one bf16 ulp of a logit near the softcap


def test_sliding_window_is_on_even_layers_only():
    """Changing the window changes the logits only through the even (sliding) layers: a model
    whose even layers are full attention differs from the reference beyond the window."""
    cfg = TINY_CONFIGS["gqa2"]
    hf = make_hf_model(cfg)
    sd = hf_state_dict(hf)
    ids = _ids(cfg, 1, 3 * cfg.sliding_window)
    ref = Gemma2ForCausalLM.from_tensors(cfg, sd)(ids)
    all_full = cfg.replace(layer_types=("full_attention",) * cfg.num_hidden_layers)
    other = Gemma2ForCausalLM.from_tensors(all_full, sd)(ids)
    W = cfg.sliding_window
    assert torch.equal(ref[:, :W], other[:, :W])  # inside the window nothing differs
    assert (ref[:, W:] - other[:, W:]).abs().max() > 1e-3
