"""Write KerasHub Gemma 2 preset directories without Keras (h5py only), laid out as KerasHub 0.32.0 /
keras 3.15.1 ``save_to_preset`` writes them: for the bad-input tests, which must run where KerasHub is not
installed. The variables come from HF tensors through the inverses of ``keras_map.KERAS_TO_HF``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import torch

from gemma2_convert.formats import keras_map as km
from reference.config import Gemma2Config


def keras_args(cfg: Gemma2Config) -> dict[str, Any]:
    """The GemmaBackbone arguments of ``cfg`` (its query scale must be head_dim or hidden // heads)."""
    if cfg.query_pre_attn_scalar == cfg.head_dim:
        normalize = True
    elif cfg.query_pre_attn_scalar == cfg.hidden_size // cfg.num_attention_heads:
        normalize = False
    else:
        raise ValueError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} has no KerasHub equivalent")
    return {"name": "gemma_backbone", "trainable": True, "vocabulary_size": cfg.vocab_size,
            "num_layers": cfg.num_hidden_layers, "num_query_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "hidden_dim": cfg.hidden_size,
            "intermediate_dim": 2 * cfg.intermediate_size, "head_dim": cfg.head_dim,
            "layer_norm_epsilon": cfg.rms_norm_eps, "dropout": 0, "query_head_dim_normalize": normalize,
            "use_post_ffw_norm": True, "use_post_attention_norm": True,
            "final_logit_soft_cap": cfg.final_logit_softcapping,
            "attention_logit_soft_cap": cfg.attn_logit_softcapping, "sliding_window_size": cfg.sliding_window,
            "use_sliding_window_attention": True}


def write_config(d: Path, args: Mapping[str, Any], class_name: str = "GemmaBackbone") -> None:
    obj = {"module": "keras_hub.src.models.gemma.gemma_backbone", "class_name": class_name,
           "config": dict(args), "registered_name": f"keras_hub>{class_name}"}
    (d / "config.json").write_text(json.dumps(obj, indent=4))


def write_variable(group: Any, key: str, t: torch.Tensor) -> None:
    """One variable as keras' H5IOStore writes it (bfloat16: 2-byte opaque + ``dtype`` attribute)."""
    if t.dtype == torch.bfloat16:
        ds = group.create_dataset(key, data=t.contiguous().view(torch.int16).numpy().view("V2"))
        ds.attrs["dtype"] = "bfloat16"
    else:
        group.create_dataset(key, data=t.contiguous().numpy())


def keras_variables(sd: Mapping[str, torch.Tensor], cfg: Gemma2Config) -> dict[str, torch.Tensor]:
    """HF tensors → Keras variable paths (the table's inverses)."""
    return {name: rule.inverse(sd[hf], cfg) for name, hf, rule in km.expand(cfg.num_hidden_layers)}


def write_weights(path: Path, variables: Mapping[str, torch.Tensor]) -> Path:
    with h5py.File(path, "w") as f:
        for name, t in variables.items():
            group, _, key = name.rpartition("/")
            write_variable(f.require_group(group), key, t)
    return path


def write_keras_preset(d: Path, sd: Mapping[str, torch.Tensor], cfg: Gemma2Config, *, spm: Path | None = None,
                       **config_changes: Any) -> Path:
    """A preset directory: config.json, model.weights.h5, metadata.json and, given ``spm``, the tokenizer."""
    d.mkdir(parents=True, exist_ok=True)
    write_config(d, {**keras_args(cfg), **config_changes})
    write_weights(d / "model.weights.h5", keras_variables(sd, cfg))
    (d / "metadata.json").write_text(json.dumps({"keras_version": "3.15.1", "keras_hub_version": "0.32.0"}))
    if spm is not None:
        (d / "assets" / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copy(spm, d / "assets" / "tokenizer" / "vocabulary.spm")
    return d

