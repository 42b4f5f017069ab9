"""``--bpw`` / ``--target-size`` for ``--format gguf``: a GGUF type per tensor, chosen by measurement.

For every matrix (the decoder's and the tied embedding, which is also the output head):

1. each candidate type's weight error ``Σ_j imp_j · Σ_i (W − Q(W))²_ij`` — ``Q`` is llama.cpp's quantizer for
   that type fed the activation importance ``imp`` (mean squared input per column, measured on the
   calibration text; ones for the embedding);
2. the tensor's *sensitivity*: the reference model's KL on the calibration text with only that tensor
   quantized to ``PROBE``, divided by its ``PROBE`` weight error — how much the model's output moves per
   unit of that tensor's error;
3. error = sensitivity × weight error, and ``quant/allocate.py`` picks the types minimizing the summed error
   within the byte budget.

The tied embedding (also the output head) gets unit importance. On the trained fixture it always gets Q8_0,
and that choice is measured right (llama.cpp's KL, ``--method gptq`` at Q4_0's and Q4_K_M's sizes): capped at
Q6_K, the bytes spent on the decoder instead, KL rises 2.3–2.6×, close to the estimate; weighting it by the
head's input (mean squared final-normed state) moves its estimates by ≤ 20 % and changes no choice.
"""

from __future__ import annotations

import torch

from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.gguf.quantized import prepare_gguf_quantized
from gemma2_convert.formats.registry import Checkpoint
from quant.allocate import Candidate, allocate
from quant.gguf_codec import bytes_for, dequantize_tensor, fallback_type, quantize_tensor
from quant.metrics import kl_divergence
from quant.spec import QuantSpec
from reference.model import Gemma2ForCausalLM
from reference.weights import WeightStore

CANDIDATES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "Q4_K", "IQ4_NL", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K",
              "Q8_0")
"""The GGUF types the allocation chooses from (every one llama.cpp runs and our codecs write)."""
PROBE = "Q3_K"
"""The type each tensor's sensitivity is measured at (coarse enough to move the output measurably)."""
EMBEDDING = "model.embed_tokens.weight"


def _weight_errors(w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, tuple[int, float]]:
    """(bytes, importance-weighted squared error) of ``w [out, in]`` per candidate type that fits its rows."""
    found = {}
    qw = imp if imp is not None else torch.ones(w.shape[1])
    for qtype in CANDIDATES:
        if fallback_type(qtype, w.shape[1]) != qtype:
            continue
        approx = dequantize_tensor(quantize_tensor(w, qtype, quant_weights=qw), qtype, tuple(w.shape))
        found[qtype] = (bytes_for(qtype, tuple(w.shape)), float(((w - approx).square() * qw).sum()))
    return found


@torch.inference_mode()
def measure_candidates(ckpt: Checkpoint, names: list[str], importance: dict[str, torch.Tensor],
                       ids: torch.Tensor, progress: Progress = SILENT) -> dict[str, list[Candidate]]:
    """The candidates of every tensor in ``names``, their errors scaled by the measured sensitivity."""
    cfg = ckpt.config
    model = Gemma2ForCausalLM(cfg, WeightStore(ckpt.tensors, cfg, torch.float32, resident=False))
    base = model(ids).reshape(-1, cfg.vocab_size)                           # [S·T, V]
    out: dict[str, list[Candidate]] = {}
    with progress.phase("measuring sensitivity", len(names), "tensors"):
        for name in names:
            w = ckpt.tensors[name].load().float()
            errs = _weight_errors(w, importance.get(name))
            probe = PROBE if PROBE in errs else min(errs, key=lambda q: errs[q][0])
            approx = dequantize_tensor(quantize_tensor(w, probe, quant_weights=importance.get(name)), probe,
                                       tuple(w.shape))
            model.weights.replace(name, approx)
            kl = kl_divergence(base, model(ids).reshape(-1, cfg.vocab_size))
            model.weights.replace(name, None)
            sens = kl / errs[probe][1] if errs[probe][1] > 0 else 0.0
            out[name] = [Candidate(q, b, sens * e) for q, (b, e) in errs.items()]
            progress.advance(1, name)
    return out


def budget_bytes(ckpt: Checkpoint, names: list[str], bpw: float | None, target_size: int | None,
                 overhead: int = 0) -> int:
    """Bytes the allocated tensors may take: ``bpw`` bits per weight over them, or ``target_size`` less the
    ``overhead`` (:func:`gguf_overhead`: header, tokenizer, norms, alignment)."""
    if bpw is not None:
        return int(bpw * sum(ckpt.tensors[n].numel for n in names) / 8)
    assert target_size is not None
    left = target_size - overhead
    if left <= 0:
        raise UnsupportedError(f"--target-size {target_size:,} bytes leaves nothing for the weights (the "
                               f"header, tokenizer and norms take {overhead:,}); ask for a larger size")
    return left


def gguf_overhead(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], names: list[str]) -> int:
    """The GGUF file's bytes beyond the allocated tensors' data, from the writer's own plan of the file
    (metadata with the tokenizer and the allocation's label, tensor infos, norms, alignment: at most 32
    bytes a tensor too many, which also covers the label's longer type names)."""
    probe = dict.fromkeys(names, "Q8_0")
    job = prepare_gguf_quantized(ckpt, specs, None, "keep", True, SILENT, types=probe)
    return job.need_bytes - sum(bytes_for("Q8_0", tuple(ckpt.tensors[n].shape)) for n in names)


def allocated_names(ckpt: Checkpoint, quantized: list[str]) -> list[str]:
    """The tensors an allocation types: the matrices the policy quantizes, and the (tied) embedding."""
    names = [n for n in quantized if len(ckpt.tensors[n].shape) == 2]
    return names + ([EMBEDDING] if EMBEDDING not in names else [])


def choose_types(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], importance: dict[str, torch.Tensor],
                 ids: torch.Tensor, bpw: float | None, target_size: int | None,
                 progress: Progress = SILENT) -> dict[str, str]:
    """HF name → GGUF type for the tensors :func:`allocated_names` picks, minimizing the measured error within
    the budget."""
    names = allocated_names(ckpt, [n for n, s in specs.items() if s is not None])
    overhead = gguf_overhead(ckpt, specs, names) if target_size is not None else 0
    budget = budget_bytes(ckpt, names, bpw, target_size, overhead)
    cands = measure_candidates(ckpt, names, importance, ids, progress)
    chosen = allocate(cands, budget)
    return {n: c.qtype for n, c in chosen.items()}
