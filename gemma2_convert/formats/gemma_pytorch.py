"""gemma_pytorch checkpoints (``model.ckpt``): reader, name map and the pure transforms (spec §1).

Container (spec §1.1): a ``torch.save`` zip archive holding ``{"model_state_dict": {name: tensor}}``
including the RoPE table ``freqs_cis`` (dropped: recomputable); or a directory with
``pytorch_model.bin.index.json`` whose shards are plain state dicts. Files are opened only with
``torch.load(mmap=True, weights_only=True)``: tensors are views of the mapped file (nothing is
copied until a tensor is written), and a pickle that references code is refused, never run.

int8 variant (spec §1.5): int8 ``weight`` + per-row ``weight_scaler``, dequantized on read exactly
as gemma_pytorch's forward does (``weight * weight_scaler[:, None]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from gemma2_convert.core.errors import (
    FormatError,
    TensorMismatchError,
    UnsupportedError,
    check_names,
)
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats import torch_zip
from gemma2_convert.formats.hf import config_for_output
from gemma2_convert.formats.orig_config import ShapeOptions, infer_config
from gemma2_convert.formats.registry import Checkpoint, register_reader
from gemma2_convert.formats.stored import Stored, torch_rows
from gemma2_convert.formats.tokenizer.spm import find_tokenizer
from reference.config import Gemma2Config
from reference.weights import expected_shapes

INDEX = "pytorch_model.bin.index.json"
DROPPED = ("freqs_cis",)  # complex64 RoPE table [2·max_positions, D/2]
QKV = "model.layers.{}.self_attn.qkv_proj.weight"
_SAME = ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
         "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
         "post_feedforward_layernorm.weight")

# gemma_pytorch name → HF name(s), "{}" = layer index (spec §1.6). Several targets = row split.
ORIG_TO_HF: dict[str, tuple[str, ...]] = {
    "embedder.weight": ("model.embed_tokens.weight",),
    "model.norm.weight": ("model.norm.weight",),
    QKV: tuple(f"model.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv"),
    **{f"model.layers.{{}}.{k}": (f"model.layers.{{}}.{k}",) for k in _SAME},
}
# Tensors that carry a per-row ``weight_scaler`` in the int8 variant (norms never do).
QUANTIZED = ("embedder.weight", QKV, *(f"model.layers.{{}}.{k}" for k in _SAME if k.endswith("proj.weight")))


# ---- pure transforms -------------------------------------------------------------------------

def split_qkv(w: torch.Tensor, cfg: Gemma2Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows [N·D | K·D | K·D] → q [N·D, …], k [K·D, …], v [K·D, …] as views (spec §1.3).

    Works on the weight [(N+2K)·D, H] and on its int8 row scaler [(N+2K)·D] alike."""
    rows = cfg.q_dim + 2 * cfg.kv_dim
    if w.shape[0] != rows:
        raise ValueError(f"qkv has {w.shape[0]} rows, config needs (N+2K)·D = {rows}")
    q, k, v = w.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: q [N·D, H], k, v [K·D, H] → [(N+2K)·D, H]."""
    return torch.cat([q, k, v])


def dequantize_int8(w: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    """int8 w [rows, cols] × scaler [rows] → scaler.dtype [rows, cols] (gemma_pytorch ``Linear``/``Embedding``).

    int8 → float is exact in every float dtype, so this equals ``w * scaler.unsqueeze(-1)``."""
    return w.to(scaler.dtype).mul_(scaler.unsqueeze(-1))


# ---- the name table --------------------------------------------------------------------------

def expand(layers: int) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(template, gemma_pytorch name, HF names) for every tensor of an ``layers``-layer model."""
    for tpl, targets in ORIG_TO_HF.items():
        for i in range(layers) if "{}" in tpl else [None]:
            yield tpl, tpl.format(i), tuple(t.format(i) for t in targets)


def scaler_name(name: str) -> str:
    return name.removesuffix("weight") + "weight_scaler"


def orig_names(layers: int, quantized: bool = False) -> list[str]:
    """Every gemma_pytorch tensor name (``freqs_cis`` excluded) of an ``layers``-layer model."""
    names = [name for _, name, _ in expand(layers)]
    return names + [scaler_name(n) for tpl, n, _ in expand(layers) if quantized and tpl in QUANTIZED]


