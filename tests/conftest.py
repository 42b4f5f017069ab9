"""Shared fixtures: tiny random Gemma 2 models built with transformers, under fixed seeds."""

from __future__ import annotations

import pytest
import torch

from reference.config import Gemma2Config

# Tiny configs covering MHA, GQA (N = 2K and N = 4K), head_dim != H/N, query_pre_attn_scalar != head_dim.
TINY_CONFIGS = {
    "mha": Gemma2Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                        num_attention_heads=3, num_key_value_heads=3, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, max_position_embeddings=128, torch_dtype="float32"),
    "gqa2": Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                         sliding_window=8, max_position_embeddings=128, torch_dtype="float32"),
    "gqa4": Gemma2Config(vocab_size=112, hidden_size=40, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
                         sliding_window=6, max_position_embeddings=128, attn_logit_softcapping=3.0,
                         final_logit_softcapping=4.0, torch_dtype="float32"),
}


def hf_config(cfg: Gemma2Config):
    """A transformers Gemma2Config with eager attention (SDPA drops the softcap in some versions)."""
    import transformers

    hc = transformers.Gemma2Config(**cfg.to_hf_dict())
    hc._attn_implementation = "eager"
    return hc


def make_hf_model(cfg: Gemma2Config, seed: int = 0, scale: float = 1.0):
    """A random transformers Gemma2ForCausalLM with non-zero norm weights and lively attention."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.endswith("proj.weight"):
                p.copy_(torch.randn_like(p) * scale / p.shape[1] ** 0.5)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict a save_pretrained would write (tied lm_head dropped)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)
    return sd


def with_slow(values, *slow):
    """``values`` for ``pytest.mark.parametrize`` with those in ``slow`` marked ``slow``: the full suite runs
    them, the fast tier (``pytest -m "not slow"``) leaves them out."""
    return [pytest.param(v, marks=pytest.mark.slow) if v in slow else v for v in values]


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_cfg(request) -> Gemma2Config:
    return TINY_CONFIGS[request.param]


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """torch on one thread for a module: results do not depend on the thread count, and one thread avoids
    stalls on a shared, busy machine (use: ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
