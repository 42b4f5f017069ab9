"""Verification: compare two checkpoints tensor by tensor and by the reference model's logits.

``verify(a, b)`` loads both lazily, checks every tensor (``torch.equal`` after the expected cast, or
SQNR when lossy), runs the reference forward on a few fixed prompts, and reports max |Δ logits|,
mean KL(a‖b), top-1 agreement and the perplexity of each. Weights stream from the mapped files
(``resident=False`` for large models), so a model larger than RAM is verified too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemma2_convert.core.errors import ConfigError, VerificationError, check_names
from gemma2_convert.core.memory import fits_resident
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats import Checkpoint, open_checkpoint
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.formats.tolerance import Tolerance
from quant.metrics import kl_divergence, perplexity, sqnr_db, top1_agreement
from reference.heads import CLASSES
from reference.model import Gemma2Model
from reference.weights import WeightStore

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
    "changed physics: on the photoelectric effect, Brownian motion, special relativity, and mass-energy "
    "equivalence.\n\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nКогда-то давно жил-был кот. 東京は日本の首都です。 Emojis: 🙂🚀 — numbers 3.14159, 2718."
)


@dataclass
class TensorDiff:
    name: str
    equal: bool
    sqnr_db: float
    max_abs: float


@dataclass
class VerifyReport:
    a: str
    b: str
    tensors_total: int = 0
    tensors_equal: int = 0
    worst_tensors: list[TensorDiff] = field(default_factory=list)
    tokens: int = 0
    max_abs_logits: float = 0.0
    mean_kl: float = 0.0
    top1: float = 1.0
    ppl_a: float = 0.0
    ppl_b: float = 0.0
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def default_prompts(ckpt: Checkpoint, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompt ids [1, T]: the built-in text through the checkpoint's tokenizer when there is one,
    plus one seeded random sequence (ids ≥ 3 so no pad/eos/bos) of ``n_tokens``."""
    cfg = ckpt.config
    prompts = []
    if ckpt.tokenizer is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(ckpt.tokenizer))
        ids = [cfg.bos_token_id] + sp.encode(DEFAULT_TEXT)
        ids = [i for i in ids if i < cfg.vocab_size][:n_tokens]
        prompts.append(torch.tensor([ids]))
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(3, cfg.vocab_size, (1, n_tokens - 1), generator=g)
    prompts.append(torch.cat([torch.tensor([[cfg.bos_token_id]]), rand], dim=1))
    return prompts


COMPARE_ELEMENTS = 1 << 24  # compared per step: casts and differences of at most 16 M elements at a time


