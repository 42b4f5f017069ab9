"""The library behind ``to-gguf``, ``orig-to-gguf`` and ``gguf-to-hf``: read → map → transform → write → verify.

Writing: every tensor of the canonical checkpoint is renamed (``gguf_names``), given a type
(``gguf_mix``), transformed (+1 on norms, the query-scale fold) and quantized in row chunks straight
into the file. The output goes to a temporary sibling, is verified by reading it back through the
GGUF reader and running the reference on both, and only then renamed into place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from gemma2_convert import __version__
from gemma2_convert.core.errors import ConfigError, UnsupportedError, name_list
from gemma2_convert.formats import Checkpoint, open_checkpoint
import gemma2_convert.formats.gguf.metadata as gm
from gemma2_convert.formats.gguf.names import (add_one, fold_query, gguf_name, is_norm, is_query,
                                               llama_cpp_query_scalar, norm_residual, query_fold_ratio)
from gemma2_convert.formats.gguf.values import Value, ValueType, array, string
from gemma2_convert.formats.gguf.writer import TensorPlan, header_bytes, patch_string, write_gguf
from gemma2_convert.formats.gguf.mix import GGUF_TYPES, TypeChoice, check_type, choose_type, file_type
from gemma2_convert.pipeline.convert import noting
from gemma2_convert.formats.output import atomic_output, check_output
from gemma2_convert.pipeline.verify import Tolerance, VerifyReport, require, verify
from gemma2_convert.formats.weight_check import WeightCheck

HASH_PLACEHOLDER = "pending-" + "0" * 24  # as long as the hex digest, which replaces it once the data is written
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Verification bounds per stored type on the reference's logits (mean KL, top-1 agreement): sanity
# checks that catch a broken file, not quality gates. About 2-3× llama.cpp's published mean KLD on
# LLaMA-3-8B (Q8_0 0.0014, Q6_K 0.0055, Q5_K_M 0.011, Q4_0 0.072; QUANT_FORMATS.md §7.1) and above
# what random tiny models give (Q8_0 2e-4, Q6_K 2e-3, Q5_0 1.1e-2, Q4_0 4.4e-2, all top-1 100 %).
LOSSY_BOUNDS: dict[str, tuple[float, float]] = {
    "F16": (1e-3, 0.95), "BF16": (2e-3, 0.95), "Q8_0": (1e-2, 0.9), "Q6_K": (2e-2, 0.85),
    "Q5_0": (5e-2, 0.8), "Q5_1": (5e-2, 0.8), "Q5_K": (5e-2, 0.8),
    "Q4_0": (0.2, 0.7), "Q4_1": (0.2, 0.7), "Q4_K": (0.2, 0.7),
}


@dataclass
class GGUFResult:
    output: Path
    type: str
    nbytes: int
    config: object
    choices: list[TypeChoice]
    """Tensors whose type is not the --type default (norms excluded), with the reason."""
    query_fold: float
    report: VerifyReport | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def source_dtype(ckpt: Checkpoint) -> str:
    """The dominant float dtype of the source tensors, as a torch dtype name."""
    dts = [t.dtype for t in ckpt.tensors.values() if t.dtype in _DTYPE_NAMES]
    return _DTYPE_NAMES[max(set(dts), key=dts.count)] if dts else "float32"


def tensor_order(ckpt: Checkpoint) -> list[str]:
    """Embedding, then the layers in order, then the final norm (HF names)."""
    from reference.weights import expected_shapes

    return [n for n in expected_shapes(ckpt.config) if n != "model.norm.weight"] + ["model.norm.weight"]


def plan_tensors(ckpt: Checkpoint, type_name: str) -> tuple[list[TensorPlan], list[TypeChoice]]:
    """One TensorPlan per tensor (with the +1 / fold transforms), and every tensor's type choice."""
    cfg = ckpt.config
    ratio = query_fold_ratio(cfg)
    plans, choices = [], []
    for hf in tensor_order(ckpt):
        src, name = ckpt.tensors[hf], gguf_name(hf)
        choice = choose_type(name, src.shape, type_name, cfg.num_hidden_layers)
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
        from gemma2_convert.formats.gguf.reader import GGUFFile

        f = GGUFFile(ckpt.path)
        keys = [k for k in f.kv if k.startswith("tokenizer.") or k == gm.K_TOKENIZER_MODEL]
        if keys:
            return [(k, _copy_value(f, k)) for k in keys]
    if tok is None:
        from gemma2_convert.formats.tokenizer.spm import find_tokenizer

        tok = find_tokenizer(ckpt.path)
    if tok is None:
        raise ConfigError("no tokenizer.model found next to the checkpoint; llama.cpp needs the vocabulary. "
                          "Pass --tokenizer PATH/tokenizer.model", ckpt.path)
    if not Path(tok).is_file():
        raise ConfigError("tokenizer file not found", tok)
    from gemma2_convert.formats.tokenizer.spm import gguf_vocab

    keys = gm.vocab_metadata(gguf_vocab(tok, ckpt.config.vocab_size).metadata())
    return keys + [(gm.K_TOKENIZER_MODEL, array(ValueType.UINT8, Path(tok).read_bytes()))]


