"""KerasHub presets through the other real clients, and KerasHub checking our files.

* llama.cpp (llama-cpp-python) runs the F32 GGUF of a KerasHub-saved preset (``orig-to-gguf`` and ``to-gguf``)
  with the reference's logits: max |Δ| ≤ LLAMA_CPP_MAX_ABS (5e-3, the bound of every F32 GGUF) and top-1 100 %,
  the 27B's hidden/heads query scale included (folded into attn_q for llama.cpp).
* KerasHub loads our HF directory (``from_preset`` on it: KerasHub's own transformers converter) and its
  forward agrees with the reference, fp32 within 1e-4: a third independent implementation checking our
  files. KerasHub's forward ignores a hidden/heads query scale (its bug, tests/test_keras.py), so these use
  head_dim.
* ``convert --to keras`` (formats.keras_writer): KerasHub loads the preset, tokenizer and preprocessor
  included, and computes the source's logits; a bfloat16 preset loads bit for bit. A model a KerasHub config
  cannot state is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("h5py", reason="the Keras reader and writer need h5py (pip install 'gemma2-convert[keras]')")

from gemma2_convert.cli.main import cli
from gemma2_convert.core.errors import TensorMismatchError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats import keras_map as km
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.keras_writer import write_keras_preset
from gemma2_convert.formats.synthetic import random_tensors
from gemma2_convert.formats.testing import write_random_orig_ckpt
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from gemma2_convert.pipeline.demo import LLAMA_CPP_MAX_ABS
from gemma2_convert.pipeline.gguf import to_gguf
from gemma2_convert.pipeline.llama_runner import llama_cpp_logits
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2Config, Gemma2ForCausalLM
from tests.conftest import make_hf_model
from tests.keras_helpers import (
    CONFIGS,
    TOL,
    VOCAB,
    ids_for,
    keras_variable,
    kerashub_backbone,
    kerashub_logits,
    load_keras_hub,
    report,
    save_causal_lm,
)

N_TOKENS = 64  # ≥ 3 sliding windows of every config here


@pytest.fixture(scope="module")
def keras_hub():
    return load_keras_hub()


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Path:
    return make_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", VOCAB)


def run_cli(*args: object) -> dict:
    r = CliRunner().invoke(cli, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = from_pretrained(path, Gemma2ForCausalLM, dtype=torch.float32)
    with torch.no_grad():
        return model(ids)


# ---- llama.cpp runs the GGUF of a KerasHub-saved preset --------------------------------------------

def kerashub_preset(keras_hub, name: str, spm: Path, root: Path) -> Path:
    """A GemmaCausalLM preset saved by KerasHub. The hidden/heads model comes from a transformers directory
    through KerasHub's own HF loader (a backbone built with query_head_dim_normalize=False saves the same)."""
    cfg = CONFIGS[name]
    if cfg.query_pre_attn_scalar == cfg.head_dim:
        backbone = kerashub_backbone(keras_hub, cfg, seed=5)
    else:
        make_hf_model(cfg, seed=5).save_pretrained(root / "hf-src")
        backbone = keras_hub.models.GemmaBackbone.from_preset(str(root / "hf-src"))
    return save_causal_lm(keras_hub, backbone, spm, root / "preset")


@pytest.mark.parametrize("command", ["orig-to-gguf", "to-gguf"])
@pytest.mark.parametrize("name", ["gqa", "mha", "hidden_over_heads"])
def test_kerashub_preset_to_f32_gguf_runs_in_llama_cpp(keras_hub, spm, tmp_path, name, command):
    import llama_cpp  # noqa: F401  (a real client of the test extra: missing is a failure, not a skip)
    cfg = CONFIGS[name]
    preset = kerashub_preset(keras_hub, name, spm, tmp_path)
    assert open_checkpoint(preset).config == cfg
    res = run_cli(command, preset, tmp_path / "m.gguf", "--type", "f32")
    assert res["verify"]["passed"], res["verify"]
    g = torch.Generator().manual_seed(0)
    ids = [cfg.bos_token_id] + torch.randint(3, cfg.vocab_size, (N_TOKENS - 1,), generator=g).tolist()
    got = llama_cpp_logits(tmp_path / "m.gguf", [ids])[0]  # [T, V]
    want = reference_logits(preset, torch.tensor([ids]))[0]
    d = (got - want).abs()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    pos = int(d.max(-1).values.argmax())
    print(f"{name} {command}: llama.cpp vs reference max |Δ| {d.max().item():.3g} at position {pos}, top-1 {top1:.0%}")
    assert d.max().item() <= LLAMA_CPP_MAX_ABS and top1 == 1.0, (
        f"max |Δ| {d.max().item():.3g} > {LLAMA_CPP_MAX_ABS} or top-1 {top1:.2%} at position {pos}: "
        f"llama.cpp {got[pos, :4].tolist()} reference {want[pos, :4].tolist()}")


