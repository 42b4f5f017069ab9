"""Write a Gemma 2 model as a KerasHub preset directory, with h5py alone — keras is never imported.

The layout is what KerasHub 0.32.0 / keras 3.15.1 ``GemmaCausalLM.save_to_preset`` writes, so both our
reader (``keras.py``) and KerasHub's ``from_preset`` load it:

    config.json         the GemmaBackbone's class and arguments (``keras_args``) with its dtype policy
    model.weights.h5    one dataset per variable, ``<layer path>/vars/<n>`` (``keras_map``'s inverses),
                        written one at a time; bfloat16 as 2-byte opaque data with ``dtype = "bfloat16"``
    metadata.json       the Keras and KerasHub versions the layout follows, the parameter count
    given a tokenizer:  assets/tokenizer/vocabulary.spm, tokenizer.json, preprocessor.json and task.json
                        (the GemmaCausalLM with its GemmaCausalLMPreprocessor)

A KerasHub config states the query scale only as ``query_head_dim_normalize`` (head_dim, or hidden_dim //
num_query_heads), and no RoPE θ or activation of its own: a model it cannot state is refused, naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from gemma2_convert.core.dtypes import DTYPE_NAMES, FLOAT_DTYPES, dominant_dtype
from gemma2_convert.core.errors import (
    TensorMismatchError,
    UnsupportedError,
    check_names,
)
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats import keras_map as km
from gemma2_convert.formats.dense import (
    checked_cast,
    materialize_tokenizer,
    output_dtype,
    tokenizer_bytes,
    tokenizer_file,
    tolerance,
)
from gemma2_convert.formats.gemma_pytorch import check_shapes
from gemma2_convert.formats.keras import CONFIG, METADATA, TOKENIZER
from gemma2_convert.formats.keras_h5 import SINGLE, h5py_module
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.output import atomic_output
from gemma2_convert.formats.registry import (
    Checkpoint,
    WriteJob,
    Writer,
    register_writer,
)
from reference.config import Gemma2Config
from reference.weights import expected_shapes

KERAS_VERSION, KERAS_HUB_VERSION = "3.15.1", "0.32.0"
"""The versions whose ``save_to_preset`` layout this writes (metadata.json records them)."""
UNRECORDED = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "extra")
"""Config fields a KerasHub preset does not record and the forward pass does not read: not compared."""
SEQUENCE_LENGTH = 1024  # GemmaCausalLMPreprocessor's default


# ---- config.json and the task files --------------------------------------------------------------

def keras_args(cfg: Gemma2Config, where: Path | None = None) -> dict[str, Any]:
    """The GemmaBackbone arguments of ``cfg``; UnsupportedError naming every field a KerasHub config cannot
    state (the query scale must be head_dim or hidden // heads; RoPE θ 10000, GELU-tanh, tied embeddings)."""
    args = {"vocabulary_size": cfg.vocab_size, "num_layers": cfg.num_hidden_layers,
            "num_query_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "hidden_dim": cfg.hidden_size, "intermediate_dim": 2 * cfg.intermediate_size, "head_dim": cfg.head_dim,
            "layer_norm_epsilon": cfg.rms_norm_eps, "dropout": 0,
            "query_head_dim_normalize": cfg.query_pre_attn_scalar != cfg.hidden_size // cfg.num_attention_heads,
            "use_post_ffw_norm": True, "use_post_attention_norm": True,
            "final_logit_soft_cap": cfg.final_logit_softcapping,
            "attention_logit_soft_cap": cfg.attn_logit_softcapping, "sliding_window_size": cfg.sliding_window,
            "use_sliding_window_attention": True}
    back = km.to_gemma2_config(args, cfg.torch_dtype, where or Path(CONFIG))
    fields = [f.name for f in dataclasses.fields(cfg) if f.name not in UNRECORDED]
    bad = [f"{k} {getattr(cfg, k)!r} (KerasHub's would be {getattr(back, k)!r})"
           for k in fields if getattr(cfg, k) != getattr(back, k)]
    if bad:
        raise UnsupportedError(f"a KerasHub {km.BACKBONE} cannot state this model: {'; '.join(bad)}. Its config "
                               "has the query scale as head_dim or hidden_dim // num_query_heads only, RoPE θ "
                               f"{km.ROPE_THETA:g}, GELU-tanh and tied embeddings", where)
    return args


def _policy(dtype: str) -> dict[str, Any]:
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}, "registered_name": None}


