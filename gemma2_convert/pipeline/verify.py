"""Verification: compare two checkpoints tensor by tensor and by the reference model's logits.

``verify(a, b)`` loads both lazily, checks every tensor (``torch.equal`` after the expected cast, or
SQNR when lossy), runs the reference forward on a few fixed prompts, and reports max |Δ logits|,
mean KL(a‖b), top-1 agreement and the perplexity of each. Weights stream from the mapped files
(``resident=False`` for large models), so a model larger than RAM is verified too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch

from gemma2_convert.core.errors import ConfigError, VerificationError, check_names
from gemma2_convert.core.memory import fits_resident
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats import Checkpoint, open_checkpoint
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.pipeline.adapters import adapter_tolerance, open_spec
from gemma2_convert.pipeline.compare import TensorDiff, tensor_diff, worst_diffs
from gemma2_convert.pipeline.compute import COMPUTE, fast_tolerance
from gemma2_convert.pipeline.diagnose import (
    file_tolerance,
    likely_causes,
    shape_differences,
    vocab_differences,
)
from gemma2_convert.pipeline.lockstep import LogitSums, Lockstep, logit_figures, prompt_groups
from reference.config import Gemma2Config
from reference.heads import CLASSES
from reference.model import Gemma2Model, Rows
from reference.weights import WeightStore

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
    "changed physics: on the photoelectric effect, Brownian motion, special relativity, and mass-energy "
    "equivalence.\n\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nКогда-то давно жил-был кот. 東京は日本の首都です。 Emojis: 🙂🚀 — numbers 3.14159, 2718."
)


RESIDENT_BUDGET = 512 << 20
"""Bytes of compute-dtype casts of both models that verify keeps between passes over the layers (small models
only: verification stays within 2 GB of anonymous memory at every size; larger ones re-read each pass)."""

@dataclass
class VerifyReport:
    a: str
    b: str
    tensors_total: int = 0
    tensors_equal: int = 0
    worst_tensors: list[TensorDiff] = field(default_factory=list)
    tokens: int = 0
    compute: str = "float32"
    """The reference forward passes' dtype: float32 (exact, as transformers) or bfloat16 (the fast mode)."""
    max_abs_logits: float = 0.0
    mean_kl: float = 0.0
    top1: float = 1.0
    ppl_a: float = 0.0
    ppl_b: float = 0.0
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    text: dict[str, float] | None = None
    """The same figures on the user's text (``--text``): tokens, max_abs_logits, mean_kl, top1, ppl_a, ppl_b."""
    config_differences: list[str] = field(default_factory=list)
    """Fields of the model config that change the forward pass and differ (``field: a → b``)."""
    proof: list[str] = field(default_factory=list)
    """What the report establishes and how, one statement each (filled when it passes)."""
    vocab_differences: list[str] = field(default_factory=list)
    """How the two tokenizers' vocabularies differ (size, pieces id by id); empty when equal or not compared."""
    bounds: str = ""
    """Where the bounds of a lossy judgement come from (the stored type, its KL / top-1 / SQNR floor)."""
    likely_causes: list[str] = field(default_factory=list)
    """When it fails: the known conversion bugs the evidence points to (``pipeline.diagnose``), with the evidence."""
    reused_layers: int = 0
    """Decoder layers (and the head, counted last) whose output B took from A instead of recomputing it: B's
    tensors there are bit-identical to A's, its inputs too, and both compute the same function
    (``pipeline.lockstep``), so the result is A's by construction."""

    def to_json(self) -> dict:
        return asdict(self)


def sentencepiece_of(ckpt: Checkpoint) -> spm.SentencePieceProcessor | None:
    """The checkpoint's tokenizer: its tokenizer.model file, else the one the file embeds; None without."""
    if ckpt.tokenizer is not None:
        return spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer))
    if ckpt.tokenizer_blob is not None:
        return spm.SentencePieceProcessor(model_proto=ckpt.tokenizer_blob)
    return None


