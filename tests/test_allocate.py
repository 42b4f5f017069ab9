"""``--bpw`` / ``--target-size``: a GGUF type per tensor by measured error within a byte budget.

The allocator against brute force on small problems (numbers, not shapes); the pipeline on the trained
fixture: the file llama.cpp runs holds the chosen types, stays within the budget, lists them in its metadata,
and beats the fixed Q4_0 layout of the same size.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from quant.allocate import Candidate, allocate, hull

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL, EVAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt", FIX / "eval.txt"


def test_hull_drops_dominated_and_concave_points() -> None:
    c = [Candidate("a", 10, 9.0), Candidate("b", 20, 4.0), Candidate("c", 30, 3.5), Candidate("d", 40, 1.0),
         Candidate("e", 50, 2.0)]
    assert [x.qtype for x in hull(c)] == ["a", "b", "d"]  # c lies above b–d; e costs more for more error


def test_allocation_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        cands = {}
        for t in range(4):
            sizes = sorted(torch.randint(1, 40, (4,), generator=g).tolist())
            errs = sorted(torch.rand(4, generator=g).tolist(), reverse=True)
            cands[f"t{t}"] = [Candidate(f"q{k}", s + 10 * k, e * (t + 1))
                              for k, (s, e) in enumerate(zip(sizes, errs))]
        budget = sum(min(c.nbytes for c in v) for v in cands.values()) + 30 + trial * 5
        got = allocate(cands, budget)
        assert sum(c.nbytes for c in got.values()) <= budget
        best = min((sum(c.error for c in combo), combo) for combo in itertools.product(*cands.values())
                   if sum(c.nbytes for c in combo) <= budget)[0]
        assert sum(c.error for c in got.values()) == pytest.approx(best, rel=1e-12)  # the exact optimum


def test_allocation_spends_the_budget_the_hull_greedy_leaves() -> None:
    # the hull of t0 jumps 100 → 300 bytes; the greedy stops at 100 + 100, the knapsack takes t0's middle type
    cands = {"t0": [Candidate("a", 100, 10.0), Candidate("b", 190, 6.0), Candidate("c", 300, 0.0)],
             "t1": [Candidate("a", 100, 1.0), Candidate("b", 110, 0.9)]}
    got = allocate(cands, 300)
    assert {n: c.qtype for n, c in got.items()} == {"t0": "b", "t1": "b"}
    assert sum(c.nbytes for c in got.values()) == 300


def test_budget_below_the_smallest_types_is_an_error() -> None:
    with pytest.raises(UnsupportedError, match="below the smallest types"):
        allocate({"t": [Candidate("Q4_0", 100, 1.0)]}, 50)


def test_bpw_needs_gguf(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="--bpw / --target-size choose GGUF types"):
        quantize_checkpoint(MODEL, tmp_path / "o", QuantizeOptions(format="hf", bpw=4.5))


@pytest.mark.slow
def test_measured_allocation_beats_q4_0_at_its_size(tmp_path: Path) -> None:
    from gguf import GGUFReader

    from gemma2_convert.formats.gguf.quantized import K_QUANTIZATION

    fixed = quantize_checkpoint(MODEL, tmp_path / "q4_0.gguf", QuantizeOptions(
        4, 32, True, "mse", "gguf", "q6_k", calibration=CAL, eval_text=EVAL))
    mixed = quantize_checkpoint(MODEL, tmp_path / "mix.gguf", QuantizeOptions(
        4, 32, True, "mse", "gguf", calibration=CAL, eval_text=EVAL, target_size=fixed.output_bytes))
    assert 0.995 * fixed.output_bytes <= mixed.output_bytes <= fixed.output_bytes  # the budget spent, not over
    assert mixed.quality["mean_kl"] < fixed.quality["mean_kl"], (mixed.quality, fixed.quality)
    r = GGUFReader(tmp_path / "mix.gguf")
    label = bytes(r.fields[K_QUANTIZATION].parts[-1]).decode()
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert label.startswith("measured allocation: ") and len(set(types.values()) - {"F32"}) >= 2