def _serialized(module: str, class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"module": f"keras_hub.src.models.gemma.{module}", "class_name": class_name, "config": config,
            "registered_name": f"keras_hub>{class_name}"}


def backbone_json(args: Mapping[str, Any], dtype: str | None = None,
                  class_name: str = km.BACKBONE) -> dict[str, Any]:
    """config.json: the backbone serialized as Keras does (``dtype``: its DTypePolicy, or none stated)."""
    policy = {} if dtype is None else {"dtype": _policy(dtype)}
    config = {"name": "gemma_backbone", "trainable": True, **policy, **args}
    return _serialized("gemma_backbone", class_name, config)


def task_jsons(backbone: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """tokenizer.json, preprocessor.json and task.json of a GemmaCausalLM whose tokenizer is in the assets."""
    tok = _serialized("gemma_tokenizer", "GemmaTokenizer", {
        "name": "gemma_tokenizer", "trainable": True, "dtype": _policy("int32"), "config_file": "tokenizer.json",
        "proto": None, "sequence_length": None, "add_bos": False, "add_eos": False})
    pre = _serialized("gemma_causal_lm_preprocessor", "GemmaCausalLMPreprocessor", {
        "name": "gemma_causal_lm_preprocessor", "trainable": True, "dtype": _policy("float32"), "tokenizer": tok,
        "config_file": "preprocessor.json", "sequence_length": SEQUENCE_LENGTH, "add_start_token": True,
        "add_end_token": True})
    task = _serialized("gemma_causal_lm", "GemmaCausalLM",
                       {"backbone": backbone, "preprocessor": pre, "name": "gemma_causal_lm"})
    return {"tokenizer.json": tok, "preprocessor.json": pre, "task.json": task}


def _write_json(path: Path, obj: Mapping[str, Any]) -> str:
    path.write_text(json.dumps(obj, indent=4) + "\n", encoding="utf-8")
    return path.name


def write_config(d: Path, args: Mapping[str, Any], class_name: str = km.BACKBONE, dtype: str | None = None) -> str:
    """config.json of GemmaBackbone arguments into the directory ``d``."""
    return _write_json(d / CONFIG, backbone_json(args, dtype, class_name))


# ---- model.weights.h5 --------------------------------------------------------------------------

def keras_variables(tensors: Mapping[str, LazyTensor], cfg: Gemma2Config) -> Iterator[tuple[str, LazyTensor]]:
    """(Keras variable path, its stored kernel, lazily) from HF-named tensors: the table's inverses."""
    for name, hf, rule in km.expand(cfg.num_hidden_layers):
        yield name, tensors[hf].map(lambda t, f=rule.inverse: f(t, cfg), shape=rule.shape(cfg))


def write_variable(group: Any, key: str, t: torch.Tensor) -> None:
    """One variable as keras' H5IOStore writes it (bfloat16: 2-byte opaque + the ``dtype`` attribute)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        ds = group.create_dataset(key, data=t.view(torch.int16).numpy().view("V2"))
        ds.attrs["dtype"] = "bfloat16"
    else:
        group.create_dataset(key, data=t.numpy())


def write_weights(path: Path, variables: Iterator[tuple[str, LazyTensor]] | Mapping[str, LazyTensor],
                  on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """A Keras 3 ``model.weights.h5``, one variable in memory at a time."""
    h5py = h5py_module(path)
    items = variables.items() if isinstance(variables, Mapping) else variables
    with h5py.File(path, "w") as f:
        for name, t in items:
            group, _, key = name.rpartition("/")
            write_variable(f.require_group(group), key, t.load())
            if on_tensor is not None:
                on_tensor(name, t.nbytes)
    return path


# ---- the preset directory --------------------------------------------------------------------------

def check_keras_input(cfg: Gemma2Config, tensors: Mapping[str, LazyTensor],
                      where: Path) -> tuple[dict[str, Any], torch.dtype]:
    """(the GemmaBackbone arguments, the one float dtype of ``tensors``), after checking that KerasHub can
    state ``cfg`` (``keras_args``) and the tensors' names and shapes against it."""
    args = keras_args(cfg, where)
    want = expected_shapes(cfg)
    check_names(want, tensors, where, what="tensors")
    check_shapes(want, {k: t.shape for k, t in tensors.items()}, where)
    dtypes = sorted({t.dtype for t in tensors.values()}, key=str)
    if len(dtypes) != 1 or dtypes[0] not in DTYPE_NAMES:
        raise TensorMismatchError(f"expected tensors of one dtype of {', '.join(DTYPE_NAMES.values())}, got "
                                  f"{', '.join(str(t).removeprefix('torch.') for t in dtypes)}", where)
    return args, dtypes[0]


def write_keras_dir(out: Path, cfg: Gemma2Config, tensors: Mapping[str, LazyTensor], *,
                    tokenizer: Path | None = None, on_tensor: Callable[[str, int], None] | None = None) -> list[str]:
    """Write the preset's files into ``out`` (an existing empty directory); returns their names."""
    args, dtype = check_keras_input(cfg, tensors, out)
    backbone = backbone_json(args, DTYPE_NAMES[dtype])
    write_weights(out / SINGLE, keras_variables(tensors, cfg), on_tensor)
    names = [SINGLE, _write_json(out / CONFIG, backbone)]
    if tokenizer is not None:
        (out / TOKENIZER).parent.mkdir(parents=True)
        shutil.copyfile(tokenizer, out / TOKENIZER)
        names += [str(TOKENIZER), *(_write_json(out / n, obj) for n, obj in task_jsons(backbone).items())]
    meta = {"keras_version": KERAS_VERSION, "keras_hub_version": KERAS_HUB_VERSION,
            "parameter_count": sum(math.prod(t.shape) for t in tensors.values()),
            "date_saved": time.strftime("%Y-%m-%d@%H:%M:%S"), "tasks": ["CausalLM"]}  # as a backbone's save too
    return sorted([*names, _write_json(out / METADATA, meta)])


def write_keras_preset(path: str | Path, cfg: Gemma2Config, tensors: Mapping[str, LazyTensor], *,
                       tokenizer: Path | None = None) -> Path:
    """Write HF-named tensors of ``cfg`` (one dtype: float32, float16 or bfloat16) as a KerasHub preset
    directory at ``path``, which must not exist or be empty; returns ``path``. With ``tokenizer`` (a
    SentencePiece model) the preset is a whole GemmaCausalLM, tokenizer and preprocessor included."""
    path = Path(path)
    check_keras_input(cfg, tensors, path)
    h5py_module(path)
    with atomic_output(path, directory=True) as tmp:
        write_keras_dir(tmp, cfg, tensors, tokenizer=tokenizer)
    return path


def prepare_keras(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> WriteJob:
    """Plan ``ckpt`` as a KerasHub preset (one dtype: ``--dtype``, or the source's most common), with the
    source's tokenizer as its vocabulary.spm."""
    dominant = FLOAT_DTYPES[dominant_dtype([t.dtype for t in ckpt.tensors.values()])]
    dtype = output_dtype(ckpt, opts, progress) or dominant
    keras_args(ckpt.config, ckpt.path)
    h5py_module(ckpt.path)
    tok = tokenizer_file(ckpt, opts, progress)
    items = dict(checked_cast(ckpt, ckpt.tensors, dtype, opts, progress))
    size = sum(t.nbytes for t in items.values())

    def write(tmp: Path, progress: Progress) -> list[str]:
        spm = materialize_tokenizer(ckpt, tok, tmp)
        names = write_keras_dir(tmp, ckpt.config, items, tokenizer=spm, on_tensor=progress.on_tensor)
        if spm is not None and spm.parent == tmp:  # the source's embedded tokenizer, now in the assets
            spm.unlink()
        return names

    need = size + tokenizer_bytes(ckpt, tok) + (1 << 20)
    return WriteJob(ckpt.config.replace(torch_dtype=DTYPE_NAMES[dtype]), need, size, tolerance(ckpt, dtype), write)


register_writer(Writer("keras", "a KerasHub Gemma 2 preset directory (config.json, model.weights.h5, the "
                       "tokenizer; loads with keras_hub's from_preset), written with h5py (no Keras)",
                       directory=True, prepare=prepare_keras, reads_back_as="keras"))
