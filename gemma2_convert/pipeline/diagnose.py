"""What ``verify`` demands of a file it did not write, and why a file fails.

``file_tolerance`` is ``--tolerance auto`` for a stored file: a GGUF with block-quantized tensors (or one made by
another tool, whose norms hold ``1 + w`` rounded to float32) is judged by the bounds of the types it stores (the
registry's ``lossy_bound`` and ``min_sqnr_db``, quant/gguf_types.py); packed weights (compressed-tensors, MLX)
by int4's logit bounds and the 2-bit SQNR floor.

``likely_causes`` runs when a verification failed and names the known conversion bugs the evidence points to,
cheapest checks first: the configs (query scale, softcaps, vocabulary size), the vocabularies piece by piece,
then statistics of a few tensors against the original (norms off by exactly 1.0; attn_q that is the original's
attn_k, or a rescaled attn_q). Each line reads ``<cause>: <evidence>; <fix>``.
"""

from __future__ import annotations

import math

import sentencepiece as spm
import torch

from gemma2_convert.formats import Checkpoint
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.names import llama_cpp_query_scalar
from gemma2_convert.formats.tolerance import Tolerance
from quant.gguf_types import FILE_TYPES, GGMLType, ggml_type

EXACT_BOUND = (1e-6, 0.99)
"""(max mean KL, min top-1) for a GGUF of another tool that stores only F32 tensors (F32 has no ``lossy_bound``):
rounding ``1 + w`` moves the logits by float32 ulps, which may flip a near-tie, never more."""
PACKED_BOUND = (0.25, 0.7, 3.0)
"""(max mean KL, min top-1, min SQNR dB) for packed weights (compressed-tensors, MLX): int4's logit limits, and
the 2-bit SQNR floor (Q2_K's), as the packing may hold 2 to 8 bits."""
OURS = "norm_convention"
"""A metadata key only our GGUF writer sets; its files restore the norms exactly (norm residual keys)."""
QK_LAYERS = 4
"""Layers whose attn_q / attn_k are compared with the original's when a file failed (spread over the depth)."""
QK_ROWS = 1024
"""Rows of each compared attn_q / attn_k (whole heads at head_dim 128 and 256): a sample, cheap at 27B."""


def gguf_tolerance(ck: Checkpoint) -> Tolerance | None:
    """The bounds for a GGUF: its loosest stored type's (mean KL, top-1) and the lowest SQNR any stored type
    allows. None for our own float-only GGUFs (they are exact; auto compares them as a cast)."""
    types = [ggml_type(t) for t in ck.metadata.get("tensor_types", "").split(", ") if t]
    quantized = [t for t in types if t.is_quantized]
    if not types or (not quantized and OURS in ck.metadata and not _folded_narrow(ck, types)):
        return None
    loosest = max(quantized or types, key=lambda t: (t.lossy_bound or EXACT_BOUND)[0])
    floor = floor_type(types)
    why = ("the loosest type stored" if quantized else
           "the query scale folded into a 16-bit attn_q rounds it" if OURS in ck.metadata else
           "a GGUF of another tool: its norms hold 1 + w rounded, so no tensor is compared for equality")
    names = {str(v): k.split("_", 1)[1] for k, v in FILE_TYPES.items()}
    announced = names.get(ck.metadata.get("file_type", ""), "")
    return Tolerance.lossy(*(loosest.lossy_bound or EXACT_BOUND), min_sqnr_db=floor.min_sqnr_db).because(
        f"bounds of {loosest.name}, {why}; SQNR floor of {floor.name} (quant/gguf_types.py)"
        + (f"; the file says {announced}" if announced else ""))


def file_tolerance(a: Checkpoint, b: Checkpoint) -> Tolerance | None:
    """What ``--tolerance auto`` demands when either side is quantized or a foreign GGUF; None otherwise."""
    for ck in (b, a):
        if ck.format == "gguf":
            tol = gguf_tolerance(ck)
            if tol is not None:
                return tol
        if any(t.packed for t in ck.tensors.values()):
            kl, top1, floor = PACKED_BOUND
            return Tolerance.lossy(kl, top1, min_sqnr_db=floor).because("int4's bounds: packed weights")
    return None


def _folded_narrow(ck: Checkpoint, types: list[GGMLType]) -> bool:
    """Our float GGUF whose attn_q holds the query-scale fold in F16/BF16: q_proj reads back within the 16-bit
    type's rounding of the folded product, not on the source's grid (the writer demands the type's bounds too)."""
    fold = float(ck.metadata.get("query_scale_folded", "1.0"))
    return fold != 1.0 and any(t.name in ("F16", "BF16") for t in types)


