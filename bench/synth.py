"""Synthetic checkpoints of the published shapes, written tensor by tensor (never the whole model in RAM).

Random weights (``gemma2_convert.formats.synthetic``, deterministic per name), bf16, real tensor names:

* gemma_pytorch ``model.ckpt``: the torch zip layout ``torch.save`` produces (``data.pkl`` pickling
  ``{"model_state_dict": {name: tensor}}`` with ``freqs_cis``, then one 64-byte-aligned record per
  storage), written one record at a time so a 54 GB file needs one tensor of memory.
  ``share_layers=True`` makes every decoder layer a view of layer 0's records — the model keeps all
  its layers and names but the file holds one layer's bytes (how a 27B-shaped source fits on a
  disk that must also hold the 54 GB output).
* Hugging Face directory: ``write_hf_dir`` (5 GB shards) with a small SentencePiece tokenizer.
* KerasHub preset: ``formats.keras_writer`` (one ``model.weights.h5``, as ``save_to_preset`` writes it) with
  the same small tokenizer as its vocabulary.spm.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
from pathlib import Path

import torch

from reference.config import PRESETS, Gemma2Config

SIZES = ("tiny", "2b", "9b", "27b")


def preset(size: str) -> Gemma2Config:
    return PRESETS[size]


def n_params(cfg: Gemma2Config) -> int:
    from reference.weights import expected_shapes

    return sum(torch.Size(s).numel() for s in expected_shapes(cfg).values())


def layer_slice(cfg: Gemma2Config) -> Gemma2Config:
    """One decoder layer of ``cfg`` with the embedding cut so that it keeps its share of the parameters
    (about 23 % for gemma-2-2b): the quantization mix of the full model on ~1/25 of its size."""
    one = cfg.replace(num_hidden_layers=1, layer_types=())
    share = cfg.vocab_size * cfg.hidden_size / n_params(cfg)
    layer = n_params(one) - one.vocab_size * one.hidden_size - one.hidden_size
    vocab = int(share / (1 - share) * layer / cfg.hidden_size)
    vocab = max(512, -(-vocab // 256) * 256)
    return one.replace(vocab_size=min(vocab, cfg.vocab_size))


class _Storage:
    """A storage record to be: pickled as torch.save's persistent id, its bytes written afterwards."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles like a contiguous tensor over a whole ``_Storage`` (``torch._utils._rebuild_tensor_v2``)."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = torch.empty(self.shape, device="meta").stride()
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _Storage):
            kind = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return "storage", kind, obj.key, "cpu", obj.numel
        return None


def _orig_plan(cfg: Gemma2Config, share_layers: bool) -> tuple[dict[str, _Tensor], list[tuple[str, str, tuple]]]:
    """The pickled state dict and, per storage record, (key, orig name, HF names it fuses)."""
    from gemma2_convert.formats.gemma_pytorch import expand, orig_shapes

    shapes = orig_shapes(cfg)
    state: dict[str, _Tensor] = {}
    records: list[tuple[str, str, tuple]] = []
    first: dict[str, _Storage] = {}
    for tpl, name, targets in expand(cfg.num_hidden_layers):
        shape = tuple(shapes[name])
        st = first.get(tpl) if share_layers and "{}" in tpl else None
        if st is None:
            st = _Storage(str(len(records)), torch.bfloat16, torch.Size(shape).numel())
            records.append((st.key, name, targets))
            first.setdefault(tpl, st)
        state[name] = _Tensor(st, shape)
    return state, records


def write_orig_ckpt(path: Path, cfg: Gemma2Config, *, share_layers: bool = False, seed: int = 0) -> int:
    """A bf16 gemma_pytorch ``model.ckpt`` of random weights, streamed; returns its size in bytes."""
    from gemma2_convert.formats.gemma_pytorch import fuse_qkv
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.testing import freqs_cis

    state, records = _orig_plan(cfg, share_layers)
    freqs = freqs_cis(cfg)
    fst = _Storage(str(len(records)), freqs.dtype, freqs.numel())
    state["freqs_cis"] = _Tensor(fst, tuple(freqs.shape))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({"model_state_dict": state})
    rand = random_tensors(cfg, seed, torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = torch._C.PyTorchFileWriter(str(path))
    try:
        w.write_record("data.pkl", buf.getvalue(), len(buf.getvalue()))
        for name, value in ((".format_version", "1"), (".storage_alignment", "64"), ("byteorder", "little")):
            w.write_record(name, value, len(value))
        for key, _, targets in records:
            parts = [rand[t].load() for t in targets]
            t = fuse_qkv(*parts) if len(parts) == 3 else parts[0]
            w.write_record(f"data/{key}", t.untyped_storage(), t.untyped_storage().nbytes())
            del parts, t
        w.write_record(f"data/{fst.key}", freqs.untyped_storage(), freqs.untyped_storage().nbytes())
        w.write_end_of_file()
    finally:
        del w
    return path.stat().st_size


def write_hf_source(out: Path, cfg: Gemma2Config, *, seed: int = 0, max_shard_size: str = "5GB") -> int:
    """A bf16 HF directory of random weights with a small tokenizer; returns its parameter count."""
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    out.mkdir(parents=True)
    tok = make_tiny_spm(out.parent / f"{out.name}.tokenizer.model", min(512, cfg.vocab_size))
    items = list(random_tensors(cfg, seed, torch.bfloat16).items())
    write_hf_dir(out, cfg, items, tokenizer=tok, max_shard_size=max_shard_size)
    tok.unlink()
    return sum(t.numel for _, t in items)


def shared_hf_source(root: Path, size: str) -> tuple[Path, int]:
    """A bf16 HF directory of the preset under ``root``, written on first use and reused by later benchmarks
    of the same harness run (it goes with the scratch directory); returns (directory, parameter count)."""
    src, marker = root / f"gemma-2-{size}-shaped-bf16", root / f"gemma-2-{size}-shaped-bf16.params"
    if not marker.exists():
        marker.write_text(str(write_hf_source(src, preset(size))))
    return src, int(marker.read_text())


def write_keras_source(out: Path, cfg: Gemma2Config, *, seed: int = 0) -> int:
    """A bf16 KerasHub preset of random weights, one variable in memory at a time; returns the bytes of its
    model.weights.h5."""
    from gemma2_convert.formats.keras_h5 import SINGLE
    from gemma2_convert.formats.keras_writer import write_keras_preset
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    out.parent.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_spm(out.parent / f"{out.name}.tokenizer.model", min(512, cfg.vocab_size))
    write_keras_preset(out, cfg, random_tensors(cfg, seed, torch.bfloat16), tokenizer=tok)
    tok.unlink()
    return (out / SINGLE).stat().st_size


def write_config(path: Path, cfg: Gemma2Config) -> Path:
    path.write_text(json.dumps(cfg.to_hf_dict()))
    return path
