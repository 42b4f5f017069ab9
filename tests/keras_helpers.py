"""What the Keras tests share: the tiny configs, and KerasHub on the torch backend (the real client) building,
running and saving random Gemma 2 backbones. keras reads KERAS_BACKEND when first imported, so it is imported
only inside ``load_keras_hub`` and the functions below (never at module top)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.keras_writer import keras_args
from reference.config import Gemma2Config

VOCAB = 512  # the tiny SentencePiece model's size
# GQA with head_dim ≠ hidden/heads, small softcaps so they act; MHA; the hidden/heads query scale (27B-like).
CONFIGS = {
    "gqa": Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                        sliding_window=8, attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
                        torch_dtype="float32"),
    "mha": Gemma2Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=6, torch_dtype="float32"),
    "hidden_over_heads": Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=3.0,
                                      final_logit_softcapping=4.0, torch_dtype="float32"),
}
TOL = 1e-4
"""fp32 logits of two implementations of the same model."""


def report(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    i = int(d.argmax())
    at = f"({a.flatten()[i].item():.6g} vs {b.flatten()[i].item():.6g})"
    return f"max |Δ| {d.max().item():.3g} at flat index {i} {at}"


def ids_for(cfg: Gemma2Config, seed: int = 1) -> torch.Tensor:
    n = 4 * cfg.sliding_window + 5  # past three windows
    return torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def lazy(sd: dict[str, torch.Tensor]) -> dict[str, LazyTensor]:
    return {k: LazyTensor.of(v) for k, v in sd.items()}


def load_keras_hub():
    """KerasHub on the torch backend (a real client of the test extra: missing is a failure, not a skip)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras_hub as kh
    import keras

    if keras.config.backend() != "torch":
        pytest.skip(f"keras was imported with the {keras.config.backend()} backend; these tests need "
                    "KERAS_BACKEND=torch")
    return kh


def randomize(backbone, seed: int) -> None:
    """Random weights with lively attention (KerasHub initialises norm scales to zero)."""
    g = torch.Generator().manual_seed(seed)
    for v in backbone.weights:
        shape = tuple(v.shape)
        if len(shape) == 1:
            x = torch.randn(shape, generator=g) * 0.3
        elif "embedding" in v.path:
            x = torch.randn(shape, generator=g)
        else:
            fan_in = shape[0] * shape[1] if "attention_output" in v.path else shape[-2]
            x = torch.randn(shape, generator=g) / fan_in ** 0.5
        v.assign(x.numpy())


def kerashub_backbone(keras_hub, cfg: Gemma2Config, seed: int = 0, dtype: str = "float32"):
    backbone = keras_hub.models.GemmaBackbone(**keras_args(cfg), dtype=dtype)
    randomize(backbone, seed)
    return backbone


def kerashub_logits(keras_hub, backbone, ids: torch.Tensor) -> torch.Tensor:
    """GemmaCausalLM's own forward (final softcap included) on ``ids``, fp32."""
    import keras

    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    x = {"token_ids": ids.numpy().astype("int32"), "padding_mask": torch.ones_like(ids).numpy().astype("int32")}
    return torch.from_numpy(keras.ops.convert_to_numpy(lm(x))).float()


def keras_variable(backbone, name: str):
    """The backbone's variable a file path names: the path is the owning objects' attribute names, the
    layers numbered per class (``layers/gemma_decoder_block_2/attention/query_dense/vars/0``)."""
    _, layer, *attrs, _, index = name.split("/")
    if layer == "reversible_embedding":
        obj = backbone.token_embedding
    elif layer == "rms_normalization":
        obj = backbone.layer_norm
    else:
        obj = backbone.transformer_layers[int(layer.rpartition("_")[2]) if layer.count("_") > 2 else 0]
    for a in attrs:
        obj = getattr(obj, a)
    return obj.weights[int(index)]


def save_causal_lm(keras_hub, backbone, spm: Path, out: Path) -> Path:
    """``GemmaCausalLM.save_to_preset``: the backbone with its tokenizer and preprocessor, as Kaggle ships them."""
    tokenizer = keras_hub.models.GemmaTokenizer(proto=str(spm))
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone,
                                        preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tokenizer))
    lm.save_to_preset(str(out))
    return out


def transformers_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits
