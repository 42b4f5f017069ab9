"""Tiny PEFT adapters made by peft itself on tiny random transformers models (tests only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from reference.config import Gemma2Config
from tests.conftest import TINY_CONFIGS, make_hf_model

CASES = {
    "lora": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora": {"target_modules": "all-linear", "use_rslora": True, "lora_alpha": 16},
    "dora": {"target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"], "use_dora": True},
    "all_linear": {"target_modules": "all-linear", "rank_pattern": {"o_proj": 2},
                   "alpha_pattern": {"gate_proj": 3}},
    "lm_head": {"target_modules": ["lm_head", "q_proj"]},
    "embed": {"target_modules": ["embed_tokens", "v_proj"]},
    "added_tokens": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]},
}
"""Adapter kinds: keyword arguments of ``peft.LoraConfig`` (r 4, alpha 8 unless given)."""
ADDED = 3
"""Tokens added by the ``added_tokens`` case (its vocabulary grows by this many rows)."""


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-zero updates: PEFT initialises lora_B (and the embedding's A) to zero, so the delta would be
    nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


CFG = TINY_CONFIGS["gqa2"].replace(vocab_size=512)
"""GQA, query_pre_attn_scalar 24 ≠ head_dim 32 at 4 layers (llama.cpp assumes head_dim there: the GGUF folds),
and a vocabulary the tiny SentencePiece model fills."""


def make_adapter(tmp: Path, kind: str, seed: int = 0, cfg: Gemma2Config = CFG, tokenizer: Path | None = None):
    """Save the base model at ``tmp/base`` (with a copy of ``tokenizer``, which GGUF outputs need) and a peft
    adapter of ``kind`` at ``tmp/<kind>``; return the peft model (unmerged, float32, eval) and both paths."""
    import peft

    model = make_hf_model(cfg, seed)
    base = tmp / "base"
    if not base.exists():
        model.save_pretrained(base)
        if tokenizer is not None:
            shutil.copy(tokenizer, base / "tokenizer.model")
    if kind == "added_tokens":
        model.resize_token_embeddings(cfg.vocab_size + ADDED, mean_resizing=False)
    kw = {"r": 4, "lora_alpha": 8, **CASES[kind]}
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    randomize(pm, seed + 1)
    pm.eval()
    out = tmp / kind
    pm.save_pretrained(out)
    return pm, base, out


def scaled_copy(adapter: Path, out: Path, factor: float) -> Path:
    """A copy of ``adapter`` with ``lora_alpha`` multiplied by ``factor`` (a wrong merge, for verify to
    catch)."""
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= factor
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def tiny_tokenizer(tmp_path_factory) -> Path:
    """The tiny SentencePiece model for CFG's vocabulary (training takes seconds: use a module-scoped
    fixture)."""
    return make_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", CFG.vocab_size)