def _copy_value(f: object, key: str) -> Value:
    vtype, item = f.kv_types[key]  # type: ignore[attr-defined]
    v = f.kv[key]  # type: ignore[attr-defined]
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
    worst = max((LOSSY_BOUNDS.get(t, (1e-6, 1.0)) for t in stored), key=lambda b: b[0])
    return Tolerance.lossy(*worst)


def write_checkpoint_gguf(
    ckpt: Checkpoint, out: str | Path, *, type_name: str = "f16", tokenizer: str | Path | None = None,
    verify_output: bool = True, force: bool = False, n_tokens: int = 64, quiet: bool = False,
    threads: int | None = None, warn: Callable[[str], None] = lambda m: None,
    on_report: Callable[[VerifyReport], None] | None = None,
    planner: Callable[[Checkpoint, str], tuple[list[TensorPlan], list[TypeChoice]]] | None = None,
    extra_metadata: list[tuple[str, Value]] | None = None, drop_head: bool = False,
    allow_nonfinite: bool = False,
) -> GGUFResult:
    """Write an open checkpoint as a gemma2 GGUF of ``type_name`` (see ``gguf_mix``), then verify it.

    ``threads``: quantization workers (default: every CPU available). ``planner`` replaces
    ``plan_tensors`` (``gemma2-quantize`` plans its own types and block encoders). ``allow_nonfinite``:
    write NaN/Inf weights (and F16 overflows) with a warning instead of failing."""
    from gemma2_convert.cli.console import byte_progress, verify_progress

    t0 = time.perf_counter()
    key = check_type(type_name)
    ckpt = causal_lm_view(ckpt, drop_head, warn)
    cfg = ckpt.config
    ratio = query_fold_ratio(cfg)
    plans, choices = (planner or plan_tensors)(ckpt, key)
    warnings = []
    if ratio != 1.0:
        warnings.append(f"llama.cpp assumes query_pre_attn_scalar {llama_cpp_query_scalar(cfg):g} for "
                        f"{cfg.num_hidden_layers} layers; this model uses {cfg.query_pre_attn_scalar:g}, so attn_q "
                        f"is scaled by {ratio:.6g} (undone when read back)")
    fallbacks = [c for c in choices if c.reason.startswith("fallback")]
    if fallbacks:
        warnings.append(f"{len(fallbacks)} tensor(s) have rows that are not a whole number of blocks and fall back "
                        f"as llama-quantize does: {name_list(f'{c.name} → {c.qtype}' for c in fallbacks)}")
    for m in warnings:
        warn(m)
    note = noting(warnings, warn)

    check = WeightCheck(allow_nonfinite, note, ckpt.path, fix="use --type bf16 or f32")
    meta = (gm.model_metadata(cfg, file_type(key), ckpt.path.stem) + provenance(ckpt, ratio)
            + vocabulary(ckpt, Path(tokenizer) if tokenizer else None) + norm_residuals(ckpt)
            + list(extra_metadata or []))
    out = Path(out)
    report = None
    head = header_bytes(meta, plans)
    need = len(head) + sum(p.nbytes + 32 for p in plans)
    with atomic_output(out, force, need_bytes=need, inputs=[ckpt.path]) as tmp:
        h = xxhash.xxh3_128()
        with byte_progress(sum(p.source.nbytes for p in plans), "writing", quiet) as bar:
            size = write_gguf(tmp, meta, plans, source_hash=h, on_tensor=bar.advance, threads=threads,
                              check=check, header=head)
        patch_string(tmp, gm.K_SOURCE_FINGERPRINT, HASH_PLACEHOLDER, h.hexdigest())
        if verify_output:
            with verify_progress(ckpt.nbytes, quiet) as vbar:
                rep = verify(ckpt, open_checkpoint(tmp, format="gguf"), tolerance=tolerance(choices, ckpt, ratio),
                             n_tokens=n_tokens, resident=_fits(ckpt), on_tensor=vbar.tensor, on_layer=vbar.layer)
            rep.b = str(out)
            if on_report is not None:
                on_report(rep)
            require(rep)
            report = rep
    special = [c for c in choices if c.reason and c.reason not in ("norm", "1-D")]
    return GGUFResult(out, key, size, cfg, special, ratio, report, warnings, time.perf_counter() - t0)


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
    return Checkpoint(ckpt.format, ckpt.path, cfg, tensors, ckpt.tokenizer, dict(ckpt.metadata))


def _fits(ckpt: Checkpoint) -> bool:
    from gemma2_convert.core.memory import RESIDENT_FRACTION, available_memory

    return 2 * sum(t.numel for t in ckpt.tensors.values()) * 4 < RESIDENT_FRACTION * available_memory()