def token_windows(sp: spm.SentencePieceProcessor, cfg: Gemma2Config, text: str, seq_len: int,
                  max_seqs: int = 64) -> list[torch.Tensor]:
    """``text`` tokenized, cut into windows [1, seq_len] that each start with <bos> (at most ``max_seqs``)."""
    ids = [i for i in sp.encode(text) if i < cfg.vocab_size]
    body = seq_len - 1
    windows = [ids[i:i + body] for i in range(0, max(len(ids) - body, 0) + 1, body)][:max_seqs]
    return [torch.tensor([[cfg.bos_token_id] + w]) for w in windows if w]


def text_prompts(ckpt: Checkpoint, text: str) -> list[torch.Tensor]:
    """The user's text as prompts for ``verify --text``: windows of up to 4 sliding windows (≤ 1024 tokens)."""
    sp = sentencepiece_of(ckpt)
    if sp is None:
        raise ConfigError("--text needs the model's tokenizer, and none was found with this checkpoint (a "
                          "tokenizer.model beside it, or one embedded in the GGUF)", ckpt.path)
    cfg = ckpt.config
    prompts = token_windows(sp, cfg, text, min(4 * cfg.sliding_window, cfg.max_position_embeddings, 1024))
    if not prompts:
        raise ConfigError("--text holds no tokens", ckpt.path)
    return prompts


