"""The ``gguf`` writer: a canonical checkpoint as a gemma2 GGUF that llama.cpp runs with the model's logits.

Every tensor is renamed (``names``), given a type (``mix``), transformed (+1 on norms, the query-scale
fold) and quantized in row chunks straight into the file (``writer``). The plan — tensor types, metadata,
header, size and the tolerance verification applies — is made before anything is written. With a split
option the file is a set of parts in llama.cpp's gguf-split layout (``split``), written one after the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import xxhash

from gemma2_convert import __version__
from gemma2_convert.core.dtypes import dominant_dtype
from gemma2_convert.core.errors import ConfigError, UnsupportedError, name_list
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.gguf import metadata as gm
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.importance import (
    imatrix_metadata,
    load_imatrix,
    missing_warning,
    weigh_plans,
)
from gemma2_convert.formats.gguf.mix import (
    TypeChoice,
    check_type,
    choose_type,
    file_type,
)
from gemma2_convert.formats.gguf.names import (
    add_one,
    fold_query,
    gguf_name,
    is_norm,
    is_query,
    llama_cpp_query_scalar,
    norm_residual,
    query_fold_ratio,
)
from gemma2_convert.formats.gguf.split import (
    Part,
    part_name,
    part_pattern,
    plan_parts,
    seal_parts,
    split_prefix,
)
from gemma2_convert.formats.gguf.transcode import (
    gguf_transcode,
    transcode_planner,
    with_transcode,
)
from gemma2_convert.formats.gguf.values import Value, ValueType, array, string
from gemma2_convert.formats.gguf.writer import (
    TensorPlan,
    header_bytes,
    patch_string,
    write_gguf,
)
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import (
    Checkpoint,
    WriteJob,
    Writer,
    register_writer,
)
from gemma2_convert.formats.tokenizer.spm import find_tokenizer, gguf_vocab
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.formats.weight_check import WeightCheck
from quant.gguf_types import ggml_type
from reference.weights import expected_shapes

HASH_PLACEHOLDER = "pending-" + "0" * 24  # as long as the hex digest, which replaces it once the data is written
EXACT_BOUND = (1e-6, 1.0)
"""(max mean KL, min top-1) for a stored type without a lossy bound of its own (``GGMLType.lossy_bound``)."""



def source_dtype(ckpt: Checkpoint) -> str:
    """The dominant float dtype of the source tensors, as a torch dtype name."""
    return dominant_dtype([t.dtype for t in ckpt.tensors.values()])


def tensor_order(ckpt: Checkpoint) -> list[str]:
    """Embedding, then the layers in order, then the final norm (HF names)."""
    return [n for n in expected_shapes(ckpt.config) if n != "model.norm.weight"] + ["model.norm.weight"]


def plan_tensors(ckpt: Checkpoint, type_name: str,
                 imatrix: bool = False) -> tuple[list[TensorPlan], list[TypeChoice]]:
    """One TensorPlan per tensor (with the +1 / fold transforms), and every tensor's type choice (``imatrix``:
    the mix as llama-quantize chooses it when given an importance matrix)."""
    cfg = ckpt.config
    ratio = query_fold_ratio(cfg)
    plans, choices = [], []
    for hf in tensor_order(ckpt):
        src, name = ckpt.tensors[hf], gguf_name(hf)
        choice = choose_type(name, src.shape, type_name, cfg.num_hidden_layers,
                             cfg.num_attention_heads // cfg.num_key_value_heads, imatrix)
        transform = add_one if is_norm(hf) else (lambda w: fold_query(w, ratio)) if is_query(hf) and ratio != 1 else None
        plans.append(TensorPlan(name, src, choice.qtype, transform))
        choices.append(choice)
    return plans, choices


def norm_residuals(ckpt: Checkpoint) -> list[tuple[str, Value]]:
    """Metadata holding the low bits that float32 ``1 + w`` drops, for norms where any are lost."""
    out = []
    for hf in tensor_order(ckpt):
        if is_norm(hf):
            r = norm_residual(ckpt.tensors[hf].load())
            if bool(r.any()):
                out.append((gm.K_NORM_RESIDUAL + gguf_name(hf), array(ValueType.FLOAT32, r.tolist())))
    return out


def provenance(ckpt: Checkpoint, ratio: float) -> list[tuple[str, Value]]:
    cfg = ckpt.config
    return [
        (gm.K_VERSION, string(__version__)),
        (gm.K_SOURCE, string(ckpt.path.name)),
        (gm.K_SOURCE_FORMAT, string(ckpt.format)),
        (gm.K_SOURCE_DTYPE, string(source_dtype(ckpt))),
        (gm.K_SOURCE_FINGERPRINT, string(HASH_PLACEHOLDER)),
        (gm.K_QUERY_SCALAR, Value(ValueType.FLOAT64, float(cfg.query_pre_attn_scalar))),
        (gm.K_QUERY_FOLD, Value(ValueType.FLOAT64, ratio)),
        (gm.K_NORM, string(gm.NORM_CONVENTION)),
        (gm.K_HF_CONFIG, string(json.dumps(cfg.to_hf_dict(), sort_keys=True))),
    ]


def vocabulary(ckpt: Checkpoint, tokenizer: Path | None) -> list[tuple[str, Value]]:
    """``tokenizer.*`` keys and the embedded ``tokenizer.model``: from a SentencePiece file, or copied
    from a GGUF source."""
    tok = tokenizer or ckpt.tokenizer
    if tok is None and ckpt.format == "gguf":
        f = GGUFFile(ckpt.path)
        keys = [k for k in f.kv if k.startswith("tokenizer.") or k == gm.K_TOKENIZER_MODEL]
        if keys:
            return [(k, copy_value(f, k)) for k in keys]
    if tok is None:
        tok = find_tokenizer(ckpt.path)
    if tok is None:
        raise ConfigError("no tokenizer.model found next to the checkpoint; llama.cpp needs the vocabulary. "
                          "Pass --tokenizer PATH/tokenizer.model", ckpt.path)
    if not Path(tok).is_file():
        raise ConfigError("tokenizer file not found", tok)
    keys = gm.vocab_metadata(gguf_vocab(tok, ckpt.config.vocab_size).metadata())
    return keys + [(gm.K_TOKENIZER_MODEL, array(ValueType.UINT8, Path(tok).read_bytes()))]


def copy_value(f: GGUFFile, key: str) -> Value:
    """Metadata ``key`` of ``f`` as a value to write again, with its stored type."""
    vtype, item = f.kv_types[key]
    v = f.kv[key]
    return array(ValueType(item), v) if vtype == ValueType.ARRAY else Value(ValueType(vtype), v)


def tolerance(choices: list[TypeChoice], ckpt: Checkpoint, ratio: float) -> Tolerance:
    """What verification demands of the written file, given the stored types and the query fold.

    Exact when every tensor reads back bit-exactly (a type at least as wide as the source, and no
    fold — or a fold on a 16-bit source stored in F32, which reads back onto the source's grid);
    equal-after-cast for narrower float types; otherwise bounds for the loosest stored type.
    """
    stored = {c.qtype for c in choices if c.reason not in ("norm", "1-D")}
    src = {t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point}
    widening = {"F32"} | ({"BF16"} if src <= {torch.bfloat16} else set()) | ({"F16"} if src <= {torch.float16} else set())
    if stored <= widening and (ratio == 1.0 or (stored == {"F32"} and src <= {torch.bfloat16, torch.float16})):
        return Tolerance()
    if stored <= {"F32", "F16", "BF16"} and ratio == 1.0:
        return Tolerance.cast()
    if stored == {"F32"}:  # a fold on float32 weights: q_proj reads back within one ulp
        return Tolerance.lossy(max_kl=1e-6, min_top1=1.0, max_abs=1e-3)
    worst = max((ggml_type(t).lossy_bound or EXACT_BOUND for t in stored), key=lambda b: b[0])
    return Tolerance.lossy(*worst)


def causal_lm_view(ckpt: Checkpoint, drop_head: bool, warn: Callable[[str], None]) -> Checkpoint:
    """llama.cpp's gemma2 is a causal LM with the tied head. A classifier is refused unless ``drop_head``
    (then its ``score`` head is left out, with a warning); a bare decoder gets the tied head it implies."""
    head = ckpt.config.head
    if head == "causal_lm":
        return ckpt
    if head != "base" and not drop_head:
        raise UnsupportedError(f"this is a {ckpt.config.architectures[0]} ({ckpt.config.num_labels} labels); "
                               "llama.cpp's gemma2 architecture has no classification head. Pass --drop-head to "
                               "export the decoder with the tied language-model head instead", ckpt.path)
    if head != "base":
        warn(f"{ckpt.path}: dropping the {head.replace('_', ' ')} head (score); the GGUF is a causal LM")
    tensors = {k: v for k, v in ckpt.tensors.items() if not k.startswith("score.")}
    cfg = ckpt.config.replace(architectures=("Gemma2ForCausalLM",), id2label=(), problem_type=None)
    return replace(ckpt, config=cfg, tensors=tensors, metadata=dict(ckpt.metadata))




Planner = Callable[[Checkpoint, str], tuple[list[TensorPlan], list[TypeChoice]]]
"""Chooses every tensor's type and block encoder (``plan_tensors``; ``gemma2-quantize`` brings its own)."""


def _warn_plan(ckpt: Checkpoint, ratio: float, choices: list[TypeChoice], progress: Progress) -> None:
    cfg = ckpt.config
    if ratio != 1.0:
        progress.warn(f"llama.cpp assumes query_pre_attn_scalar {llama_cpp_query_scalar(cfg):g} for "
                      f"{cfg.num_hidden_layers} layers; this model uses {cfg.query_pre_attn_scalar:g}, so attn_q "
                      f"is scaled by {ratio:.6g} (undone when read back)")
    fallbacks = [c for c in choices if c.reason.startswith("fallback")]
    if fallbacks:
        progress.warn(f"{len(fallbacks)} tensor(s) have rows that are not a whole number of blocks and fall back "
                      f"as llama-quantize does: {name_list(f'{c.name} → {c.qtype}' for c in fallbacks)}")


def prepare_gguf(ckpt: Checkpoint, opts: ConvertOptions, progress: Progress, planner: Planner | None = None,
                 extra_metadata: tuple[tuple[str, Value], ...] = ()) -> WriteJob:
    """Plan ``ckpt`` as a gemma2 GGUF of ``opts.gguf_type``: types, metadata, header, size, tolerance."""
    key = check_type(opts.gguf_type)
    ckpt = causal_lm_view(ckpt, opts.drop_head, progress.warn)
    ratio = query_fold_ratio(ckpt.config)
    im = load_imatrix(opts.imatrix)
    transcode = gguf_transcode(ckpt, opts, progress) if planner is None else None  # a quantized source
    if transcode is not None:
        planner = transcode_planner(transcode, plan_tensors, tensor_order)
    plans, choices = (planner or partial(plan_tensors, imatrix=im is not None))(ckpt, key)
    _warn_plan(ckpt, ratio, choices, progress)
    if im is not None:
        plans, missing = weigh_plans(plans, im, opts.imatrix)
        if warning := missing_warning(missing, opts.imatrix):
            progress.warn(warning)
        extra_metadata = (*extra_metadata, *imatrix_metadata(opts.imatrix, im))
    check = WeightCheck(opts.allow_nonfinite, progress.warn, ckpt.path, fix="use --type bf16 or f32")
    meta = (gm.model_metadata(ckpt.config, file_type(key), ckpt.path.stem) + provenance(ckpt, ratio)
            + vocabulary(ckpt, opts.tokenizer) + norm_residuals(ckpt) + list(extra_metadata))
    special = [c for c in choices if c.reason and c.reason not in ("norm", "1-D")]
    details = {"type": key, "query_fold": ratio, "choices": special}
    if opts.split:
        parts = plan_parts(meta, plans, opts.split_bytes, opts.split_max_tensors)
        details["parts"] = len(parts)
        job = WriteJob(ckpt.config, sum(p.nbytes for p in parts), sum(p.source.nbytes for p in plans),
                       tolerance(choices, ckpt, ratio), split_writer(parts, opts, check), details, source=ckpt)
        return with_transcode(job, transcode)
    head = header_bytes(meta, plans)

    def write(tmp: Path, progress: Progress) -> list[str]:
        h = xxhash.xxh3_128()
        write_gguf(tmp, meta, plans, source_hash=h, on_tensor=progress.on_tensor, threads=opts.threads,
                   check=check, header=head, direct_io=opts.direct_io)
        patch_string(tmp, gm.K_SOURCE_FINGERPRINT, HASH_PLACEHOLDER, h.hexdigest())
        return []

    return with_transcode(WriteJob(ckpt.config, len(head) + sum(p.nbytes + 32 for p in plans),
                                   sum(p.source.nbytes for p in plans), tolerance(choices, ckpt, ratio), write,
                                   details, source=ckpt), transcode)


def split_writer(parts: list[Part], opts: ConvertOptions, check: WeightCheck) -> Callable[[Path, Progress], list[str]]:
    """``WriteJob.write`` of a split GGUF: the parts beside the path it is given, named after it, one after the
    other (one source fingerprint over all); then the fingerprint (first part) and the set digest (every part)."""

    def write(tmp: Path, progress: Progress) -> list[str]:
        h = xxhash.xxh3_128()
        names = [part_name(split_prefix(tmp), i, len(parts)) for i in range(len(parts))]
        for name, part in zip(names, parts):
            write_gguf(tmp.parent / name, part.metadata, part.tensors, source_hash=h, on_tensor=progress.on_tensor,
                       threads=opts.threads, check=check, header=part.header, direct_io=opts.direct_io)
        seal_parts([tmp.parent / n for n in names], parts, h.hexdigest())
        patch_string(tmp.parent / names[0], gm.K_SOURCE_FINGERPRINT, HASH_PLACEHOLDER, h.hexdigest())
        return names

    return write


def split_outputs(out: Path, opts: ConvertOptions) -> re.Pattern[str] | None:
    """``Writer.siblings``: with a split option, the output is the parts ``OUT-00001-of-0000N.gguf`` …"""
    return part_pattern(out) if opts.split else None


register_writer(Writer("gguf", "one GGUF file for llama.cpp, in any --type below",
                       directory=False, prepare=prepare_gguf, reads_back_as="gguf", siblings=split_outputs))
