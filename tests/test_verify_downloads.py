"""``verify ORIGINAL someone-elses.gguf`` with the default ``--tolerance auto`` (issue 21: verify what users
download).

llama.cpp's own files of a correct conversion — its ``convert_hf_to_gguf.py`` then ``llama_model_quantize`` to
Q4_0, Q4_K_M and Q8_0 — pass, judged by their stored types' bounds (quant/gguf_types.py: mean KL, top-1, and a
per-tensor SQNR floor); its F32 file passes too (norms hold 1 + w rounded to float32, so no equality is demanded).
Files broken the ways real files were broken fail with exit 3 and the likely cause named, through the CLI and the
library: norms without the +1, no query-scale fold at a non-standard depth, no softcap keys, another vocabulary
(other pieces; more tokens), q and k swapped. Models: the trained fixture (GQA, standard depth, softcaps 50/30)
and random tiny ones (tests/gguf_helpers.py "mha": standard depth, softcaps 20/15; "fold": 5 layers with
query_pre_attn_scalar 48 ≠ head_dim 64).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.formats.tolerance import Tolerance
from gemma2_convert.pipeline.compare import TensorDiff
from gemma2_convert.pipeline.diagnose import EXACT_BOUND
from gemma2_convert.pipeline.verify import VerifyReport, judge, verify_paths
from quant.gguf_types import GGML_TYPES
from tests.downloads_helpers import (
    drop_softcaps,
    llama_cpp_convert,
    llama_quantize,
    more_tokens,
    norms_without_one,
    other_vocabulary,
    rewrite,
    swap_q_k,
)
from tests.gguf_helpers import CONFIGS, write_model

TRAINED = Path(__file__).resolve().parent / "fixtures" / "gemma2-tiny-trained"
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name → (original HF directory, GGUF): llama.cpp's own files, and broken ones made from its F32 file."""
    d = tmp_path_factory.mktemp("downloads")
    src = {"trained": TRAINED, "mha": write_model(d / "mha", CONFIGS["mha"], seed=3),
           "fold": write_model(d / "fold", CONFIGS["fold"], seed=3)}
    f32 = {name: llama_cpp_convert(hf, d / f"{name}-f32.gguf") for name, hf in src.items()}
    out = {f"{name}-F32": (src[name], f32[name]) for name in ("trained", "mha")}
    for name in ("trained", "mha"):
        for q in QUANTS:
            out[f"{name}-{q}"] = (src[name], llama_quantize(f32[name], d / f"{name}-{q}.gguf", q))
    out["fold"] = (src["fold"], llama_quantize(f32["fold"], d / "fold-Q4_K_M.gguf", "Q4_K_M"))
    extra_t, extra_kv = more_tokens(256)
    broken = {"norms": ("trained", {"tensors": norms_without_one}), "softcap": ("mha", {"kv": drop_softcaps}),
              "vocab": ("trained", {"kv": other_vocabulary}), "vocab_size": ("trained", {"tensors": extra_t,
                                                                                      "kv": extra_kv}),
              "swap": ("mha", {"tensors": swap_q_k})}
    for name, (model, edits) in broken.items():
        f = rewrite(f32[model], d / f"{name}-f32.gguf", **edits)
        out[name] = (src[model], llama_quantize(f, d / f"{name}-Q4_K_M.gguf", "Q4_K_M"))
    return out


def _cli(a: Path, b: Path) -> tuple[int, dict, str]:
    r = CliRunner().invoke(cli, ["verify", str(a), str(b), "--json"])
    return r.exit_code, json.loads(r.stdout), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{m}-{q}" for m in ("trained", "mha") for q in ("F32",) + QUANTS])
def test_llama_cpps_own_files_pass(files, name):
    a, b = files[name]
    rep = verify_paths(a, b)
    assert rep.passed, (rep.failures, rep.likely_causes)
    stored = name.split("-")[1]
    loosest = {"Q4_K_M": "Q4_K"}.get(stored, stored)  # Q4_K_M stores Q4_K, Q6_K and F32: Q4_K is the loosest
    bound = GGML_TYPES[loosest].lossy_bound or EXACT_BOUND
    print(f"{name}: mean KL {rep.mean_kl:.3g} (bound {bound[0]:g}), top-1 {rep.top1:.2%}, worst SQNR "
          f"{rep.worst_tensors[0].sqnr_db:.1f} dB")
    assert rep.bounds.startswith(f"bounds of {loosest}") and rep.mean_kl < bound[0] / 10
    assert rep.proof[-1].startswith(f"so: the same model up to its quantization noise: mean KL ≤ {bound[0]:g}")
    assert rep.worst_tensors[0].sqnr_db > GGML_TYPES[loosest].min_sqnr_db + 6  # healthy files clear the floor


@pytest.mark.slow
def test_the_cli_passes_a_llama_cpp_q4_k_m(files):
    code, rep, err = _cli(*files["trained-Q4_K_M"])
    assert code == 0, err
    assert rep["passed"] and rep["likely_causes"] == [] and "Q4_K" in rep["bounds"]