def floor_type(types: list[GGMLType]) -> GGMLType:
    """The stored type with the lowest SQNR floor (named in a failure)."""
    return min(types, key=lambda t: t.min_sqnr_db)


def shape_differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    """One failure naming the tensors whose shapes differ (the two models cannot be compared), or none."""
    differ = [f"{n} {tuple(t.shape)} → {tuple(b.tensors[n].shape)}" for n, t in a.tensors.items()
              if n in b.tensors and tuple(t.shape) != tuple(b.tensors[n].shape)]
    if not differ:
        return []
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    return [f"{len(differ)} tensor(s) have another shape: {'; '.join(differ[:3])}{more}"]


# ---- vocabulary -------------------------------------------------------------------------------------

def _spm(ck: Checkpoint) -> spm.SentencePieceProcessor | None:
    if ck.tokenizer is not None:
        return spm.SentencePieceProcessor(model_file=str(ck.tokenizer))
    blob = ck.tokenizer_blob
    return None if blob is None else spm.SentencePieceProcessor(model_proto=blob)


def vocab_differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    """How the two tokenizers' vocabularies differ (size, then pieces id by id); empty when they are the same
    or either side has no tokenizer (nothing to compare)."""
    sa, sb = _spm(a), _spm(b)
    if sa is None or sb is None or sa.serialized_model_proto() == sb.serialized_model_proto():
        return []
    na, nb = sa.get_piece_size(), sb.get_piece_size()
    out = [f"{na} tokens → {nb}"] if na != nb else []
    differ = [i for i in range(min(na, nb)) if sa.id_to_piece(i) != sb.id_to_piece(i)]
    if differ:
        i = differ[0]
        out.append(f"{len(differ)} of {min(na, nb)} token ids hold another piece (first id {i}: "
                   f"{sa.id_to_piece(i)!r} → {sb.id_to_piece(i)!r})")
    return out


# ---- likely causes -----------------------------------------------------------------------------------

