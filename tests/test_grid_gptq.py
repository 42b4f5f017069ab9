"""GPTQ into K-quants and IQ4 (``quant/grid_gptq.py``): llama.cpp's scales, GPTQ's codes, packed exactly.

Numbers asserted: the written Q2_K / Q3_K / Q4_K / Q5_K / Q6_K / IQ4_XS / IQ4_NL bytes decode (llama.cpp's
dequantization, our port) to exactly the grid values GPTQ chose, on the grid of llama.cpp's own scales; on
correlated inputs the layer's output error is below llama.cpp's imatrix search at the same bytes.
"""

from __future__ import annotations

import pytest
import torch

from quant.gguf_codec import dequantize_tensor, quantize_tensor
from quant.grid_gptq import GRID_TYPES, Grid, choose_grid, gptq_on_grid


def _layer(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [32, 256], correlated inputs x [2048, 256] (a low-rank mix plus channel scales), as in a layer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 256, generator=g)
    low_rank = torch.randn(2048, 16, generator=g) @ torch.randn(16, 256, generator=g)
    x = low_rank + 0.3 * torch.randn(2048, 256, generator=g)
    return w, x * (0.2 + 3 * torch.rand(256, generator=g))


def _codes(grid: Grid, x: torch.Tensor) -> torch.Tensor:
    """The codes of grid values ``x`` (0 where the step is 0)."""
    step = torch.where(grid.step != 0, grid.step, torch.ones_like(grid.step))
    return torch.where(grid.step != 0, grid.nearest((x - grid.offset) / step), torch.zeros_like(x))


@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_blocks_decode_to_the_chosen_codes_with_llama_cpp_scales(qtype: str) -> None:
    w, x = _layer(0)
    h, imp = 2 * x.T @ x / x.shape[0], x.square().mean(0)
    grid, pack = choose_grid(w, qtype, imp)
    q = gptq_on_grid(w, h, grid)
    data = pack(q)
    stock = quantize_tensor(w, qtype, quant_weights=imp)
    assert data.shape == stock.shape and data.dtype == torch.uint8
    assert int(q.min()) >= grid.lo and int(q.max()) <= grid.hi
    assert torch.equal(dequantize_tensor(data, qtype, tuple(w.shape)), grid.value(q))  # written = chosen
    base = dequantize_tensor(stock, qtype, tuple(w.shape))
    assert torch.equal(grid.value(_codes(grid, base)), base)  # llama.cpp's blocks lie on the same grid
    assert (q != _codes(grid, base)).float().mean() > 0.05  # and GPTQ moved codes
    ours = grid.value(q)
    err = float((x @ (w - ours).T).square().mean()) / float((x @ (w - base).T).square().mean())
    assert err < 0.8, err  # output error below llama.cpp's imatrix search, same bytes


def test_act_order_keeps_every_column_on_its_own_grid() -> None:
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(8, 64, generator=g), torch.randn(256, 64, generator=g)
    step = torch.rand(8, 64, generator=g) + 0.1
    grid = Grid(step, -step * 7, 0, 15)
    h = 2 * x.T @ x / 256
    plain = torch.round((w + step * 7) / step).clamp(0, 15)
    for act_order in (False, True):
        q = gptq_on_grid(w, h, grid, act_order=act_order)
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        assert ((q - plain).abs() <= 3).all()  # near plain rounding, not scrambled across columns
        assert float((x @ (w - grid.value(q)).T).square().mean()) < float((x @ (w - grid.value(plain)).T)
                                                                            .square().mean())
