"""Build gemma_pytorch-format checkpoints from an HF state dict, for tests, the demo and benchmarks.

Layouts (spec §1.1, §1.5): a single ``torch.save`` file ``{"model_state_dict": {…, "freqs_cis"}}``;
a sharded directory of plain state dicts with ``pytorch_model.bin.index.json``; and the int8
variant (int8 ``weight`` + per-row ``weight_scaler`` in the original float dtype).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from gemma2_convert.formats.gemma_pytorch import (
    INDEX,
    QUANTIZED,
    dequantize_int8,
    expand,
    fuse_qkv,
    scaler_name,
    split_qkv,
)
from gemma2_convert.formats.synthetic import random_tensors
from reference.config import Gemma2Config


def freqs_cis(cfg: Gemma2Config) -> torch.Tensor:
    """gemma_pytorch's RoPE table: complex64 [2·max_positions, D/2] = polar(1, t ⊗ θ^(-2i/D))."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))  # [D/2]
    t = torch.arange(2 * cfg.max_position_embeddings).float()                       # [2P]
    angles = torch.outer(t, inv)                                                     # [2P, D/2]
    return torch.polar(torch.ones_like(angles), angles)


def orig_state_dict(hf: Mapping[str, torch.Tensor], cfg: Gemma2Config) -> dict[str, torch.Tensor]:
    """HF-named tensors → gemma_pytorch names (q, k, v fused into qkv_proj rows [N·D | K·D | K·D])."""
    out = {}
    for _, name, targets in expand(cfg.num_hidden_layers):
        parts = [hf[t] for t in targets]
        out[name] = fuse_qkv(*parts) if len(parts) == 3 else parts[0].clone()
    return out


def quantize_int8(sd: Mapping[str, torch.Tensor], cfg: Gemma2Config) -> dict[str, torch.Tensor]:
    """gemma_pytorch's int8 quantizer on the linear and embedding weights: symmetric per row,
    ``scale = max|w_row| / 127.5`` (≥ 1e-8), int8 = round(w / scale) clamped to [-128, 127]."""
    out = dict(sd)
    for tpl, name, _ in expand(cfg.num_hidden_layers):
        if tpl not in QUANTIZED:
            continue
        w = sd[name].float()                                                   # [rows, cols]
        scale = (w.abs().amax(dim=1) / 127.5).clamp(min=1e-8)                   # [rows]
        out[name] = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        out[scaler_name(name)] = scale.to(sd[name].dtype)
    return out


def dequantized_hf(hf: Mapping[str, torch.Tensor], cfg: Gemma2Config) -> dict[str, torch.Tensor]:
    """The HF state dict an int8 checkpoint made by :func:`quantize_int8` converts to."""
    q = quantize_int8(orig_state_dict(hf, cfg), cfg)
    out = {}
    for _, name, targets in expand(cfg.num_hidden_layers):
        s = q.get(scaler_name(name))
        w = dequantize_int8(q[name], s) if s is not None else q[name]
        for t, part in zip(targets, split_qkv(w, cfg) if len(targets) == 3 else (w,)):
            out[t] = part.clone()
    return out


def write_orig_ckpt(path: str | Path, hf: Mapping[str, torch.Tensor], cfg: Gemma2Config, *,
                    int8: bool = False) -> Path:
    """A single-file gemma_pytorch ``model.ckpt`` (with ``freqs_cis``, as gemma_pytorch saves it)."""
    sd = orig_state_dict(hf, cfg)
    sd = quantize_int8(sd, cfg) if int8 else sd
    sd["freqs_cis"] = freqs_cis(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": sd}, path)
    return path


def write_orig_sharded(directory: str | Path, hf: Mapping[str, torch.Tensor], cfg: Gemma2Config, *,
                       shards: int = 2, int8: bool = False) -> Path:
    """A directory of plain state-dict shards ``pytorch_model-0000i-of-0000n.bin`` plus the index."""
    sd = orig_state_dict(hf, cfg)
    sd = quantize_int8(sd, cfg) if int8 else sd
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[i::shards]}
        torch.save(part, d / fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return d


def write_random_orig_ckpt(path: str | Path, cfg: Gemma2Config, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """A gemma_pytorch checkpoint of random weights (gemma2_convert.formats.synthetic) for the demo."""
    hf = {k: v.load() for k, v in random_tensors(cfg, seed, dtype).items()}
    return write_orig_ckpt(path, hf, cfg)
