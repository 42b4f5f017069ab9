"""Hugging Face model directories: config.json + (sharded) safetensors + tokenizer files.

Read lazily (mmap); written shard by shard from a stream of lazy tensors (spec §4.1–4.4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma2_convert import __version__
from gemma2_convert.core.errors import (
    FormatError,
    TensorMismatchError,
    UnsupportedError,
)
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.core.units import parse_size
from gemma2_convert.formats.dense import (
    checked_cast,
    materialize_tokenizer,
    output_dtype,
    provenance,
    tokenizer_bytes,
    tokenizer_file,
    tolerance,
)
from gemma2_convert.formats.hf_quantized import dequantizing_tensors
from gemma2_convert.formats.mlx_layout import is_mlx_dir
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import (
    Checkpoint,
    WriteJob,
    Writer,
    register_reader,
    register_writer,
)
from gemma2_convert.formats.safetensors import (
    DTYPE_NAMES,
    SafetensorsFile,
    write_safetensors,
)
from gemma2_convert.formats.stored import Stored, json_file, safetensors_rows, summary
from gemma2_convert.formats.tokenizer.hf_files import write_hf_tokenizer
from reference.config import Gemma2Config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _is_hf_dir(p: Path) -> bool:
    has_files = p.is_dir() and (p / "config.json").is_file() and ((p / SINGLE).is_file() or (p / INDEX).is_file())
    return has_files and not is_mlx_dir(p)  # mlx-lm's quantized layout: the mlx reader's


def shard_files(d: Path) -> list[str]:
    """Files holding the weights: the index's shards (checked to exist) or model.safetensors."""
    if not (d / INDEX).is_file():
        return [SINGLE]
    try:
        index = json.loads((d / INDEX).read_text(encoding="utf-8"))
        files = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"malformed index ({type(e).__name__}: {e})", d / INDEX) from None
    bad = [f for f in files if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith(".")]
    if bad:
        raise FormatError(f"index names shard files outside the directory: {bad}", d / INDEX)
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise FormatError(f"index points at missing shard(s): {', '.join(missing)}", d / INDEX)
    return files


def read_tensors(d: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """All tensors of the directory's shards, and the first shard's __metadata__."""
    tensors: dict[str, LazyTensor] = {}
    meta: dict[str, str] = {}
    for fname in shard_files(d):
        f = SafetensorsFile(d / fname)
        meta = meta or f.metadata
        dup = tensors.keys() & set(f.names())
        if dup:
            raise TensorMismatchError(f"tensor(s) stored twice across shards: {sorted(dup)}", d)
        tensors.update(f.tensors())
    return tensors, meta


BASE_PREFIXES = ("embed_tokens.", "layers.", "norm.")


def canonical_names(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """A bare ``Gemma2Model`` is saved without the ``model.`` prefix; add it (canonical names)."""
    return {("model." + k if k.startswith(BASE_PREFIXES) else k): v for k, v in tensors.items()}


def saved_name(name: str, config: Gemma2Config) -> str:
    """The name transformers saves for ``config``'s class (a bare Gemma2Model drops ``model.``)."""
    return name.removeprefix("model.") if config.head == "base" else name


def drop_tied_head(tensors: dict[str, LazyTensor], config: Gemma2Config) -> None:
    """A stray lm_head.weight in a tied model is ignored, as transformers and llama.cpp do."""
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)


def _gemma2_config(path: Path) -> Path:
    """``path``, after refusing a config of another architecture by name (before its missing keys)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return path  # Gemma2Config.from_json_file says what is wrong with it
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind is not None and kind != "gemma2":
        arch = ", ".join(raw.get("architectures") or []) or "?"
        raise UnsupportedError(f"model_type is {kind!r}, expected 'gemma2' (architectures: {arch}): this is not a "
                               "Gemma 2 model", path)
    return path


def stored_hf(path: Path) -> Stored:
    """The directory as stored: its shards' tensors, config.json, provenance and added tokens."""
    files = shard_files(path)
    rows, tensors, st_meta = safetensors_rows([path / f for f in files])
    raw = json_file(path / "config.json")
    meta: dict[str, Any] = {"files": files, **{f"safetensors.{k}": summary(v) for k, v in st_meta.items()}}
    quant = (raw or {}).get("quantization_config")
    if isinstance(quant, dict):
        meta["quantization"] = f"{quant.get('quant_method')} ({quant.get('format', '?')})"
    tok_cfg = json_file(path / "tokenizer_config.json") or {}
    added = tok_cfg.get("added_tokens_decoder")
    special = ({str(e.get("content")): bool(e.get("special")) for e in added.values() if isinstance(e, dict)}
               if isinstance(added, dict) else None)
    return Stored(rows, tensors, meta, json_file(path / "gemma2_convert.json"), raw, special_tokens=special)


@register_reader("hf", "a Hugging Face directory with config.json and *.safetensors", _is_hf_dir,
                 stored=stored_hf)
def open_hf_dir(path: Path, **_: object) -> Checkpoint:
    config = Gemma2Config.from_json_file(_gemma2_config(path / "config.json"))
    raw_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tensors, meta = read_tensors(path)
    tensors = canonical_names(tensors)
    if "quantization_config" in raw_cfg:
        tensors = dequantizing_tensors(tensors, raw_cfg["quantization_config"], path)
    drop_tied_head(tensors, config)
    tok = path / "tokenizer.model"
    return Checkpoint("hf", path, config, tensors, tok if tok.is_file() else None, meta)


# ---- writing ---------------------------------------------------------------------------------

def plan_shards(items: list[tuple[str, LazyTensor]], max_bytes: int) -> list[list[tuple[str, LazyTensor]]]:
    """Split in order into shards of at most max_bytes (a bigger single tensor gets its own shard)."""
    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    size = 0
    for name, t in items:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += t.nbytes
    return shards


def config_for_output(config: Gemma2Config, items: list[tuple[str, LazyTensor]]) -> Gemma2Config:
    """The config with torch_dtype set to the dtype actually written (most tensors' dtype)."""
    dtypes = [t.dtype for _, t in items if t.dtype in TORCH_DTYPE_NAMES]
    if not dtypes:
        return config
    main = max(set(dtypes), key=dtypes.count)
    return config.replace(torch_dtype=TORCH_DTYPE_NAMES[main])


def generation_config(config: Gemma2Config) -> dict:
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else list(config.eos_token_id)
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id,
            "cache_implementation": "hybrid", "transformers_version": "4.45.0"}


