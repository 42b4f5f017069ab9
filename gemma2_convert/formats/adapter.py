"""PEFT adapter directories, read lazily: ``adapter_config.json`` + ``adapter_model.safetensors`` (or .bin).

What PEFT 0.22's ``save_pretrained`` writes for a LoRA on a Gemma 2 model, keys under ``base_model.model.``:

* ``<module>.lora_A.weight [r, in]`` / ``<module>.lora_B.weight [out, r]``: a linear's update;
* ``<module>.lora_embedding_A [r, V]`` / ``<module>.lora_embedding_B [H, r]``: the embedding's update;
* ``<module>.lora_magnitude_vector [out]``: DoRA's magnitude (``use_dora``);
* ``<module>.base_layer.weight``: the base weight the adapter was trained on, saved when an embedding is
  targeted (a resized vocabulary);
* ``<module>.weight`` (and ``.bias``): a module of ``modules_to_save``, a full replacement.

The scale is ``lora_alpha / r`` (``use_rslora``: ``lora_alpha / √r``), per module with ``rank_pattern`` /
``alpha_pattern`` (PEFT's ``get_pattern_key``). The math lives in ``reference.lora``; ``formats.merge``
applies it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.errors import ConfigError, FormatError, UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.hf import BASE_PREFIXES
from gemma2_convert.formats.safetensors import SafetensorsFile
from reference.config import Gemma2Config
from reference.lora import LowRank
from reference.weights import expected_shapes

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
"""Tokenizer files an adapter directory may carry (added tokens of a resized vocabulary)."""
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "eA", ".lora_embedding_B": "eB",
         ".lora_magnitude_vector": "m", ".base_layer.weight": "base"}
"""Key suffix → what it holds (anything else must be a ``modules_to_save`` weight)."""
UNSUPPORTED_OPTIONS = {"fan_in_fan_out": False, "lora_bias": False, "layer_replication": None,
                       "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None}
"""Config options a Gemma 2 LoRA merge does not implement, with the value that means "off"."""


@dataclass(frozen=True)
class Adapter:
    """One PEFT LoRA adapter, lazily: its updates per base weight, its replacements, its tokenizer."""

    path: Path
    updates: dict[str, LowRank]
    """Canonical HF weight name → its low-rank update."""
    replacements: dict[str, LazyTensor] = field(default_factory=dict)
    """``modules_to_save`` weights: canonical HF name → the full tensor that replaces the base's."""
    base_layers: dict[str, LazyTensor] = field(default_factory=dict)
    """Saved ``base_layer`` weights (an embedding trained on a resized vocabulary): the base they update."""
    tokenizer: Path | None = None
    """The adapter directory's tokenizer.model, if it has one."""
    dora: bool = False
    alpha: float = 1.0
    """The config's ``lora_alpha`` (what llama.cpp's LoRA GGUF records)."""
    problems: tuple[str, ...] = ()
    """Keys the merge cannot place (reported with the shape checks, all at once)."""


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and any((path / w).is_file() for w in WEIGHTS)


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, refused unless it is a LoRA (LoHa, IA3, … are named) without unsupported
    options."""
    f = path / CONFIG
    if not f.is_file():
        raise FormatError(f"not a PEFT adapter directory: no {CONFIG}", path)
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"malformed JSON ({e})", f) from None
    if not isinstance(cfg, dict):
        raise FormatError("expected a JSON object", f)
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise UnsupportedError(f"peft_type is {kind!r}; only LoRA adapters (incl. rsLoRA and DoRA) can be "
                               "merged. Merge this one with peft's merge_and_unload and convert the merged "
                               "model", f)
    bad = [f"{k}={cfg[k]!r}" for k, off in UNSUPPORTED_OPTIONS.items()
           if cfg.get(k, off) not in (off, None, False)]
    if bad:
        raise UnsupportedError(f"LoRA options this merge does not implement: {', '.join(sorted(bad))}", f)
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ConfigError(f"{key} must be a positive number, not {cfg.get(key)!r}", f)
    return cfg


def read_weights(path: Path) -> dict[str, LazyTensor]:
    """The adapter's tensors by key: safetensors (mmap'd) or a PyTorch .bin (``weights_only``)."""
    st, pt = path / WEIGHTS[0], path / WEIGHTS[1]
    if st.is_file():
        return SafetensorsFile(st).tensors()
    if pt.is_file():
        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a file we do not accept
            raise FormatError(f"cannot read as a weights-only PyTorch file ({type(e).__name__}: {e})",
                              pt) from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise FormatError("expected a dict of tensors", pt)
        return {k: LazyTensor.of(v) for k, v in sd.items()}
    raise FormatError(f"no adapter weights: expected {' or '.join(WEIGHTS)}", path)


def pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module name, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def scale_of(cfg: dict[str, Any], module: str) -> float:
    """``lora_alpha / r`` for ``module`` (rsLoRA: ``/ √r``), with the rank and alpha patterns."""
    r = pattern_value(cfg.get("rank_pattern") or {}, module, float(cfg["r"]))
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, float(cfg["lora_alpha"]))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def canonical_name(name: str) -> str:
    """An adapter trained on a bare ``Gemma2Model`` names its weights without ``model.``: add it (HF
    names)."""
    return "model." + name if name.startswith(BASE_PREFIXES) else name


def split_key(key: str) -> tuple[str, str]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` → (module, part)."""
    name = key.removeprefix(PREFIX)
    for suffix, part in PARTS.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), part
    return name, "save"