def orig_shapes(cfg: Gemma2Config, quantized: bool = False) -> dict[str, tuple[int, ...]]:
    """Every gemma_pytorch tensor (``freqs_cis`` excluded) with its shape, derived from the HF table."""
    hf = expected_shapes(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for tpl, name, targets in expand(cfg.num_hidden_layers):
        rows = sum(hf[t][0] for t in targets)
        out[name] = (rows, *hf[targets[0]][1:])
        if quantized and tpl in QUANTIZED:
            out[scaler_name(name)] = (rows,)
    return out


def check_shapes(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]],
                 where: Path, hint: str = "") -> None:
    """One TensorMismatchError listing every tensor whose shape differs from the config's."""
    bad = sorted(f"{n}: expected {list(s)}, got {list(actual[n])}"
                 for n, s in expected.items() if n in actual and tuple(actual[n]) != tuple(s))
    if bad:
        shown = "; ".join(bad[:8]) + (f"; … (+{len(bad) - 8} more)" if len(bad) > 8 else "")
        raise TensorMismatchError(f"{len(bad)} tensor shape(s) inconsistent with the config: {shown}{hint}", where)


def to_hf(tensors: Mapping[str, LazyTensor], cfg: Gemma2Config) -> dict[str, LazyTensor]:
    """gemma_pytorch-named lazy tensors (already dequantized) → HF-named ones; qkv split by rows."""
    out: dict[str, LazyTensor] = {}
    for tpl, name, targets in expand(cfg.num_hidden_layers):
        src = tensors[name]
        if len(targets) == 1:
            out[targets[0]] = src
            continue
        for j, (target, rows) in enumerate(zip(targets, (cfg.q_dim, cfg.kv_dim, cfg.kv_dim))):
            out[target] = src.map(lambda t, j=j: split_qkv(t, cfg)[j], shape=(rows, *src.shape[1:]))
    return out


def from_hf(tensors: Mapping[str, LazyTensor], cfg: Gemma2Config) -> dict[str, LazyTensor]:
    """HF-named lazy tensors → gemma_pytorch-named ones; q, k, v fused by rows (the inverse of ``to_hf``)."""
    out: dict[str, LazyTensor] = {}
    for _, name, targets in expand(cfg.num_hidden_layers):
        parts = [tensors[t] for t in targets]
        if len(parts) == 1:
            out[name] = parts[0]
            continue
        rows = sum(p.shape[0] for p in parts)  # [(N + 2K)·D, H]
        out[name] = LazyTensor((rows, *parts[0].shape[1:]), parts[0].dtype,
                               lambda parts=parts: fuse_qkv(*(p.load() for p in parts)))
    return out


# ---- reading ---------------------------------------------------------------------------------

def _ckpt_in_dir(d: Path) -> Path | None:
    if (d / "model.ckpt").is_file():
        return d / "model.ckpt"
    found = sorted(p for p in d.glob("*.ckpt") if p.is_file())
    return found[0] if len(found) == 1 else None


