"""KerasHub Gemma 2 presets (``GemmaBackbone``: Kaggle's ``keras/gemma2`` handles, ``save_to_preset``
directories), read with h5py alone — keras, TensorFlow and JAX are never imported (spec §3).

A preset directory holds ``config.json`` (the backbone's class and arguments), ``model.weights.h5`` (or
``model.weights.json`` and its shards), ``assets/tokenizer/vocabulary.spm`` (the SentencePiece model),
``metadata.json`` (the Keras and KerasHub versions), ``tokenizer.json`` and, saved from a task,
``task.json`` and ``preprocessor.json``. A bare ``*.weights.h5`` (or ``*.weights.json``) with a
``config.json`` beside it reads the same way. The mapping is ``keras_map.KERAS_TO_HF``; the HDF5 access
is ``keras_h5``.

LoRA: Keras 3 folds an enabled LoRA into its kernel when it saves (``EinsumDense.save_own_variables``),
so a saved preset holds none. LoRA factors stored beside a kernel, or a KerasHub adapter file
(``*.lora.h5``, which ``from_preset`` does not apply) in the directory, are refused with how to fold them:
dropping them would convert another model than the user meant.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import (
    ConfigError,
    FormatError,
    UnsupportedError,
    check_names,
    name_list,
)
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats import keras_map as km
from gemma2_convert.formats.gemma_pytorch import check_shapes
from gemma2_convert.formats.keras_h5 import (
    MAGIC,
    SHARDED,
    SINGLE,
    H5Variable,
    list_variables,
    shard_files,
)
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.readahead import ReadAhead
from gemma2_convert.formats.registry import Checkpoint, register_reader
from gemma2_convert.formats.stored import Stored, TensorRow, json_file
from gemma2_convert.formats.tokenizer.spm import find_tokenizer
from reference.config import Gemma2Config
from reference.weights import expected_shapes

CONFIG = "config.json"
METADATA = "metadata.json"
TOKENIZER = Path("assets") / "tokenizer" / "vocabulary.spm"
FOLD = ("fold it into the kernels in Keras (backbone.enable_lora(rank); backbone.load_lora_weights(FILE); "
        "backbone.save_to_preset(DIR): Keras merges LoRA when it saves) and convert that preset")


# ---- finding the files -----------------------------------------------------------------------

def _weights_in(d: Path) -> Path | None:
    return next((d / n for n in (SINGLE, SHARDED) if (d / n).is_file()), None)


def _detect(p: Path) -> bool:
    """A directory with config.json and model.weights.h5/.json — or a file meant as Keras weights (``.h5``,
    ``*.weights.json``, HDF5 magic), so that the reader says what is wrong with a broken one."""
    if p.is_dir():
        return (p / CONFIG).is_file() and _weights_in(p) is not None
    if not p.is_file():
        return False
    if p.suffix in (".h5", ".hdf5") or p.name.endswith(".weights.json"):
        return True
    with open(p, "rb") as f:
        return f.read(8) == MAGIC


def locate(path: Path) -> tuple[Path, Path]:
    """(the preset directory, its weights: a ``.h5`` file or the shard map ``.json``)."""
    if not path.exists():
        raise FormatError("no such file or directory", path)
    d = path if path.is_dir() else path.parent
    weights = _weights_in(d) if path.is_dir() else path
    if weights is None:
        raise FormatError(f"no {SINGLE} or {SHARDED} here: not a KerasHub preset directory", path)
    if not (d / CONFIG).is_file():
        raise FormatError(f"no {d / CONFIG} beside the weights: a KerasHub preset keeps the backbone's config "
                          "there, and Keras weights alone do not state the model's sizes", path)
    return d, weights


def weight_files(weights: Path) -> list[Path]:
    return shard_files(weights) if weights.suffix == ".json" else [weights]


def read_backbone_config(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json as stored, the GemmaBackbone arguments: keras_map.backbone_config)."""
    raw = json_file(d / CONFIG)
    if raw is None:
        raise ConfigError("cannot read it as a JSON object", d / CONFIG)
    return raw, km.backbone_config(raw, d / CONFIG)


# ---- what must not be converted silently ---------------------------------------------------------

def refuse_adapters(d: Path) -> None:
    """A KerasHub LoRA adapter (``save_lora_weights``) in the preset directory: neither applied nor dropped."""
    found = sorted(p.name for p in d.glob("*.lora.h5"))
    if found:
        raise UnsupportedError(f"LoRA adapter file(s) {', '.join(found)} beside the preset: KerasHub's from_preset "
                               f"does not apply them, and this tool neither merges nor drops them. To convert the "
                               f"fine-tuned model, {FOLD}; to convert the base model, move the adapter out", d)


