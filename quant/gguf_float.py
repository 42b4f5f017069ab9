"""GGUF float tensor types F32, F16, BF16: float ``[rows, cols]`` <-> their raw little-endian bytes.

``quantize_*`` cast to float32 first and then to the stored type (F16: torch's round-to-nearest-even;
BF16: ggml's ``fp32_to_bf16``, below), so the bytes equal gguf-py's and llama.cpp's for every finite
input. ``dequantize_*`` widen exactly. Rows are independent; no scale, no block (block size 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_f32(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> uint8 ``[rows, 4·cols]``."""
    return w.to(torch.float32).contiguous().view(torch.uint8)


def quantize_f16(w: Tensor) -> Tensor:
    """float ``[rows, cols]`` -> uint8 ``[rows, 2·cols]`` (via float32, round to nearest even)."""
    return w.to(torch.float32).to(torch.float16).contiguous().view(torch.uint8)


def quantize_bf16(w: Tensor) -> Tensor:
    """ggml ``fp32_to_bf16``: round to nearest even; a NaN keeps its sign and top bits and is made quiet."""
    n = w.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    quiet = ((n & 0xFFFF0000) | (64 << 16)) >> 16
    h = torch.where(nan, quiet, rounded)  # [0, 0xFFFF]
    return (((h + 0x8000) & 0xFFFF) - 0x8000).to(torch.int16).view(torch.uint8)


def dequantize_f32(raw: Tensor) -> Tensor:
    """uint8 ``[rows, 4·cols]`` -> float32 ``[rows, cols]`` (a view of ``raw`` where it is contiguous)."""
    return raw.contiguous().view(torch.float32)


def dequantize_f16(raw: Tensor) -> Tensor:
    """uint8 ``[rows, 2·cols]`` -> float32 ``[rows, cols]`` (exact)."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def dequantize_bf16(raw: Tensor) -> Tensor:
    """uint8 ``[rows, 2·cols]`` -> float32 ``[rows, cols]`` (exact: the bf16 bits are the float32's top half)."""
    return (raw.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