def default_prompts(ckpt: Checkpoint, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompt ids [1, T]: the built-in text through the checkpoint's tokenizer when there is one,
    plus one seeded random sequence (ids ≥ 3 so no pad/eos/bos) of ``n_tokens``."""
    cfg = ckpt.config
    prompts = []
    if ckpt.tokenizer is not None:
        sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer))
        ids = [cfg.bos_token_id] + sp.encode(DEFAULT_TEXT)
        ids = [i for i in ids if i < cfg.vocab_size][:n_tokens]
        prompts.append(torch.tensor([ids]))
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(3, cfg.vocab_size, (1, n_tokens - 1), generator=g)
    prompts.append(torch.cat([torch.tensor([[cfg.bos_token_id]]), rand], dim=1))
    return prompts


def compare_tensors(a: Checkpoint, b: Checkpoint, worst: int = 5,
                    on_tensor: Callable[[str, int], None] | None = None) -> tuple[int, list[TensorDiff]]:
    """Number of b's tensors equal to a's cast to b's dtype, and the worst ``worst`` by SQNR
    (``on_tensor(name, nbytes)`` after each: progress). ``verify`` does this in lockstep with the forwards."""
    check_names(a.tensors, b.tensors, b.path)
    diffs = []
    for name, ta in a.tensors.items():
        diffs.append(tensor_diff(name, ta.load(), b.tensors[name].load()))
        if on_tensor is not None:
            on_tensor(name, ta.nbytes)
    return sum(d.equal for d in diffs), worst_diffs(diffs, worst)


def reference_model(ck: Checkpoint, dtype: torch.dtype, resident: bool) -> Gemma2Model:
    """The reference class the checkpoint's config names (causal LM, classifier, bare decoder)."""
    model = CLASSES[ck.config.head](ck.config, WeightStore(ck.tensors, ck.config, dtype, resident, str(ck.path)))
    model.adapters = ck.adapters  # BASE+ADAPTER: the low-rank updates run unmerged
    return model


def compare_logits(a: Gemma2Model, b: Gemma2Model, prompts: list[torch.Tensor]) -> dict[str, float]:
    """max |Δ|, mean KL(a‖b), top-1 agreement and perplexities over what each head outputs
    (next-token logits; class logits of a classifier; hidden states of a bare decoder), one prompt at a time."""
    return logit_figures([(a.verify_outputs(ids), b.verify_outputs(ids)) for ids in prompts])


def track_layers(models: tuple[Gemma2Model, ...], n_prompts: int, on_layer: Callable[[int, int], None]) -> None:
    """Report ``on_layer(done, total)`` after every decoder layer of ``models`` run on ``n_prompts`` each."""
    total = len(models) * n_prompts * models[0].config.num_hidden_layers
    done = itertools.count(1)
    for model in models:
        model.on_layer = lambda _i: on_layer(next(done), total)


def verify(
    a: str | Path | Checkpoint, b: str | Path | Checkpoint, *, tolerance: Tolerance | None = None,
    dtype: torch.dtype = torch.float32, n_tokens: int = 64, resident: bool | None = None,
    check_tensors: bool = True, progress: Progress = SILENT, text: str | None = None,
) -> VerifyReport:
    """Compare checkpoint ``b`` (the output) against ``a`` (the source); see the module docstring.
    Both models run in lockstep (``pipeline.lockstep``): each layer is read once for the tensor comparison and
    both forwards on every prompt; progress counts those layer steps. ``dtype``: the compute dtype (float32:
    exact, as transformers; bfloat16: the fast mode). ``text``: also compare on the user's text (its figures
    are judged by the same tolerance and reported apart, with the perplexity of both models on it)."""
    tol = tolerance or Tolerance()
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b)
    rep = VerifyReport(str(ca.path), str(cb.path), config_differences=config_differences(ca.config, cb.config),
                       vocab_differences=vocab_differences(ca, cb), compute=str(dtype).removeprefix("torch."))
    if check_tensors:
        check_names(ca.tensors, cb.tensors, cb.path)
    rep.failures += shape_differences(ca, cb)
    if rep.failures:  # tensors of another shape: the two models cannot run side by side
        rep.likely_causes = likely_causes(ca, cb, rep.vocab_differences)
        return rep
    prompts = default_prompts(ca, n_tokens)
    extra = text_prompts(ca, text) if text is not None else []
    if resident is None:  # keeping casts pays only when the prompts need several passes (and fit, twice,
        casts = 2 * 4 * sum(t.numel for t in ca.tensors.values())  # within verify's memory goal)
        resident = (len(prompt_groups(prompts + extra, ca.config, dtype)) > 1 and casts <= RESIDENT_BUDGET
                    and fits_resident(casts))
    models = reference_model(ca, dtype, resident), reference_model(cb, dtype, resident)
    sums = LogitSums(), LogitSums()  # the fixed prompts, the user's text: reduced window by window

    def sink(k: int, rows: tuple[Rows, Rows]) -> None:
        sums[k >= len(prompts)].add(rows)

    share = (check_tensors and type(models[0]) is type(models[1]) and not (ca.adapters or cb.adapters)
             and same_function(ca.config, cb.config))
    with progress.phase("verifying layer by layer: tensors and both forwards", None, "layers"):
        lockstep = Lockstep(*models, compare=check_tensors, on_step=progress.update, share=share)
        run = lockstep.run(prompts + extra, sink)
    rep.reused_layers = run.shared
    if check_tensors:
        rep.tensors_total, rep.tensors_equal = len(ca.tensors), run.tensors_equal
        rep.worst_tensors = worst_diffs(run.diffs)
        if tol.tensors_equal and rep.tensors_equal != rep.tensors_total:
            rep.failures.append(f"{rep.tensors_total - rep.tensors_equal} tensor(s) differ, worst "
                                f"{rep.worst_tensors[0].name} (max |Δ| {rep.worst_tensors[0].max_abs:.3g})")
    for k, v in sums[0].figures().items():
        setattr(rep, k, v)
    if extra:
        rep.text = sums[1].figures()
    judge(rep, tol)
    if not rep.passed:
        rep.likely_causes = likely_causes(ca, cb, rep.vocab_differences,
                                          [(d.name, d.sqnr_db) for d in rep.worst_tensors])
    return rep