def refuse_unfolded(variables: Mapping[str, H5Variable], layers: int, where: Path) -> None:
    """Extra variables beside a mapped kernel: unfolded LoRA factors or a Keras-quantized kernel, refused."""
    by_group: dict[str, list[H5Variable]] = defaultdict(list)
    for v in variables.values():
        by_group[v.name.rpartition("/")[0]].append(v)
    for group, kernel in km.kernel_groups(layers).items():
        extra = sorted((v for v in by_group.get(group, []) if v.name != kernel), key=lambda v: v.name)
        w = variables.get(kernel)
        if not extra or w is None:
            continue
        if w.type in ("int8", "uint8"):  # Keras int8, and int4 packed two to a byte
            raise UnsupportedError(f"{kernel} is a Keras {w.type}-quantized kernel (with "
                                   f"{name_list(v.name for v in extra)}); quantized Keras presets are not supported: "
                                   "convert the float preset", where)
        shapes = [v.shape for v in extra]
        if len(extra) == 2 and shapes[0][:-1] == w.shape[:-1] and shapes[1] == (shapes[0][-1], w.shape[-1]):
            raise UnsupportedError(f"{group}: LoRA factors {extra[0].name} {list(shapes[0])} and {extra[1].name} "
                                   f"{list(shapes[1])} stored beside the kernel {list(w.shape)}. Keras 3 folds LoRA "
                                   "into the kernel when it saves, and the file does not record the LoRA scale "
                                   f"(alpha/rank), so they can be neither merged exactly nor dropped: {FOLD}", where)


def check_dtypes(variables: Mapping[str, H5Variable], where: Path) -> None:
    bad = sorted(f"{v.name} ({v.type})" for v in variables.values() if v.dtype is None)
    if bad:
        raise UnsupportedError(f"{len(bad)} variable(s) of a type this reader does not take (float32, float16, "
                               f"bfloat16): {name_list(bad, 8)}", where)


# ---- the reader ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A preset's files and variables, checked against its config (nothing read)."""

    dir: Path
    files: list[Path]
    """The weight files: model.weights.h5, or the shards."""
    raw_config: dict[str, Any]
    args: dict[str, Any]
    """The GemmaBackbone arguments (KerasHub's defaults filled in)."""
    config: Gemma2Config
    variables: dict[str, H5Variable]


def read_preset(path: Path) -> Preset:
    """Open a preset: config refused unless Gemma 2's, then the variables' names, shapes and dtypes checked."""
    d, weights = locate(path)
    files = weight_files(weights)
    variables = list_variables(files)  # first: a file that is no Keras weights file is named as such
    raw, args = read_backbone_config(d)
    refuse_adapters(d)
    refuse_unfolded(variables, max(km.num_blocks(list(variables)), 1), weights)
    cfg = km.to_gemma2_config(args, "float32", d / CONFIG)
    shapes = {n: v.shape for n, v in variables.items()}
    km.check_config(cfg, shapes, weights)
    check_names(km.keras_shapes(cfg), variables, weights, what="variables")
    check_dtypes(variables, weights)
    check_shapes(km.keras_shapes(cfg), shapes, weights, f" (config: {d / CONFIG})")
    cfg = cfg.replace(torch_dtype=variables[km.EMBED].type)
    return Preset(d, files, raw, args, cfg, variables)


def to_hf(variables: Mapping[str, H5Variable], cfg: Gemma2Config) -> dict[str, LazyTensor]:
    """Keras variables → HF-named lazy tensors (one variable read per tensor), in the canonical order
    (``expected_shapes``: layer by layer), each load transposing the next ones on a background thread
    (``ReadAhead``): two thirds of a Gemma 2's bytes are transposed, and the writer's I/O then hides it."""
    hf_shapes = expected_shapes(cfg)
    mapped = {hf: variables[name].lazy().map(lambda t, f=rule.transform: f(t, cfg), shape=hf_shapes[hf])
              for name, hf, rule in km.expand(cfg.num_hidden_layers)}
    return ReadAhead([(hf, mapped[hf]) for hf in hf_shapes]).tensors()


def _refuse_shape_options(opts: ShapeOptions | None, where: Path) -> None:
    if opts is not None and (opts.config is not None or opts.variant != "auto" or opts.overrides):
        raise ConfigError("a KerasHub preset states its sizes in config.json; --config, --variant and the head "
                          "flags apply to gemma_pytorch and Orbax checkpoints only", where)


def _versions(d: Path) -> dict[str, str]:
    meta = json_file(d / METADATA) or {}
    return {k: str(meta[k]) for k in ("keras_version", "keras_hub_version", "keras_nlp_version") if k in meta}


def stored_keras(path: Path) -> Stored:
    """The variables as the weights file stores them (paths, shapes, dtypes; nothing read)."""
    p = read_preset(path)
    rows = [TensorRow(v.name, v.shape, v.type, v.nbytes) for v in p.variables.values()]
    meta = {"files": [str(f.relative_to(p.dir)) for f in p.files], **_versions(p.dir)}
    return Stored(rows, {n: v.lazy() for n, v in p.variables.items()}, meta, raw_config=p.raw_config)


@register_reader("keras", "a KerasHub Gemma 2 preset directory (config.json + model.weights.h5), or a "
                 "*.weights.h5 with a config.json beside it", _detect, stored=stored_keras, original=True)
def open_keras(path: Path, options: ShapeOptions | None = None, tokenizer: str | Path | None = None,
               **_: object) -> Checkpoint:
    path = Path(path)
    _refuse_shape_options(options, path)
    p = read_preset(path)
    spm = p.dir / TOKENIZER
    tok = Path(tokenizer) if tokenizer else spm if spm.is_file() else find_tokenizer(p.dir)
    meta = {"source_format": "keras", "config_from": f"{CONFIG} ({km.BACKBONE})",
            "query_head_dim_normalize": str(p.args["query_head_dim_normalize"]).lower(),
            "source_dtype": p.config.torch_dtype, "weight_files": json.dumps([str(f) for f in p.files]),
            **_versions(p.dir)}
    return Checkpoint("keras", path, p.config, to_hf(p.variables, p.config), tok, meta)