def write_hf_dir(
    out: Path, config: Gemma2Config, items: list[tuple[str, LazyTensor]], *,
    max_shard_size: int | str = "5GB", tokenizer: Path | None = None, provenance: dict | None = None,
    extra_config: dict | None = None, on_tensor: Callable[[str, int], None] | None = None,
    direct_io: bool = True,
) -> list[Path]:
    """Write an HF model directory into ``out`` (an existing empty directory); return the files."""
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise FormatError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    items = [(saved_name(name, config), t) for name, t in items]
    shards = plan_shards(items, parse_size(max_shard_size))
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for fname, shard in zip(names, shards):
        write_safetensors(out / fname, shard, {"format": "pt"}, on_tensor, direct_io)
        written.append(out / fname)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for _, t in items)},
                 "weight_map": {name: f for f, shard in zip(names, shards) for name, _ in shard}}
        written.append(_write_json(out / INDEX, index))
    cfg = config_for_output(config, items).to_hf_dict()
    cfg.update(extra_config or {})
    cfg["transformers_version"] = cfg.get("transformers_version", "4.45.0")
    written.append(_write_json(out / "config.json", cfg))
    written.append(_write_json(out / "generation_config.json", generation_config(config)))
    if tokenizer is not None:
        written += write_hf_tokenizer(tokenizer, out)
    written.append(_write_json(out / "gemma2_convert.json", {"converter": f"gemma2-convert {__version__}",
                                                              **(provenance or {})}))
    return written


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def prepare_hf(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> WriteJob:
    """Plan ``ckpt`` as an HF directory: cast tensors, the tokenizer to ship, provenance, size, tolerance."""
    dtype = output_dtype(ckpt, opts, progress)
    tok = tokenizer_file(ckpt, opts, progress)
    items = checked_cast(ckpt, ckpt.tensors, dtype, opts, progress)
    prov = provenance(ckpt, opts.command, {"dtype": opts.dtype, "max_shard_size": str(opts.max_shard_size),
                                           "tokenizer": str(tok) if tok else None, "verify": opts.verify})
    size = sum(t.nbytes for _, t in items)

    def write(tmp: Path, progress: Progress) -> list[str]:
        files = write_hf_dir(tmp, ckpt.config, items, max_shard_size=opts.max_shard_size,
                             tokenizer=materialize_tokenizer(ckpt, tok, tmp), provenance=prov,
                             on_tensor=progress.on_tensor, direct_io=opts.direct_io)
        return sorted(p.name for p in files)

    return WriteJob(config_for_output(ckpt.config, items), size + tokenizer_bytes(ckpt, tok), size,
                    tolerance(ckpt, dtype), write)


register_writer(Writer("hf", "a Hugging Face model directory (config, sharded safetensors, tokenizer files)",
                       directory=True, prepare=prepare_hf, reads_back_as="hf"))