# ---- KerasHub loads our HF directory ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_kerashub_loads_our_hf_output(keras_hub, spm, tmp_path, name):
    """gemma_pytorch checkpoint → ``orig-to-hf`` → KerasHub ``GemmaCausalLM.from_preset`` on the directory."""
    cfg = CONFIGS[name]
    write_random_orig_ckpt(tmp_path / "orig" / "model.ckpt", cfg, seed=9)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    res = run_cli("orig-to-hf", tmp_path / "orig" / "model.ckpt", tmp_path / "hf", "--config",
                  tmp_path / "config.json", "--tokenizer", spm)
    assert res["verify"]["passed"], res["verify"]
    lm = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "hf"))
    assert lm.preprocessor.tokenizer.vocabulary_size() == cfg.vocab_size
    ids = ids_for(cfg)
    got = kerashub_logits(keras_hub, lm.backbone, ids)
    want = reference_logits(tmp_path / "hf", ids)
    print(f"{name}: KerasHub on our HF directory vs reference: {report(got, want)}")
    assert (got - want).abs().max() <= TOL, report(got, want)


# ---- convert --to keras: KerasHub loads our preset ----------------------------------------------------

@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, spm) -> Path:
    """A transformers-saved HF directory (GQA, head_dim scale) with the tiny tokenizer."""
    d = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model(CONFIGS["gqa"], seed=4).save_pretrained(d)
    (d / "tokenizer.model").write_bytes(spm.read_bytes())
    return d


def test_kerashub_loads_our_keras_preset(keras_hub, hf_source, tmp_path):
    res = run_cli("convert", hf_source, tmp_path / "keras", "--to", "keras")
    rep = res["verify"]
    assert rep["passed"] and rep["tensors_equal"] == rep["tensors_total"] and rep["max_abs_logits"] == 0, rep
    lm = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "keras"))
    theirs = keras_hub.models.GemmaTokenizer.from_preset(str(tmp_path / "keras"))
    text = "<start_of_turn>user\nWhat is 17 * 23?<end_of_turn>\n"
    assert [int(i) for i in lm.preprocessor.tokenizer(text)] == [int(i) for i in theirs(text)]
    ids = ids_for(CONFIGS["gqa"])
    got = kerashub_logits(keras_hub, lm.backbone, ids)
    want = reference_logits(hf_source, ids)
    print(f"KerasHub on our preset vs reference on the source: {report(got, want)}")
    assert (got - want).abs().max() <= TOL, report(got, want)


def test_bfloat16_keras_preset_loads_bit_for_bit(keras_hub, hf_source, tmp_path):
    import keras

    run_cli("convert", hf_source, tmp_path / "keras", "--to", "keras", "--dtype", "bfloat16")
    assert json.loads((tmp_path / "keras" / "config.json").read_text())["config"]["dtype"]["config"]["name"] \
        == "bfloat16"
    backbone = keras_hub.models.GemmaBackbone.from_preset(str(tmp_path / "keras"), dtype="bfloat16")
    src = open_checkpoint(hf_source).tensors
    cfg = CONFIGS["gqa"]
    for name, hf, rule in km.expand(cfg.num_hidden_layers):
        v = keras_variable(backbone, name)
        got = torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(v.value, "float32"))))
        want = rule.inverse(src[hf].load().to(torch.bfloat16), cfg).float()
        assert torch.equal(got, want), f"{name} ← {hf}: {report(got, want)}"


def test_gguf_to_keras_ships_the_embedded_tokenizer(hf_source, spm, tmp_path):
    """No tokenizer.model beside the GGUF: the one it embeds becomes the preset's vocabulary.spm (and nothing else)."""
    to_gguf(hf_source, tmp_path / "m.gguf", type_name="f32", verify=False)
    res = run_cli("convert", tmp_path / "m.gguf", tmp_path / "keras", "--to", "keras")
    assert res["verify"]["passed"], res["verify"]
    files = sorted(str(p.relative_to(tmp_path / "keras")) for p in (tmp_path / "keras").rglob("*") if p.is_file())
    assert files == ["assets/tokenizer/vocabulary.spm", "config.json", "metadata.json", "model.weights.h5",
                     "preprocessor.json", "task.json", "tokenizer.json"]
    assert (tmp_path / "keras" / "assets" / "tokenizer" / "vocabulary.spm").read_bytes() == spm.read_bytes()
    assert open_checkpoint(tmp_path / "keras").config.torch_dtype == "float32"


def test_a_model_kerashub_cannot_state_is_refused(tmp_path):
    cfg = CONFIGS["gqa"].replace(query_pre_attn_scalar=24, rope_theta=20000.0)
    make_hf_model(cfg).save_pretrained(tmp_path / "hf")
    out = tmp_path / "keras"
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "hf"), str(out), "--to", "keras"])
    assert r.exit_code == 2, r.output
    assert ("a KerasHub GemmaBackbone cannot state this model: query_pre_attn_scalar 24 (KerasHub's would be "
            "32.0); rope_theta 20000.0 (KerasHub's would be 10000.0)") in r.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_writer_refuses_mixed_dtypes(tmp_path):
    cfg: Gemma2Config = CONFIGS["mha"]
    tensors = dict(random_tensors(cfg, 0, torch.float32))
    tensors["model.norm.weight"] = LazyTensor.of(torch.zeros(cfg.hidden_size, dtype=torch.bfloat16))
    with pytest.raises(TensorMismatchError, match="expected tensors of one dtype of .*, got bfloat16, float32"):
        write_keras_preset(tmp_path / "p", cfg, tensors)
    assert not (tmp_path / "p").exists()