FORWARD_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                  "attn_logit_softcapping", "final_logit_softcapping", "rms_norm_eps", "rope_theta", "layer_types",
                  "hidden_activation", "tie_word_embeddings")
"""The config fields the forward pass reads (spec §4.7): equal in both, a model computes the same function
of its weights."""


def same_function(a: Gemma2Config, b: Gemma2Config) -> bool:
    """Whether the reference computes exactly the same function of the weights for both configs: every forward
    field equal (floats too, bit for bit) and the same head."""
    fields = (*FORWARD_FIELDS, "head", "num_labels", "pad_token_id")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def config_differences(a: Gemma2Config, b: Gemma2Config) -> list[str]:
    """``field: a → b`` for each forward field that differs (floats within float32 rounding count as equal: a
    GGUF stores them as float32)."""
    out = []
    for name in FORWARD_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        same = math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) and isinstance(y, float) else x == y
        if not same:
            out.append(f"{name}: {x!r} → {y!r}")
    return out


def proof_lines(rep: VerifyReport, tol: Tolerance) -> list[str]:
    """What a passing report proves, and by what."""
    lines = []
    if rep.tensors_total:
        if rep.tensors_equal == rep.tensors_total:
            how = "all equal (torch.equal after the expected cast)"
        else:
            floor = f" ≥ the floor {tol.min_sqnr_db:g} dB" if math.isfinite(tol.min_sqnr_db) else ""
            how = (f"{rep.tensors_equal} equal, the others within the tolerance "
                   f"(worst SQNR {rep.worst_tensors[0].sqnr_db:.1f} dB{floor})")
        lines.append(f"tensors: {rep.tensors_total} compared under the mapping, {how}")
    lines.append("config: every field the forward pass reads is equal" if not rep.config_differences
                 else f"config: {len(rep.config_differences)} forward field(s) differ: {'; '.join(rep.config_differences)}")
    exact = tol.max_abs == 0.0
    lines.append(f"logits: {rep.tokens} positions of the reference forward on both, "
                 + ("identical" if exact and rep.max_abs_logits == 0 else
                    f"max |Δ| {rep.max_abs_logits:.3g}, mean KL {rep.mean_kl:.3g}, top-1 {rep.top1:.2%}"))
    if rep.reused_layers:
        lines.append(f"forward: B reused A's output at {rep.reused_layers} step(s) (decoder layers, the head "
                     "last) where its tensors and inputs were bit-identical to A's: the same computation")
    if tol.lossless and not rep.config_differences:
        lines.append("so: equal weights and an equivalent config compute the same function; the logits confirm it")
    elif not tol.tensors_equal:
        lines.append(f"so: the same model up to its quantization noise: mean KL ≤ {tol.max_kl:g} and top-1 ≥ "
                     f"{tol.min_top1:.0%}" + (f" ({tol.basis})" if tol.basis else ""))
    return lines


def judge(rep: VerifyReport, tol: Tolerance) -> None:
    """Fill ``rep.failures`` and ``rep.passed`` from its figures (and those on ``--text``) and ``tol``: the logits
    within the bounds, every tensor above the SQNR floor of a lossy tolerance, the configs and vocabularies
    equal (a quantized file too computes with the original's config and tokens)."""
    figures = {"max_abs_logits": rep.max_abs_logits, "mean_kl": rep.mean_kl, "top1": rep.top1,
               "ppl_a": rep.ppl_a, "ppl_b": rep.ppl_b}
    rep.failures += logit_failures(figures, tol)
    if rep.text is not None:
        rep.failures += [f"on the text: {f}" for f in logit_failures(rep.text, tol)]
    worst = rep.worst_tensors[0] if rep.worst_tensors else None
    if not tol.tensors_equal and worst is not None and not worst.sqnr_db >= tol.min_sqnr_db:
        rep.failures.append(f"{worst.name}: SQNR {worst.sqnr_db:.1f} dB against the original < {tol.min_sqnr_db:g} "
                            "dB, the least its stored type gives: more than quantization noise")
    if rep.config_differences:  # lossless or quantized, a conversion keeps the model's function
        rep.failures.append("the configs differ in what the forward pass reads: " + "; ".join(rep.config_differences))
    if rep.vocab_differences:
        rep.failures.append("the vocabularies differ: " + "; ".join(rep.vocab_differences))
    rep.passed = not rep.failures
    rep.bounds = tol.basis
    rep.proof = proof_lines(rep, tol) if rep.passed else []


