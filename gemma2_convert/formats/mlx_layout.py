"""Facts about mlx-lm's model directory (mlx-lm 0.32.2 ``utils.save_model`` / ``load_model``), shared by the
MLX reader and writer and by the HF reader, which must not claim an MLX directory.

An mlx-lm directory is an HF directory (config.json, ``model.safetensors`` or ``model-0000i-of-0000N`` shards
with ``model.safetensors.index.json``) whose config.json carries ``"quantization": {"group_size", "bits",
"mode": "affine"}`` (copied to ``quantization_config``), optionally with per-module entries
``"model.layers.0.mlp.down_proj": {"group_size", "bits", "mode"}``; each quantized module stores ``weight``
(uint32), ``scales`` and ``biases`` (``quant/mlx_affine.py``). Gemma 2's head is tied: no ``lm_head``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats.safetensors import SafetensorsFile

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MLX_LM_VERSION = "0.32.2"
"""The mlx-lm release whose layout this reproduces and whose Gemma 2 forward the tests run."""


def sliding_window_note(window: int) -> str:
    """What ``inspect`` and the README say about running Gemma 2 in mlx-lm."""
    return (f"mlx-lm {MLX_LM_VERSION} runs Gemma 2 without its sliding window (one causal mask for every layer): "
            f"its logits match transformers' only on sequences of at most {window} tokens")


def raw_config(path: Path) -> dict[str, Any]:
    """config.json of directory ``path`` as a dict ({} when unreadable: the reader then says why)."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def stored_names(path: Path) -> list[str]:
    """Tensor names of the directory, from the index or the single file's header ([] when unreadable)."""
    try:
        if (path / INDEX).is_file():
            return list(json.loads((path / INDEX).read_text(encoding="utf-8")).get("weight_map", {}))
        return SafetensorsFile(path / SINGLE).names()
    except (OSError, ValueError, AttributeError, ConversionError):  # the reader that opens it says what is wrong
        return []


def is_mlx_dir(path: Path) -> bool:
    """An HF-style directory in mlx-lm's quantized layout: ``quantization`` in config.json, or ``.biases``
    tensors beside ``.scales`` (an MLX model whose config lost its ``quantization``: the reader refuses it)."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    if not ((path / SINGLE).is_file() or (path / INDEX).is_file()):
        return False
    if isinstance(raw_config(path).get("quantization"), dict):
        return True
    names = set(stored_names(path))
    return any(n.endswith(".scales") and n[:-len(".scales")] + ".biases" in names for n in names)
