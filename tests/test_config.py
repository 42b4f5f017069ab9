"""Gemma2Config: presets, config.json round trips, and errors that name the problem."""

from __future__ import annotations

import json

import pytest

from gemma2_convert.core.errors import ConfigError
from reference.config import FULL, SLIDING, Gemma2Config

# The published google/gemma-2-2b config.json (transformers 4.44.2 era; spec §4.3).
PUBLISHED_2B = {
    "_name_or_path": "google/gemma-2-2b", "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.44.2", "use_cache": True, "vocab_size": 256000,
}
# gemma-2-27b as re-serialised by transformers 5 (rope_parameters spelling, legacy sliding_window_size).
PUBLISHED_27B_V5 = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 128, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 4608, "initializer_range": 0.02,
    "intermediate_size": 36864, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 32,
    "num_hidden_layers": 46, "num_key_value_heads": 16, "pad_token_id": 0, "query_pre_attn_scalar": 144,
    "rms_norm_eps": 1e-06, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "sliding_window": 4096, "sliding_window_size": 4096, "dtype": "float32", "vocab_size": 256000,
    "_attn_implementation": "eager",
}


def test_presets_have_published_values():
    assert Gemma2Config.preset("9b").query_pre_attn_scalar == 256
    c27 = Gemma2Config.preset("27b")
    assert (c27.query_pre_attn_scalar, c27.head_dim) == (144, 128)
    c2 = Gemma2Config.preset("2b")
    assert (c2.num_hidden_layers, c2.hidden_size, c2.q_dim, c2.kv_dim) == (26, 2304, 2048, 1024)
    for name in ("2b", "9b", "27b"):
        c = Gemma2Config.preset(name)
        assert c.layer_types[:3] == (SLIDING, FULL, SLIDING)  # layer 0 is local
        assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.sliding_window) == (50.0, 30.0, 4096)
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.vocab_size) == (2, 1, 0, 256000)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown preset '7b'.*'27b'.*'2b'.*'9b'.*'tiny'"):
        Gemma2Config.preset("7b")


@pytest.mark.parametrize("published", [PUBLISHED_2B, PUBLISHED_27B_V5], ids=["2b", "27b-v5"])
def test_round_trips_published_config(published):
    cfg = Gemma2Config.from_hf_dict(published)
    out = cfg.to_hf_dict()
    assert Gemma2Config.from_hf_dict(out) == cfg
    for k, v in published.items():
        if k in ("rope_parameters", "dtype"):
            continue
        assert out[k] == v, f"{k}: wrote {out[k]!r}, published {v!r}"
    assert out["rope_theta"] == 10000.0 and out["torch_dtype"] == "float32"


def test_published_configs_match_presets():
    assert Gemma2Config.from_hf_dict(PUBLISHED_2B).replace(torch_dtype="bfloat16") == Gemma2Config.preset("2b")
    assert Gemma2Config.from_hf_dict(PUBLISHED_27B_V5).replace(torch_dtype="bfloat16") == Gemma2Config.preset("27b")


def test_missing_required_key_is_named(tmp_path):
    d = dict(PUBLISHED_2B)
    del d["query_pre_attn_scalar"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json: config is missing required key\(s\) query_pre_attn_scalar"):
        Gemma2Config.from_json_file(p)


def test_wrong_model_type_and_bad_values():
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Gemma2Config.from_hf_dict({**PUBLISHED_2B, "model_type": "llama"})
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads 3"):
        Gemma2Config.from_hf_dict({**PUBLISHED_2B, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="layer_types has 2 entries"):
        Gemma2Config.from_hf_dict({**PUBLISHED_2B, "layer_types": [SLIDING, FULL]})


def test_explicit_null_softcap_disables_it():
    c = Gemma2Config.from_hf_dict({**PUBLISHED_2B, "attn_logit_softcapping": None})
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping == 30.0


def test_transformers_reads_our_config():
    import transformers

    for name in ("2b", "9b", "27b", "tiny"):
        ours = Gemma2Config.preset(name)
        hc = transformers.Gemma2Config(**ours.to_hf_dict())
        assert hc.query_pre_attn_scalar == ours.query_pre_attn_scalar
        assert hc.head_dim == ours.head_dim
        assert list(hc.layer_types) == list(ours.layer_types)
        assert hc.rope_parameters["rope_theta"] == ours.rope_theta