def _gguf_kv(ck: Checkpoint) -> dict:
    return GGUFFile(ck.path).kv if ck.format == "gguf" else {}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x − y‖ / ‖y‖ in float64."""
    y64 = y.double()
    return float((x.double() - y64).norm() / y64.norm().clamp_min(1e-30))


def query_ratios(a: Checkpoint, b: Checkpoint) -> tuple[list[int], float, list[tuple[int, float, float]]]:
    """attn_q of ``b`` against ``a`` in up to ``QK_LAYERS`` layers: the layers looked at, the median factor
    ⟨q_b, q_a⟩ / ⟨q_a, q_a⟩, and (layer, error against the original's k, error against its q) for each layer
    whose attn_q is the original's attn_k."""
    n = a.config.num_hidden_layers
    m = min(QK_LAYERS, n)
    layers = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})
    ratios, swapped = [], []
    for i in layers:
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        if q not in b.tensors or q not in a.tensors or b.tensors[q].shape != a.tensors[q].shape:
            continue
        qa, qb = a.tensors[q].load()[:QK_ROWS].double(), b.tensors[q].load()[:QK_ROWS].double()
        if a.tensors[k].shape == a.tensors[q].shape:
            ka = a.tensors[k].load()[:QK_ROWS]
            to_k, to_q = _rel(qb, ka), _rel(qb, qa)
            if to_k < 0.5 and to_k < 0.5 * to_q:
                swapped.append((i, to_k, to_q))
                continue
        ratios.append(float((qb * qa).sum() / (qa * qa).sum().clamp_min(1e-30)))
    ratio = sorted(ratios)[len(ratios) // 2] if ratios else 1.0
    return layers, ratio, swapped


def query_scale_cause(a: Checkpoint, b: Checkpoint, ratio: float, kv: dict) -> str | None:
    """The attention scale ``b`` computes against ``a``'s: its query_pre_attn_scalar and its attn_q factor."""
    sa, sb = float(a.config.query_pre_attn_scalar), float(b.config.query_pre_attn_scalar)
    effective = ratio * math.sqrt(sa / sb)  # scores of b / scores of a
    if abs(effective - 1.0) < 0.03:
        return None
    text = (f"wrong query scale: the original scales attention scores by 1/√{sa:g} (query_pre_attn_scalar), "
            f"this file by {ratio:.4g}/√{sb:g} (attn_q is {ratio:.4g}× the original's), so every score is "
            f"{effective:.4g}×")
    if b.format == "gguf" and "gemma2_convert.query_pre_attn_scalar" not in kv:
        fold = math.sqrt(llama_cpp_query_scalar(a.config) / sa)
        text += (f"; llama.cpp takes the scale from the depth (46 layers: hidden/heads, else head_dim), "
                 f"{llama_cpp_query_scalar(a.config):g} at {a.config.num_hidden_layers} layers, so attn_q must be "
                 f"multiplied by {fold:.4g} to keep the model's; convert with `gemma2-convert to-gguf`, which "
                 "folds the scale into attn_q")
    return text


def config_causes(a: Checkpoint, b: Checkpoint, kv: dict) -> list[str]:
    """Softcap and vocabulary-size differences of the configs, with the GGUF key behind them."""
    out = []
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        xa, xb = getattr(a.config, name), getattr(b.config, name)
        if xa == xb or (xa is not None and xb is not None and math.isclose(xa, xb, rel_tol=1e-6)):
            continue
        if xb is None:
            out.append(f"missing softcap: the original caps at {xa:g} (cap·tanh(x/cap)), this file has no "
                       f"{name}; set it (config.json / gemma2.{name}) or reconvert")
        elif b.format == "gguf" and f"gemma2.{name}" not in kv:
            out.append(f"missing softcap: the file has no gemma2.{name} key, so llama.cpp applies its default "
                       f"{xb:g} where the original uses {xa}; reconvert with a current converter (llama.cpp's "
                       "convert_hf_to_gguf.py writes the key since July 2024) or add the key")
        else:
            out.append(f"wrong softcap: {name} is {xa} in the original and {xb} in this file")
    if a.config.vocab_size != b.config.vocab_size:
        out.append(f"vocabulary does not match: the original has {a.config.vocab_size} token rows, this file "
                   f"{b.config.vocab_size}; it was made from another model's tokenizer or embedding")
    return out


def norm_causes(a: Checkpoint, b: Checkpoint) -> list[str]:
    """Norm tensors of ``b`` off by exactly ±1.0 against ``a``'s (the ``1 + w`` convention lost or doubled)."""
    names = [n for n in a.tensors if n.endswith("norm.weight") and n in b.tensors
             and a.tensors[n].shape == b.tensors[n].shape]
    off: dict[int, list[str]] = {-1: [], 1: []}
    for n in names:
        d = b.tensors[n].load().double() - a.tensors[n].load().double()
        mean, spread = float(d.mean()), float(d.std()) if d.numel() > 1 else 0.0
        for sign, found in off.items():
            if abs(mean - sign) < 0.02 and spread < 0.02:
                found.append(n)
    out = []
    if off[-1]:
        out.append(f"norms stored without the +1: {len(off[-1])} of {len(names)} norm tensors read back as the "
                   f"original minus 1.0 (e.g. {off[-1][0]}); a GGUF stores 1 + w and llama.cpp multiplies by "
                   "the stored value, so the converter forgot the shift; reconvert")
    if off[1]:
        out.append(f"+1 added twice to the norms: {len(off[1])} of {len(names)} norm tensors are the original "
                   f"plus 1.0 (e.g. {off[1][0]}); the source already held 1 + w; reconvert from zero-centred "
                   "weights")
    return out


def likely_causes(a: Checkpoint, b: Checkpoint, vocab: list[str],
                  worst: list[tuple[str, float]] = ()) -> list[str]:
    """The known conversion bugs the evidence points to (config, vocabulary, then tensor statistics), or one
    line saying none was found and which tensors differ most."""
    kv = _gguf_kv(b)
    out = config_causes(a, b, kv)
    if vocab and a.config.vocab_size == b.config.vocab_size:
        out.append("vocabulary does not match: " + "; ".join(vocab) + "; text is tokenized into other ids than "
                   "the model was trained on; rebuild the file with the original's tokenizer")
    out += norm_causes(a, b)
    layers, ratio, swapped = query_ratios(a, b)
    if swapped:
        i, to_k, to_q = swapped[0]
        out.append(f"q and k swapped: in {len(swapped)} of {len(layers)} layers looked at, attn_q is the "
                   f"original's k_proj (layer {i}: rel. error {to_k:.3g} against k_proj, {to_q:.3g} against "
                   "q_proj); reconvert")
    cause = query_scale_cause(a, b, ratio, kv)
    out += [cause] if cause is not None else []
    if not out:
        tail = ", ".join(f"{n} ({s:.1f} dB)" for n, s in worst[:3])
        out.append("none of the known conversion bugs (query scale, softcaps, vocabulary, norms ±1, q/k swap) "
                   + (f"; the tensors furthest from the original: {tail}" if tail else ""))
    return out