def logit_failures(m: dict[str, float], tol: Tolerance) -> list[str]:
    """What in the figures ``m`` (as ``compare_logits`` returns them) breaks the bounds of ``tol``."""
    out = []
    if not all(math.isfinite(m[k]) for k in ("max_abs_logits", "mean_kl", "ppl_a", "ppl_b")):
        out.append("the logits are not finite (NaN/Inf): a weight holds NaN/Inf or the forward overflows")
    if m["max_abs_logits"] > tol.max_abs:
        out.append(f"max |Δ logits| {m['max_abs_logits']:.3g} > {tol.max_abs:g}")
    if m["mean_kl"] > tol.max_kl:
        out.append(f"mean KL {m['mean_kl']:.3g} > {tol.max_kl:g}")
    if m["top1"] < tol.min_top1:
        out.append(f"top-1 agreement {m['top1']:.2%} < {tol.min_top1:.2%}")
    return out


def require(rep: VerifyReport) -> None:
    """Raise VerificationError when the report failed."""
    if not rep.passed:
        raise VerificationError("verification failed: " + "; ".join(rep.failures), rep.b)


TOLERANCES = ("auto", "exact", "cast", "lossy")


def verify_paths(
    a: str | Path, b: str | Path, *, tolerance: str = "auto", max_kl: float = 0.05, min_top1: float = 0.9,
    n_tokens: int = 64, shape: ShapeOptions | None = None, progress: Progress = SILENT, text: str | None = None,
    compute: str = "exact",
) -> VerifyReport:
    """Compare any two checkpoints the reference reads; ``tolerance`` auto = exact when dtypes match;
    ``compute``: a key of ``COMPUTE`` (the forward passes' dtype)."""
    ca, cb = open_spec(a, shape, progress), open_spec(b, shape, progress)  # BASE+ADAPTER: unmerged
    tols = {"exact": Tolerance(), "cast": Tolerance.cast(), "lossy": Tolerance.lossy(max_kl, min_top1)}
    if tolerance != "auto" and tolerance not in tols:
        raise ConfigError(f"unknown tolerance {tolerance!r}; choose {', '.join(TOLERANCES)}")
    tol = auto_tolerance(ca, cb) if tolerance == "auto" else tols[tolerance]
    if tolerance == "auto" and (ca.adapters or cb.adapters):
        tol = adapter_tolerance(tol)
    if compute not in COMPUTE:
        raise ConfigError(f"unknown compute mode {compute!r}; choose {', '.join(COMPUTE)}")
    if compute == "fast":
        tol = fast_tolerance(tol)
    return verify(ca, cb, tolerance=tol, n_tokens=n_tokens, progress=progress, text=text, dtype=COMPUTE[compute])


def auto_tolerance(a: Checkpoint, b: Checkpoint) -> Tolerance:
    """What ``--tolerance auto`` demands: quantized weights (a GGUF's stored types, packed compressed-tensors)
    and GGUFs of other tools are judged by their types' bounds (``pipeline.diagnose.file_tolerance``);
    otherwise exact when the dtypes match, else equal after the cast."""
    tol = file_tolerance(a, b)
    if tol is not None:
        return tol
    same = all(b.tensors[n].dtype == t.dtype for n, t in a.tensors.items() if n in b.tensors)
    return Tolerance() if same else Tolerance.cast()