def _row_blocks(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching blocks of rows of x and y, so no cast or difference of a whole (256k-row) tensor is held."""
    if x.dim() == 0 or x.shape != y.shape:
        yield x, y
        return
    step = max(1, COMPARE_ELEMENTS // max(1, x[0].numel()))
    for i in range(0, x.shape[0], step):
        yield x[i:i + step], y[i:i + step]


def tensor_diff(name: str, x: torch.Tensor, y: torch.Tensor) -> TensorDiff:
    """x cast to y's dtype against y; when they differ, SQNR (as ``quant.metrics.sqnr_db``) and max |Δ|."""
    if x.shape != y.shape:
        return TensorDiff(name, False, sqnr_db(x.float(), y.float()), float("inf"))
    if all(torch.equal(xb.to(yb.dtype), yb) for xb, yb in _row_blocks(x, y)):
        return TensorDiff(name, True, float("inf"), 0.0)
    signal = noise = max_abs = 0.0
    for xb, yb in _row_blocks(x, y):
        xd = xb.double()
        dd = xd - yb.double()
        signal, noise = signal + float(xd.pow(2).sum()), noise + float(dd.pow(2).sum())
        max_abs = max(max_abs, float(dd.abs().max()) if dd.numel() else 0.0)
    if noise == 0.0:
        return TensorDiff(name, False, float("inf"), max_abs)
    rel = math.sqrt(noise / signal) if signal > 0 else math.inf
    return TensorDiff(name, False, -20.0 * math.log10(rel), max_abs)


def compare_tensors(a: Checkpoint, b: Checkpoint, worst: int = 5,
                    on_tensor: Callable[[str, int], None] | None = None) -> tuple[int, list[TensorDiff]]:
    """Number of b's tensors equal to a's cast to b's dtype, and the worst ``worst`` by SQNR
    (``on_tensor(name, nbytes)`` after each: progress)."""
    check_names(a.tensors, b.tensors, b.path)
    diffs = []
    for name, ta in a.tensors.items():
        diffs.append(tensor_diff(name, ta.load(), b.tensors[name].load()))
        if on_tensor is not None:
            on_tensor(name, ta.nbytes)
    n_equal = sum(d.equal for d in diffs)
    return n_equal, sorted((d for d in diffs if not d.equal), key=lambda d: d.sqnr_db)[:worst]


def reference_model(ck: Checkpoint, dtype: torch.dtype, resident: bool) -> Gemma2Model:
    """The reference class the checkpoint's config names (causal LM, classifier, bare decoder)."""
    return CLASSES[ck.config.head](ck.config, WeightStore(ck.tensors, ck.config, dtype, resident, str(ck.path)))


def compare_logits(a: Gemma2Model, b: Gemma2Model, prompts: list[torch.Tensor]) -> dict[str, float]:
    """max |Δ|, mean KL(a‖b), top-1 agreement and perplexities over what each head outputs
    (next-token logits; class logits of a classifier; hidden states of a bare decoder)."""
    la, lb, targets = [], [], []
    for ids in prompts:
        (pa, tgt), (pb, _) = a.verify_outputs(ids), b.verify_outputs(ids)  # [P, C] each
        la.append(pa)
        lb.append(pb)
        if tgt is not None:
            targets.append(tgt)
    pa, pb = torch.cat(la), torch.cat(lb)
    tgt = torch.cat(targets) if targets else None
    return {
        "tokens": int(pa.shape[0]),
        "max_abs_logits": (pa - pb).abs().max().item(),
        "mean_kl": kl_divergence(pa, pb),
        "top1": top1_agreement(pa, pb),
        "ppl_a": perplexity(pa, tgt) if tgt is not None else 0.0,
        "ppl_b": perplexity(pb, tgt) if tgt is not None else 0.0,
    }


def track_layers(models: tuple[Gemma2Model, ...], n_prompts: int, on_layer: Callable[[int, int], None]) -> None:
    """Report ``on_layer(done, total)`` after every decoder layer of ``models`` run on ``n_prompts`` each."""
    total = len(models) * n_prompts * models[0].config.num_hidden_layers
    done = itertools.count(1)
    for model in models:
        model.on_layer = lambda _i: on_layer(next(done), total)


def verify(
    a: str | Path | Checkpoint, b: str | Path | Checkpoint, *, tolerance: Tolerance | None = None,
    dtype: torch.dtype = torch.float32, n_tokens: int = 64, resident: bool | None = None,
    check_tensors: bool = True, progress: Progress = SILENT,
) -> VerifyReport:
    """Compare checkpoint ``b`` (the output) against ``a`` (the source); see the module docstring.
    Progress: a phase of bytes per tensor compared, then one of decoder layers run by the reference
    forward passes (both models, every prompt)."""
    tol = tolerance or Tolerance()
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b)
    rep = VerifyReport(str(ca.path), str(cb.path))
    if check_tensors:
        with progress.phase("comparing tensors", ca.nbytes):
            rep.tensors_equal, rep.worst_tensors = compare_tensors(ca, cb, on_tensor=progress.on_tensor)
        rep.tensors_total = len(ca.tensors)
        if tol.tensors_equal and rep.tensors_equal != rep.tensors_total:
            rep.failures.append(f"{rep.tensors_total - rep.tensors_equal} tensor(s) differ, worst "
                                f"{rep.worst_tensors[0].name} (max |Δ| {rep.worst_tensors[0].max_abs:.3g})")
    if resident is None:  # what each resident model would hold, twice
        resident = fits_resident(2 * 4 * sum(t.numel for t in ca.tensors.values()))
    prompts, models = default_prompts(ca, n_tokens), (reference_model(ca, dtype, resident),
                                                     reference_model(cb, dtype, resident))
    with progress.phase("reference forward", None, "layers"):
        track_layers(models, len(prompts), progress.update)
        m = compare_logits(*models, prompts)
    for k, v in m.items():
        setattr(rep, k, v)
    judge(rep, tol)
    return rep


def judge(rep: VerifyReport, tol: Tolerance) -> None:
    """Fill ``rep.failures`` and ``rep.passed`` from its figures and the bounds of ``tol``."""
    if not all(math.isfinite(v) for v in (rep.max_abs_logits, rep.mean_kl, rep.ppl_a, rep.ppl_b)):
        rep.failures.append("the logits are not finite (NaN/Inf): a weight holds NaN/Inf or the forward overflows")
    if rep.max_abs_logits > tol.max_abs:
        rep.failures.append(f"max |Δ logits| {rep.max_abs_logits:.3g} > {tol.max_abs:g}")
    if rep.mean_kl > tol.max_kl:
        rep.failures.append(f"mean KL {rep.mean_kl:.3g} > {tol.max_kl:g}")
    if rep.top1 < tol.min_top1:
        rep.failures.append(f"top-1 agreement {rep.top1:.2%} < {tol.min_top1:.2%}")
    rep.passed = not rep.failures


def require(rep: VerifyReport) -> None:
    """Raise VerificationError when the report failed."""
    if not rep.passed:
        raise VerificationError("verification failed: " + "; ".join(rep.failures), rep.b)


TOLERANCES = ("auto", "exact", "cast", "lossy")


def verify_paths(
    a: str | Path, b: str | Path, *, tolerance: str = "auto", max_kl: float = 0.05, min_top1: float = 0.9,
    n_tokens: int = 64, shape: ShapeOptions | None = None, progress: Progress = SILENT,
) -> VerifyReport:
    """Compare any two checkpoints the reference reads; ``tolerance`` auto = exact when dtypes match."""
    ca, cb = open_checkpoint(a, options=shape), open_checkpoint(b, options=shape)
    if tolerance == "auto":
        same = all(cb.tensors[n].dtype == t.dtype for n, t in ca.tensors.items() if n in cb.tensors)
        tolerance = "exact" if same else "cast"
    tols = {"exact": Tolerance(), "cast": Tolerance.cast(), "lossy": Tolerance.lossy(max_kl, min_top1)}
    if tolerance not in tols:
        raise ConfigError(f"unknown tolerance {tolerance!r}; choose {', '.join(TOLERANCES)}")
    return verify(ca, cb, tolerance=tols[tolerance], n_tokens=n_tokens, progress=progress)
