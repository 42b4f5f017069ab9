"""``--equalize``: AWQ scales measured on calibration text, folded exactly into the checkpoint's tensors.

One pass of the unquantized reference model, layer by layer (one layer's activations held at a time):
each layer's matmul inputs are sampled, the scales of its four foldable pairs searched
(``quant/equalize.py``: what folds where, and why it is exact), and the result is a new ``Checkpoint``
whose lazy tensors apply the fold when loaded — so any method, and any format, quantizes the equalized
model the same way it quantizes any other. Every tensor keeps its stored dtype: the norm scales are snapped
(``snap_scales``) so each folded norm is exactly representable in it, and the matrices' columns and rows take
the snapped scales — exact in float32; in bf16 only the scaled matrices round, and they are quantized next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.registry import Checkpoint
from quant.equalize import FOLDED, LayerScales, fold_tensor, o_proj_scales, search_scales, snap_scales
from quant.methods import quantize_weight
from quant.qparams import dequantize
from quant.spec import QuantSpec
from reference.layers import rope_cos_sin
from reference.model import Gemma2Model
from reference.weights import WeightStore

SAMPLE_ROWS = 2048
"""Calibration tokens (rows of activations) each scale search sees."""
OBSERVED = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
            "mlp.down_proj.weight")


def _fake_quant(spec: QuantSpec | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Quantize-dequantize with the spec's layout by round-to-nearest (the search's quick stand-in)."""
    if spec is None:
        return lambda w: w.float()
    fast = dataclasses.replace(spec, method="rtn")
    return lambda w: dequantize(*quantize_weight(w, fast, scale_dtype=torch.float32)).float()


@dataclasses.dataclass
class EqualizeReport:
    """What the search chose per layer: ``alphas[i]`` and ``ratios[i]`` (error with / without scales) for
    (attn, mlp, down, v)."""

    alphas: list[tuple[float, ...]] = dataclasses.field(default_factory=list)
    ratios: list[tuple[float, ...]] = dataclasses.field(default_factory=list)


@torch.inference_mode()
def measure_scales(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], ids: torch.Tensor,
                   progress: Progress = SILENT,
                   rows: int = SAMPLE_ROWS) -> tuple[list[LayerScales], EqualizeReport]:
    """The scales of every decoder layer, from the unquantized model on ``ids [S, T]``."""
    cfg = ckpt.config
    model = Gemma2Model(cfg, WeightStore(ckpt.tensors, cfg, torch.float32, resident=False))
    q_idx = torch.arange(ids.shape[1])
    cos, sin = rope_cos_sin(q_idx[None].expand(ids.shape[0], -1), cfg, torch.float32)
    h = model.weights.embed(ids) * torch.tensor(cfg.hidden_size ** 0.5)      # [S, T, H]
    pick = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))[:rows]
    scales, report = [], EqualizeReport()
    with progress.phase("equalizing", cfg.num_hidden_layers, "layers"):
        for i in range(cfg.num_hidden_layers):
            seen: dict[str, torch.Tensor] = {}

            def observe(name: str, x: torch.Tensor) -> None:
                key = name.split(".", 3)[3]
                if key in OBSERVED and key not in seen:
                    seen[key] = x.reshape(-1, x.shape[-1]).float()[pick]  # [rows, in]

            model.observer = observe
            h = model._layer(i, h, cos, sin, q_idx, None, None, None)
            model.observer = None
            sc, alphas, ratios = _layer_scales(model, specs, f"model.layers.{i}.", seen)
            scales.append(sc)
            report.alphas.append(alphas)
            report.ratios.append(ratios)
            progress.update(i + 1)
    return scales, report


def _layer_scales(model: Gemma2Model, specs: dict[str, QuantSpec | None], p: str,
                  x: dict[str, torch.Tensor]) -> tuple[LayerScales, tuple[float, ...], tuple[float, ...]]:
    cfg, get = model.config, model.weights.get
    N, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = "self_attn."
    groups = [  # (input key, weights sharing it, how channel means are made / expanded)
        (a + "q_proj.weight", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], None, None),
        ("mlp.gate_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], None, None),
        ("mlp.down_proj.weight", ["mlp.down_proj.weight"], None, None),
        (a + "o_proj.weight", [a + "o_proj.weight"],
         x[a + "o_proj.weight"].abs().mean(0).view(K, N // K, D).mean(1).reshape(-1),  # [K·D]
         lambda s: o_proj_scales(s, N, K)),
    ]
    found = []
    for key, names, act, expand in groups:
        ws = [get(p + n) for n in names]
        spec = specs.get(p + names[0])
        if spec is None:  # a weight the policy keeps in float gains nothing from scales
            ones = torch.ones(x[key].shape[1] if act is None else act.numel())
            found.append((ones, 0.0, 1.0))
            continue
        found.append(search_scales(x[key], ws, _fake_quant(spec), act=act, expand=expand))
    sc = LayerScales(*(f[0] for f in found))
    return sc, tuple(f[1] for f in found), tuple(f[2] for f in found)


def fold_checkpoint(ckpt: Checkpoint, scales: list[LayerScales]) -> Checkpoint:
    """``ckpt`` with the scales folded into its lazy tensors (applied when each tensor is loaded)."""
    cfg = ckpt.config
    tensors = dict(ckpt.tensors)
    for i, sc in enumerate(scales):
        p = f"model.layers.{i}."
        sc = _snapped(ckpt, p, sc)
        for name, lt in ckpt.tensors.items():
            if name.startswith(p) and name[len(p):] in FOLDED:
                heads = cfg.num_attention_heads, cfg.num_key_value_heads
                tensors[name] = _folded(lt, name[len(p):], sc, *heads)
    meta = {**ckpt.metadata, "equalized": "awq (scales folded into the pre-norms, up_proj and v_proj)"}
    return dataclasses.replace(ckpt, tensors=tensors, metadata=meta)


def _snapped(ckpt: Checkpoint, p: str, sc: LayerScales) -> LayerScales:
    """The norm scales snapped so the folded norms are exact in the norms' stored dtype."""
    attn, mlp = (ckpt.tensors[p + k] for k in ("input_layernorm.weight", "pre_feedforward_layernorm.weight"))
    return dataclasses.replace(sc, attn=snap_scales(attn.load(), sc.attn, attn.dtype),
                               mlp=snap_scales(mlp.load(), sc.mlp, mlp.dtype))


def _folded(lt: LazyTensor, key: str, sc: LayerScales, n_heads: int, n_kv: int) -> LazyTensor:
    def load() -> torch.Tensor:
        out = fold_tensor(key, lt.load(), sc, n_heads, n_kv)
        assert out is not None
        return out.to(lt.dtype)  # exact for the norms (snapped scales); matrices round as they are stored

    return LazyTensor(lt.shape, lt.dtype, load, None, lt.prefetch)