def checkpoint_files(path: Path) -> list[Path]:
    """The torch files of a checkpoint: the file itself, the one ``*.ckpt`` in a directory, or the shards."""
    if not path.exists():
        raise FormatError("no such file or directory", path)
    if path.is_file():
        return [path]
    if (path / INDEX).is_file():
        try:
            files = sorted(set(json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"malformed index ({type(e).__name__}: {e})", path / INDEX) from None
        bad = [f for f in files if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith(".")]
        missing = [f for f in files if f not in bad and not (path / f).is_file()]
        if bad or missing:
            raise FormatError(f"index names shard(s) outside the directory or missing: {bad + missing}", path / INDEX)
        return [path / f for f in files]
    ckpt = _ckpt_in_dir(path)
    if ckpt is None:
        raise FormatError(f"directory holds neither model.ckpt (or a single *.ckpt) nor {INDEX}", path)
    return [ckpt]


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """One file's state dict as mmap'd tensors (unwrapping ``model_state_dict``, dropping ``freqs_cis``)."""
    obj = torch_zip.load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(f"holds a {type(obj).__name__}, not a state dict", path)
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise FormatError(f"state dict entries that are not tensors: {bad[:10]}", path)
    return {k: v for k, v in obj.items() if k not in DROPPED}


def read_state(path: Path) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """All tensors of the checkpoint (mmap'd, ``freqs_cis`` dropped) and the files they came from."""
    files = checkpoint_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(f)
        dup = state.keys() & part.keys()
        if dup:
            raise TensorMismatchError(f"tensor(s) stored in more than one shard: {sorted(dup)[:10]}", f)
        state.update(part)
    _require_gemma(state, path)
    return files, state


def _require_gemma(state: Mapping[str, torch.Tensor], path: Path) -> None:
    if "model.embed_tokens.weight" in state or any(".q_proj." in k for k in state):
        raise UnsupportedError("holds transformers (HF) tensor names, not gemma_pytorch ones; this is not an "
                               "original-format checkpoint", path)
    if "embedder.weight" not in state and not any("qkv_proj" in k for k in state):
        shown = ", ".join(sorted(state)[:5]) or "none"
        raise FormatError(f"not a Gemma 2 checkpoint: no embedder.weight or qkv_proj among its {len(state)} "
                          f"tensors (first: {shown})", path)


def num_layers(names: Iterator[str] | list[str]) -> int:
    idx = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def dequantized(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, LazyTensor]:
    """Weights with a ``weight_scaler`` become lazy dequantized tensors; others pass through lazily."""
    out = {}
    for name, t in state.items():
        if name.endswith("weight_scaler"):
            continue
        s = state.get(scaler_name(name))
        if s is None:
            out[name] = LazyTensor.of(t)
        elif t.dtype != torch.int8 or s.dim() != 1 or s.shape[0] != t.shape[0] or not s.is_floating_point():
            raise FormatError(f"{name}: expected int8 [rows, cols] with a float [rows] weight_scaler, got "
                              f"{t.dtype}{list(t.shape)} and {s.dtype}{list(s.shape)}", path)
        else:
            out[name] = LazyTensor(tuple(t.shape), s.dtype, lambda t=t, s=s: dequantize_int8(t, s))
    return out


def open_orig(path: Path, options: ShapeOptions | None = None) -> tuple[Checkpoint, dict[str, LazyTensor]]:
    """The checkpoint in canonical form, and its dequantized tensors under their gemma_pytorch names."""
    files, state = read_state(path)
    quantized = any(k.endswith("weight_scaler") for k in state)
    opts = options or ShapeOptions()
    cfg_hint = opts.loaded_config()
    layers = cfg_hint.num_hidden_layers if cfg_hint else num_layers(list(state))
    check_names(orig_names(layers, quantized), state, path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cfg, how = infer_config(shapes, layers, opts, path)
    check_shapes(orig_shapes(cfg, quantized), shapes, path, f" (config: {how})")
    orig = dequantized(state, path)
    cfg = config_for_output(cfg, list(orig.items()))  # torch_dtype: the (dequantized) source dtype
    meta = {"source_format": "gemma_pytorch", "config_from": how, "int8": str(quantized).lower(),
            "files": json.dumps([str(f) for f in files])}

    return Checkpoint("gemma_pytorch", path, cfg, to_hf(orig, cfg), find_tokenizer(path), meta), orig


TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _detect(p: Path) -> bool:
    """A directory with a checkpoint, a torch.save zip — or any file that looks meant as one (a torch
    suffix, zip or pickle magic), so that the reader says what is wrong with a broken one."""
    if p.is_dir():
        return (p / INDEX).is_file() or _ckpt_in_dir(p) is not None
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF" or p.suffix == ".safetensors" or head[8:9] == b"{":  # a safetensors header: u64, then {
        return False
    return p.suffix in TORCH_SUFFIXES or head[:4] == torch_zip.ZIP_MAGIC or head[:1] == b"\x80"


def stored_gemma_pytorch(path: Path) -> Stored:
    """The state dict as stored (int8 weights and their scalers included)."""
    files, state = read_state(path)
    meta = {"files": [str(f.relative_to(path)) if f != path else f.name for f in files],
            "int8": any(n.endswith("weight_scaler") for n in state)}
    return Stored(torch_rows(state), {n: LazyTensor.of(t) for n, t in state.items()}, meta)


def check_source_integrity(ckpt: Checkpoint) -> None:
    """Every zip record's CRC-32 of the checkpoint's files, re-read (flipped data bytes fail here)."""
    torch_zip.check_integrity([Path(f) for f in json.loads(ckpt.metadata.get("files", "[]"))])


@register_reader("gemma_pytorch", "a gemma_pytorch model.ckpt, a directory holding one, or a sharded directory "
                 f"with {INDEX}", _detect, stored=stored_gemma_pytorch, original=True,
                 integrity=check_source_integrity)
def open_gemma_pytorch(path: Path, options: ShapeOptions | None = None, **_: object) -> Checkpoint:
    return open_orig(path, options)[0]