def read_adapter(path: str | Path) -> Adapter:
    """Open a PEFT LoRA adapter directory; keys it cannot place are kept as ``problems``."""
    path = Path(path)
    cfg = read_config(path)
    groups: dict[str, dict[str, LazyTensor]] = {}
    replacements, problems = {}, []
    for key, t in read_weights(path).items():
        if not key.startswith(PREFIX):
            problems.append(f"{key}: not under {PREFIX!r}")
            continue
        module, part = split_key(key)
        if part == "save":
            replacements[key.removeprefix(PREFIX)] = t
        else:
            groups.setdefault(module, {})[part] = t
    updates, base_layers = {}, {}
    for module, parts in groups.items():
        weight = canonical_name(module + ".weight")
        if "base" in parts:
            base_layers[weight] = parts.pop("base")
        if not parts:
            continue
        emb = "eA" in parts or "eB" in parts
        a, b = parts.get("eA" if emb else "A"), parts.get("eB" if emb else "B")
        if a is None or b is None or (emb and "m" in parts) or len(parts) > 2 + ("m" in parts):
            problems.append(f"{module}: holds {sorted(parts)}; expected lora_A and lora_B (DoRA: and "
                            "lora_magnitude_vector), or lora_embedding_A and lora_embedding_B")
            continue
        updates[weight] = LowRank(a, b, scale_of(cfg, module), parts.get("m"), emb)
    tok = path / "tokenizer.model"
    replacements = {canonical_name(n): t for n, t in replacements.items()}
    return Adapter(path, updates, replacements, base_layers, tok if tok.is_file() else None,
                   bool(cfg.get("use_dora")), float(cfg["lora_alpha"]), tuple(problems))


def adapter_tokenizer_files(adapter: Adapter) -> list[Path]:
    """The tokenizer files the adapter directory carries."""
    return [adapter.path / n for n in TOKENIZER_FILES if (adapter.path / n).is_file()]




def write_random_adapter(path: Path, config: Gemma2Config, seed: int = 0, rank: int = 4,
                         targets: tuple[str, ...] = ("q_proj", "v_proj", "lm_head")) -> Path:
    """A random PEFT LoRA directory for ``config`` in PEFT 0.22's layout (demo and benchmarks): ``targets`` on
    every layer (``lm_head`` once), updates of a size that changes the logits visibly."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(config.replace(tie_word_embeddings=False))
    weights = {}
    for name, (out, inp) in ((n, s) for n, s in shapes.items() if n.split(".")[-2] in targets):
        key = PREFIX + name.removesuffix(".weight")
        weights[key + ".lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
        weights[key + ".lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / WEIGHTS[0]))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(targets),
           "use_rslora": False, "use_dora": False, "modules_to_save": None, "task_type": "CAUSAL_LM"}
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path