BROKEN = {
    "norms": "norms stored without the +1: 17 of 17 norm tensors read back as the original minus 1.0",
    "fold": "wrong query scale: the original scales attention scores by 1/√48 (query_pre_attn_scalar), this "
            "file by ",
    "softcap": "missing softcap: the file has no gemma2.attn_logit_softcapping key, so llama.cpp applies its "
               "default 50 where the original uses 20.0",
    "vocab": "vocabulary does not match: 1748 of 2048 token ids hold another piece (first id 300: '▁c' → 'al')",
    "vocab_size": "vocabulary does not match: the original has 2048 token rows, this file 2304",
    "swap": "q and k swapped: in 3 of 3 layers looked at, attn_q is the original's k_proj",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_file_fails_with_its_cause_named(files, name):
    a, b = files[name]
    rep = verify_paths(a, b)
    assert not rep.passed and rep.proof == []
    assert any(c.startswith(BROKEN[name]) for c in rep.likely_causes), rep.likely_causes
    assert len(rep.likely_causes) == 1 + (name == "softcap"), rep.likely_causes  # the final softcap too
    code, js, err = _cli(a, b)
    assert code == 3 and js["likely_causes"] == rep.likely_causes
    assert f"likely cause: {BROKEN[name]}" in err and "Traceback" not in err


# ---- fast: the judgement itself, and causes found in HF copies of the trained fixture --------------------

def _report(**kw) -> VerifyReport:
    return VerifyReport("a", "b", tensors_total=3, tokens=10, **kw)


def test_judge_holds_quantized_files_to_the_floor_config_and_vocabulary():
    tol = Tolerance.lossy(0.2, 0.7, min_sqnr_db=14.0).because("bounds of Q4_K")
    ok = _report(worst_tensors=[TensorDiff("w", False, 21.0, 0.1)], mean_kl=0.01)
    judge(ok, tol)
    assert ok.passed and ok.bounds == "bounds of Q4_K" and "≥ the floor 14 dB" in ok.proof[0]
    low = _report(worst_tensors=[TensorDiff("model.layers.0.self_attn.q_proj.weight", False, -3.0, 1.0)])
    judge(low, tol)
    assert low.failures == [("model.layers.0.self_attn.q_proj.weight: SQNR -3.0 dB against the original < 14 dB, "
                             "the least its stored type gives: more than quantization noise")]
    cfg = _report(config_differences=["query_pre_attn_scalar: 48 → 64.0"])
    judge(cfg, tol)  # a quantized file computes with the original's config too
    assert cfg.failures == ["the configs differ in what the forward pass reads: query_pre_attn_scalar: 48 → 64.0"]
    vocab = _report(vocab_differences=["2048 tokens → 2304"])
    judge(vocab, tol)
    assert vocab.failures == ["the vocabularies differ: 2048 tokens → 2304"]


def test_every_type_has_a_floor_below_what_its_codec_gives():
    """The floors are 6 dB under the measured minimum (docs/VERIFY.md); finer types have higher floors."""
    floors = {n: t.min_sqnr_db for n, t in GGML_TYPES.items()}
    assert all(math.isfinite(f) for f in floors.values())
    assert floors["Q2_K"] < floors["Q3_K"] < floors["Q4_K"] < floors["Q5_K"] < floors["Q6_K"] < floors["Q8_0"]
    assert floors["Q8_0"] < floors["BF16"] < floors["F16"] < floors["F32"]


def _hf_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(TRAINED, copy)
    return copy


def test_one_layers_norms_off_by_one_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    copy = _hf_copy(tmp_path)
    sd = load_file(copy / "model.safetensors")
    save_file({k: v + 1 if k.startswith("model.layers.2.") and k.endswith("norm.weight") else v
               for k, v in sd.items()}, copy / "model.safetensors", metadata={"format": "pt"})
    rep = verify_paths(TRAINED, copy)
    assert not rep.passed
    assert rep.likely_causes == [
        ("+1 added twice to the norms: 4 of 17 norm tensors are the original plus 1.0 (e.g. "
         "model.layers.2.input_layernorm.weight); the source already held 1 + w; reconvert from zero-centred weights")]


def test_a_config_without_softcap_is_named(tmp_path):
    copy = _hf_copy(tmp_path)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["attn_logit_softcapping"] = None
    (copy / "config.json").write_text(json.dumps(cfg))
    code, rep, err = _cli(TRAINED, copy)
    assert code == 3 and rep["likely_causes"] == [
        ("missing softcap: the original caps at 50 (cap·tanh(x/cap)), this file has no attn_logit_softcapping; "
         "set it (config.json / gemma2.attn_logit_softcapping) or reconvert")]
    assert "likely cause: missing softcap" in err


def test_our_bf16_gguf_with_the_query_fold_passes_auto(tmp_path):
    """Our own BF16 GGUF of a model whose query scale is folded into attn_q (query_pre_attn_scalar ≠ head_dim):
    q_proj reads back within BF16's rounding of the folded product, so auto judges it by BF16's bounds (as the
    writer's own check does) and passes it; the other tensors still compare exactly."""
    hf = write_model(tmp_path / "fold", CONFIGS["fold"], seed=3)
    out = tmp_path / "fold-bf16.gguf"
    r = CliRunner().invoke(cli, ["to-gguf", str(hf), str(out), "--type", "bf16", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = verify_paths(hf, out)
    assert rep.passed and "folded" in rep.bounds, (rep.failures, rep.bounds)
    assert rep.top1 == 1.0 and rep.mean_kl < 1e-4, (rep.top1, rep.mean_kl)
    q = [d for d in rep.worst_tensors if d.name.endswith("q_proj.weight")]
    assert q and rep.tensors_total - rep.tensors_equal == len(CONFIGS["fold"].layer_types), rep.worst_tensors
