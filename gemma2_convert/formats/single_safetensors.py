"""One self-describing safetensors file: the tensors plus the model config in ``__metadata__``.

``__metadata__`` (every value a string, spec §4.2):

| key | value |
|---|---|
| ``format`` | ``"pt"`` |
| ``gemma2.config`` | the config.json object (every Gemma 2 field explicit), as JSON |
| ``gemma2.names`` | ``"hf"`` (transformers names) or ``"orig"`` (gemma_pytorch names: ``embedder.weight``, fused ``qkv_proj``) |
| ``gemma2.provenance`` | the conversion record (converter version, source, options), as JSON |

The reader maps ``orig`` names to the canonical HF names (qkv split by rows), so the reference
model and every writer load either spelling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gemma2_convert.core.errors import ConfigError, FormatError, check_names
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.core.units import human_bytes
from gemma2_convert.formats.dense import (
    checked_cast,
    output_dtype,
    provenance,
    tolerance,
)
from gemma2_convert.formats.gemma_pytorch import from_hf, orig_names, to_hf
from gemma2_convert.formats.hf import config_for_output, drop_tied_head
from gemma2_convert.formats.options import NAMES, ConvertOptions
from gemma2_convert.formats.registry import (
    Checkpoint,
    WriteJob,
    Writer,
    register_reader,
    register_writer,
)
from gemma2_convert.formats.safetensors import SafetensorsFile, write_safetensors
from gemma2_convert.formats.stored import Stored, json_text, safetensors_rows, summary
from gemma2_convert.formats.tokenizer.spm import find_tokenizer
from reference.config import Gemma2Config

HUB_FILE_LIMIT = 50 * 10**9
"""The Hugging Face Hub refuses files larger than this (huggingface_hub#1624)."""
CONFIG_KEY = "gemma2.config"
NAMES_KEY = "gemma2.names"
PROVENANCE_KEY = "gemma2.provenance"


def _detect(p: Path) -> bool:
    """A file named ``*.safetensors``, or whose bytes begin like one (a u64 length, then ``{``): it is
    claimed even when broken, so that the reader says what is wrong with it."""
    if not p.is_file():
        return False
    if p.suffix == ".safetensors":
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and head[:4] != b"GGUF"


def stored_single(path: Path) -> Stored:
    """The file as stored: its tensors, and its metadata less the config and provenance (shown apart)."""
    rows, tensors, meta = safetensors_rows([path])
    shown = {k: summary(v) for k, v in meta.items() if k not in (CONFIG_KEY, PROVENANCE_KEY)}
    return Stored(rows, tensors, shown, json_text(meta.get(PROVENANCE_KEY)), json_text(meta.get(CONFIG_KEY)))


@register_reader("safetensors", "one .safetensors file with the model config in its __metadata__ "
                 "(written by orig-to-safetensors)", _detect, stored=stored_single)
def open_single_safetensors(path: Path, **_: object) -> Checkpoint:
    f = SafetensorsFile(path)
    if CONFIG_KEY not in f.metadata:
        raise ConfigError(f"holds no model config ({CONFIG_KEY!r} in __metadata__); a safetensors file from a "
                          "Hugging Face directory is read with its directory (pass the directory, which has "
                          "config.json)", path)
    try:
        raw = json.loads(f.metadata[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise ConfigError(f"__metadata__ {CONFIG_KEY!r} is not valid JSON ({e})", path) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"__metadata__ {CONFIG_KEY!r} is not a JSON object", path)
    cfg = Gemma2Config.from_hf_dict(raw, path)
    names = f.metadata.get(NAMES_KEY, "hf")
    tensors = f.tensors()
    if names == "orig":
        check_names(orig_names(cfg.num_hidden_layers), tensors, path)
        tensors = to_hf(tensors, cfg)
    elif names == "hf":
        drop_tied_head(tensors, cfg)
    else:
        raise FormatError(f"__metadata__ {NAMES_KEY!r} is {names!r}; expected one of {', '.join(NAMES)}", path)

    return Checkpoint("safetensors", path, cfg, tensors, find_tokenizer(path), dict(f.metadata))


def write_single_safetensors(
    path: Path, config: Gemma2Config, items: list[tuple[str, LazyTensor]], *, names: str = "hf",
    provenance: dict | None = None, on_tensor: Callable[[str, int], None] | None = None,
    direct_io: bool = True,
) -> int:
    """Write ``items`` (already named per ``names``) with the config in the metadata; returns bytes written."""
    if names not in NAMES:
        raise ConfigError(f"unknown --names {names!r}; choose one of {', '.join(NAMES)}")
    meta = {
        "format": "pt",
        CONFIG_KEY: json.dumps(config_for_output(config, items).to_hf_dict(), separators=(",", ":")),
        NAMES_KEY: names,
        PROVENANCE_KEY: json.dumps(provenance or {}, separators=(",", ":")),
    }
    return write_safetensors(path, items, meta, on_tensor, direct_io)


def prepare_single(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress) -> WriteJob:
    """Plan ``ckpt`` as one safetensors file under ``opts.names`` (hf, or gemma_pytorch's fused qkv)."""
    dtype = output_dtype(ckpt, opts, progress)
    tensors = ckpt.tensors if opts.names == "hf" else from_hf(ckpt.tensors, ckpt.config)
    items = checked_cast(ckpt, tensors, dtype, opts, progress)
    prov = provenance(ckpt, opts.command, {"dtype": opts.dtype, "names": opts.names, "verify": opts.verify})
    size = sum(t.nbytes for _, t in items)
    if size > HUB_FILE_LIMIT:
        progress.warn(f"{ckpt.path}: the single file will be {human_bytes(size)}, over the Hugging Face Hub's "
                      f"{human_bytes(HUB_FILE_LIMIT)} per-file limit; for the Hub write a sharded directory "
                      "instead (--to hf, or orig-to-hf, with --max-shard-size)")

    def write(tmp: Path, progress: Progress) -> list[str]:
        write_single_safetensors(tmp, ckpt.config, items, names=opts.names, provenance=prov,
                                 on_tensor=progress.on_tensor, direct_io=opts.direct_io)
        return []

    return WriteJob(config_for_output(ckpt.config, items), size + (1 << 20), size, tolerance(ckpt, dtype), write)


register_writer(Writer("safetensors", "one .safetensors file with the config in its __metadata__",
                       directory=False, prepare=prepare_single, reads_back_as="safetensors"))
