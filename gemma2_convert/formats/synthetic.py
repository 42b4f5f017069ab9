"""Deterministic random Gemma 2 weights of any shape, generated lazily tensor by tensor.

Used by the demo, the tests and the benchmarks (which need GB-sized checkpoints of the real
2B / 9B / 27B shapes without ever holding them in memory).
"""

from __future__ import annotations

import zlib

import torch

from gemma2_convert.core.lazy import LazyTensor
from reference.config import Gemma2Config
from reference.weights import expected_shapes


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _make(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = _generator(seed, name)
    if name.endswith("norm.weight"):
        return (torch.randn(shape, generator=g) * 0.2).to(dtype)  # zero-centred: applied as (1 + w)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g).to(dtype)
    return (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)  # unit-gain linear layers


def random_tensors(config: Gemma2Config, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, LazyTensor]:
    """HF names → lazy random tensors; loading the same name twice gives the same values."""
    return {
        name: LazyTensor(shape, dtype, lambda n=name, s=shape: _make(n, s, dtype, seed))
        for name, shape in expected_shapes(config).items()
    }
