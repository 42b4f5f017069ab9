"""The ``mlx`` reader: an mlx-lm model directory (``formats/mlx_layout.py``) as the canonical checkpoint.

Each quantized module (``weight`` uint32, ``scales``, ``biases``) becomes one ``QuantTensor`` named
``<prefix>.weight`` that decodes ``scales · u + biases`` when loaded and hands its codes to a transcoder
unchanged; every other tensor is read as the HF reader reads it. Which modules are quantized, and how, comes
from config.json ``quantization`` (a per-module entry overrides the defaults), checked against the shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.errors import FormatError, UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.hf import (
    canonical_names,
    drop_tied_head,
    read_tensors,
    stored_hf,
)
from gemma2_convert.formats.mlx_layout import (
    is_mlx_dir,
    raw_config,
    sliding_window_note,
)
from gemma2_convert.formats.registry import Checkpoint, register_reader
from gemma2_convert.formats.stored import Stored
from quant.mlx_affine import MLX_BITS, MLX_GROUP_SIZES, MODE, unpack_codes
from quant.qtensor import QuantCodes, QuantTensor, quant_tensor
from reference.config import Gemma2Config

PARTS = ("weight", "scales", "biases")


def module_params(qcfg: dict[str, Any], prefix: str, path: Path) -> tuple[int, int]:
    """``(bits, group_size)`` of module ``prefix``: its own entry in ``quantization``, else the defaults."""
    entry = qcfg.get(prefix, qcfg)
    if not isinstance(entry, dict):
        raise FormatError(f"config.json quantization[{prefix!r}] is {entry!r}, expected an object", path)
    bits, group, mode = entry.get("bits"), entry.get("group_size"), entry.get("mode", MODE)
    if mode != MODE or bits not in MLX_BITS or group not in MLX_GROUP_SIZES:
        raise UnsupportedError(
            f"{prefix}: MLX quantization mode={mode!r} bits={bits!r} group_size={group!r}; this tool reads mode "
            f"'affine' with bits in {list(MLX_BITS)} and group_size in {list(MLX_GROUP_SIZES)}", path)
    return int(bits), int(group)


def _check_parts(prefix: str, parts: dict[str, LazyTensor], bits: int, group: int, path: Path) -> tuple[int, int]:
    """``(out, in)`` of the module, after checking its three tensors agree with ``bits`` and ``group``."""
    w, s, b = (parts[f"{prefix}.{p}"] for p in PARTS)
    if w.dtype != torch.uint32 or len(w.shape) != 2:
        raise FormatError(f"{prefix}.weight is {w.dtype}{list(w.shape)}, expected uint32 [out, in·bits/32]", path)
    out_f, in_f = w.shape[0], w.shape[1] * 32 // bits
    want = (out_f, in_f // group)
    for name, t in ((f"{prefix}.scales", s), (f"{prefix}.biases", b)):
        if tuple(t.shape) != want or not t.dtype.is_floating_point:
            raise FormatError(
                f"{name} is {t.dtype}{list(t.shape)}, expected float{list(want)} for {in_f} inputs in groups of "
                f"{group} (config.json quantization); the group size of the config and of the tensors differ: "
                f"{in_f // max(1, t.shape[-1] if t.shape else 1)} columns per scale here", path)
    return out_f, in_f


def mlx_tensor(prefix: str, parts: dict[str, LazyTensor], bits: int, group: int, path: Path) -> QuantTensor:
    out_f, in_f = _check_parts(prefix, parts, bits, group, path)
    w, s, b = (parts[f"{prefix}.{p}"] for p in PARTS)

    def codes(start: int = 0, stop: int = out_f) -> QuantCodes:
        """Rows ``start:stop`` (all by default): each row's words, scales and biases are its own."""
        return QuantCodes(unpack_codes(w.load()[start:stop], bits, in_f), s.load()[start:stop],
                          b.load()[start:stop].to(s.dtype), "affine", bits)

    def rows(start: int, stop: int) -> torch.Tensor:  # decoded as ``load`` decodes, op for op (elementwise)
        return codes(start, stop).dequantize().to(s.dtype)

    return quant_tensor((out_f, in_f), s.dtype, codes, kind="affine", bits=bits, group_size=group, layout="mlx",
                        stored_nbytes=w.nbytes + s.nbytes + b.nbytes, rows=rows)


def quantized_modules(tensors: dict[str, LazyTensor], qcfg: dict[str, Any], path: Path) -> dict[str, LazyTensor]:
    """Canonical names → lazy tensors, each quantized module's three tensors as one ``QuantTensor``."""
    prefixes = sorted(n[:-len(".scales")] for n in tensors if n.endswith(".scales"))
    out = dict(tensors)
    for prefix in prefixes:
        missing = [f"{prefix}.{p}" for p in PARTS if f"{prefix}.{p}" not in tensors]
        if missing:
            raise FormatError(f"{prefix}: an MLX quantized module needs weight, scales and biases; missing "
                              f"{', '.join(missing)}", path)
        bits, group = module_params(qcfg, prefix, path)
        out[f"{prefix}.weight"] = mlx_tensor(prefix, tensors, bits, group, path)
        del out[f"{prefix}.scales"], out[f"{prefix}.biases"]
    return out


def _quantization(path: Path) -> dict[str, Any]:
    qcfg = raw_config(path).get("quantization")
    if not isinstance(qcfg, dict):
        raise FormatError("config.json has no 'quantization' object, but the tensors are in MLX's quantized layout "
                          "(weight/scales/biases): add mlx-lm's \"quantization\": {\"group_size\": G, \"bits\": B, "
                          "\"mode\": \"affine\"} with the values it was quantized with", path / "config.json")
    return qcfg


def stored_mlx(path: Path) -> Stored:
    st = stored_hf(path)
    cfg = raw_config(path)
    q = cfg.get("quantization")
    st.metadata["quantization"] = (f"mlx {q.get('mode', MODE)} {q.get('bits')}-bit, group {q.get('group_size')}"
                                   if isinstance(q, dict) else "missing (config.json has no 'quantization')")
    st.metadata["note"] = sliding_window_note(int(cfg.get("sliding_window") or 4096))
    return st


@register_reader("mlx", "an mlx-lm directory (config.json 'quantization', uint32 weight + scales + biases)",
                 is_mlx_dir, stored=stored_mlx)
def open_mlx_dir(path: Path, **_: object) -> Checkpoint:
    qcfg = _quantization(path)
    config = Gemma2Config.from_json_file(path / "config.json")
    tensors, meta = read_tensors(path)
    tensors = quantized_modules(canonical_names(tensors), qcfg, path)
    drop_tied_head(tensors, config)
    tok = path / "tokenizer.model"
    meta = {**meta, "quantization": f"mlx affine {qcfg.get('bits')}-bit, group {qcfg.get('group_size')}",
            "note": sliding_window_note(config.sliding_window)}
    return Checkpoint("mlx", path, config, tensors, tok if tok.is_file() else None, meta)