def to_gguf(src: str | Path, out: str | Path, **options: object) -> GGUFResult:
    """Any checkpoint the project reads → GGUF (options as ``write_checkpoint_gguf``)."""
    check_output(Path(out), bool(options.get("force")), [src])  # before reading anything
    return write_checkpoint_gguf(open_checkpoint(src), out, **options)  # type: ignore[arg-type]


def orig_to_gguf(ckpt: str | Path, out: str | Path, *, shape: object = None, **options: object) -> GGUFResult:
    """Original checkpoint (gemma_pytorch or Flax/Orbax) → GGUF."""
    from gemma2_convert.pipeline.convert import open_source

    check_output(Path(out), bool(options.get("force")), [ckpt])
    src, _ = open_source(ckpt, shape, options.get("tokenizer"))  # type: ignore[arg-type]
    return write_checkpoint_gguf(src, out, **options)  # type: ignore[arg-type]


def gguf_to_hf(
    src: str | Path, out: str | Path, *, dtype: str = "auto", tokenizer: str | Path | None = None,
    max_shard_size: str | int = "5GB", verify_output: bool = True, force: bool = False, n_tokens: int = 64,
    quiet: bool = False, warn: Callable[[str], None] = lambda m: None,
    on_report: Callable[[VerifyReport], None] | None = None, allow_nonfinite: bool = False,
):
    """GGUF → Hugging Face directory, dequantizing; ``dtype`` auto = the recorded source dtype
    (float32 for files without our provenance)."""
    from gemma2_convert.pipeline.convert import ConvertResult, cast, resolve_dtype
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.cli.console import byte_progress, verify_progress
    from gemma2_convert.formats.tokenizer.spm import find_tokenizer

    t0 = time.perf_counter()
    check_output(Path(out), force, [src])
    ckpt = open_checkpoint(src, format="gguf")
    name = ckpt.metadata.get("source_dtype", "float32") if dtype == "auto" else dtype
    target = resolve_dtype(name)
    warnings = []
    tok = Path(tokenizer) if tokenizer else find_tokenizer(ckpt.path)
    if tok is not None and not tok.is_file():
        raise ConfigError("tokenizer file not found", tok)
    embedded = None if tok is not None else _embedded_tokenizer(ckpt.path)
    if tok is None and embedded is None:
        warnings.append(f"{src}: the GGUF embeds no tokenizer.model and none lies next to it; writing no "
                        "tokenizer files (pass --tokenizer)")
    for m in warnings:
        warn(m)
    note = noting(warnings, warn)

    items = cast(ckpt.tensors, target, WeightCheck(allow_nonfinite, note, ckpt.path))
    cfg = ckpt.config.replace(torch_dtype=name)
    prov = {"command": "gguf-to-hf", "source": {"path": str(Path(src).resolve()), "format": "gguf",
                                                **{k: v for k, v in ckpt.metadata.items()}}}
    out = Path(out)
    report = None
    need = sum(t.nbytes for _, t in items) + 8 * (len(embedded) if embedded else tok.stat().st_size if tok else 0)
    with atomic_output(out, force, directory=True, need_bytes=need, inputs=[ckpt.path]) as tmp:
        if embedded is not None:  # written into the output first, then read from there
            tok = tmp / "tokenizer.model"
            tok.write_bytes(embedded)
        with byte_progress(sum(t.nbytes for _, t in items), "writing", quiet) as bar:
            files = write_hf_dir(tmp, cfg, items, max_shard_size=max_shard_size, tokenizer=tok, provenance=prov,
                                 on_tensor=bar.advance)
        if verify_output:
            lossless = all(t.dtype == target or target == torch.float32 for t in ckpt.tensors.values())
            with verify_progress(ckpt.nbytes, quiet) as vbar:
                report = verify(ckpt, open_checkpoint(tmp), tolerance=Tolerance() if lossless else Tolerance.cast(),
                                n_tokens=n_tokens, resident=_fits(ckpt), on_tensor=vbar.tensor,
                                on_layer=vbar.layer)
            report.b = str(out)
            if on_report is not None:
                on_report(report)
            require(report)
        names = sorted(p.name for p in files)
    nbytes = sum((out / n).stat().st_size for n in names)
    return ConvertResult(out, names, nbytes, cfg, "GGUF metadata", report, warnings, time.perf_counter() - t0)


def _embedded_tokenizer(path: Path) -> bytes | None:
    from gemma2_convert.formats.gguf.reader import GGUFFile

    blob = GGUFFile(path).kv.get(gm.K_TOKENIZER_MODEL)
    return blob if isinstance(blob, bytes) and blob else None


__all__ = ["GGUF_TYPES", "GGUFResult", "gguf_to_hf", "orig_to_gguf", "to_gguf", "write_checkpoint_gguf"]
