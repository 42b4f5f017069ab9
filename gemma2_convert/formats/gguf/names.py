"""HF ↔ GGUF tensor names for Gemma 2 and the pure transforms between the two conventions.

Names and transforms: ../shared/spec/GEMMA2_FORMATS.md §5.2 (llama.cpp ``convert_hf_to_gguf.py``
``Gemma2Model``, gguf-py ``tensor_mapping.py``). GGUF dims are the HF shape reversed, with
identical row-major bytes, so no transpose is needed; Gemma 2 uses NEOX RoPE, so no q/k permutation.

Two transforms change values:

* **norms**: HF stores zero-centred ``w`` and computes ``x̂ · (1 + w)``; GGUF stores ``1 + w`` in F32.
* **query scale**: llama.cpp does not read ``query_pre_attn_scalar``; it picks the scale from the
  layer count (``src/models/gemma2.cpp`` in the llama.cpp vendored by llama-cpp-python 0.3.36:
  46 layers → ``1/sqrt(n_embd / n_head)`` with integer division, any other depth →
  ``1/sqrt(head_dim)``). When that differs from the model's scale we multiply ``attn_q`` by
  ``sqrt(s_llama / s_model)``. Exact in real arithmetic: q enters only ``q·kᵀ`` after RoPE, and RoPE
  is linear, so ``(r·q)·k · s_llama^-½ = q·k · s_model^-½``.
"""

from __future__ import annotations

import math
import re

import torch

from gemma2_convert.core.errors import TensorMismatchError
from reference.config import Gemma2Config

ARCH = "gemma2"

# HF name → GGUF name; "{i}" is the layer index (spec §5.2).
HF_TO_GGUF: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
    "lm_head.weight": "output.weight",  # an untied head only (a merged adapter that changed one side)
}
GGUF_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_GGUF.items()}


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_HF_PATTERNS = _compile(HF_TO_GGUF)
_GGUF_PATTERNS = _compile(GGUF_TO_HF)


def _rename(name: str, patterns: list[tuple[re.Pattern[str], str]], what: str) -> str:
    for pattern, dst in patterns:
        m = pattern.match(name)
        if m:
            return dst.format(i=int(m.group(1))) if m.groups() else dst
    raise TensorMismatchError(f"{what} tensor {name!r} has no Gemma 2 counterpart")


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``."""
    return _rename(hf_name, _HF_PATTERNS, "HF")


def hf_name(gguf_tensor: str) -> str:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
    return _rename(gguf_tensor, _GGUF_PATTERNS, "GGUF")


def is_norm(hf: str) -> bool:
    """RMSNorm weights: stored as ``1 + w`` and always F32 in GGUF."""
    return hf.endswith("norm.weight")


def is_query(hf: str) -> bool:
    return hf.endswith("self_attn.q_proj.weight")


# ---- norms ----------------------------------------------------------------------------------

def add_one(w: torch.Tensor) -> torch.Tensor:
    """Zero-centred HF norm ``w`` [H] → GGUF ``1 + w`` [H] in float32 (what the reference computes)."""
    return 1.0 + w.float()


def sub_one(w: torch.Tensor) -> torch.Tensor:
    """GGUF ``1 + w`` [H] → zero-centred ``w`` [H] float32; exact (Sterbenz) for stored values in [0.5, 2]."""
    return w.float() - 1.0


def norm_residual(w: torch.Tensor) -> torch.Tensor:
    """``w − sub_one(add_one(w))`` [H] float32: the low bits of ``w`` that float32 ``1 + w`` drops.

    The rounding error of a float32 sum is itself a float32 number, so
    ``sub_one(add_one(w)) + norm_residual(w) == w`` exactly for float32 (and narrower) ``w``.
    """
    w32 = w.float()
    return (w32.double() - sub_one(add_one(w32)).double()).float()


# ---- query scale ----------------------------------------------------------------------------

def llama_cpp_query_scalar(cfg: Gemma2Config) -> float:
    """The ``query_pre_attn_scalar`` llama.cpp assumes for a Gemma 2 GGUF of this shape.

    46 layers is typed 27B and gets ``n_embd / n_head`` (C integer division); every other depth
    gets ``head_dim`` (``key_length``).
    """
    if cfg.num_hidden_layers == 46:
        return float(cfg.hidden_size // cfg.num_attention_heads)
    return float(cfg.head_dim)


def query_fold_ratio(cfg: Gemma2Config) -> float:
    """The factor ``attn_q`` is multiplied by so llama.cpp computes the model's own scale (1.0: none)."""
    s_llama, s_model = llama_cpp_query_scalar(cfg), float(cfg.query_pre_attn_scalar)
    return 1.0 if s_llama == s_model else math.sqrt(s_llama / s_model)


def fold_query(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """q_proj [N·D, H] → ratio · q_proj in float32 (the input unchanged when ratio is 1)."""
    if ratio == 1.0:
        return w
    return (w.double() * ratio).float()


def unfold_query(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """Inverse of ``fold_query``: attn_q [N·D, H] / ratio in float32 (within one float32 ulp)."""
    if ratio == 1.0:
        return w
    return (w.double() / ratio).float()
