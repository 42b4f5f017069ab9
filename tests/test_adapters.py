"""PEFT adapters: merged by ``convert --adapter`` against peft's own unmerged model, and ``verify
BASE+ADAPTER`` running the adapter unmerged in the reference (passes on a correct merge, fails with exit 3 on
a wrong one)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from gemma2_convert.core.errors import (
    TensorMismatchError,
    UnsupportedError,
    VerificationError,
)
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.adapter import read_adapter
from gemma2_convert.formats.merge import adapt
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.pipeline.convert import convert
from gemma2_convert.pipeline.verify import require, verify_paths
from tests.adapter_helpers import (
    CASES,
    logits_of,
    make_adapter,
    scaled_copy,
    tiny_tokenizer,
)
from tests.conftest import with_slow

import peft  # noqa: F401  (a real client of the test extra: missing is a failure, not a skip)
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def spm512(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory)


def merged_hf(base, adapter, out, **kw):
    return convert(base, out, ConvertOptions(to="hf", dtype="float32", adapters=(adapter,), **kw))


def assert_close(a: torch.Tensor, b: torch.Tensor, bound: float) -> None:
    d = (a - b).abs()
    i = int(d.argmax())
    assert d.max() <= bound, (f"max |Δ logits| {float(d.max()):.3g} at flat index {i}: "
                              f"{a.flatten()[i]} vs {b.flatten()[i]}")


@pytest.mark.parametrize("kind", with_slow(sorted(CASES), "rslora", "all_linear", "embed"))
def test_merged_matches_peft_unmerged(tmp_path, kind):
    """transformers + peft.PeftModel (unmerged, fp32) vs our merged HF output loaded in transformers."""
    import transformers

    pm, base, adapter = make_adapter(tmp_path, kind)
    res = merged_hf(base, adapter, tmp_path / "merged")
    assert res.report is not None and res.report.passed
    load = transformers.AutoModelForCausalLM.from_pretrained
    ours = load(tmp_path / "merged", attn_implementation="eager").eval()
    vocab = pm.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    want, got = logits_of(pm, ids), logits_of(ours, ids)
    assert_close(got, want, 1e-4)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    old_ids = ids.clamp(max=base_model.config.vocab_size - 1)
    base_logits = logits_of(base_model, old_ids)
    changed = (base_logits - logits_of(ours, old_ids)[..., :base_logits.shape[-1]]).abs().max()
    assert changed > 1e-2  # the adapter did something
    untied = kind in ("lm_head", "embed", "added_tokens")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (not untied)
    assert (res.details["adapters"]["untied_head"] is not None) is untied
    if kind == "added_tokens":
        assert cfg["vocab_size"] == vocab


@pytest.mark.parametrize("kind", with_slow(["lora", "dora", "lm_head", "added_tokens"], "dora",
                                           "added_tokens"))
def test_verify_base_plus_adapter(tmp_path, kind):
    """The reference runs the adapter unmerged: passes on the merge, fails on a merge with the scale ×2."""
    _, base, adapter = make_adapter(tmp_path, kind)
    merged_hf(base, adapter, tmp_path / "merged")
    rep = verify_paths(f"{base}+{adapter}", tmp_path / "merged")
    assert rep.passed, rep.failures
    assert rep.max_abs_logits < 1e-4
    wrong = scaled_copy(adapter, tmp_path / "wrong", 2.0)
    merged_hf(base, wrong, tmp_path / "merged_wrong")
    bad = verify_paths(f"{base}+{adapter}", tmp_path / "merged_wrong")
    assert not bad.passed
    with pytest.raises(VerificationError) as e:
        require(bad)
    assert e.value.exit_code == 3


def test_unmerged_reference_equals_peft(tmp_path):
    """The unmerged checkpoint's reference logits match peft's forward (DoRA on all linears, rsLoRA scale)."""
    from gemma2_convert.pipeline.verify import reference_model

    pm, base, adapter = make_adapter(tmp_path, "dora")
    ck = adapt(open_checkpoint(base), [read_adapter(adapter)], merge=False).checkpoint
    model = reference_model(ck, torch.float32, True)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    assert_close(model(ids), logits_of(pm, ids), 1e-4)


@pytest.mark.slow
def test_two_adapters_in_order(tmp_path):
    """Two adapters merge one after the other, as verify's unmerged chain computes them."""
    _, base, a1 = make_adapter(tmp_path, "lora", seed=0)
    _, _, a2 = make_adapter(tmp_path, "dora", seed=5)
    convert(base, tmp_path / "m", ConvertOptions(to="hf", dtype="float32", adapters=(a1, a2)))
    rep = verify_paths(f"{base}+{a1}+{a2}", tmp_path / "m")
    assert rep.passed and rep.max_abs_logits < 1e-4


def test_errors_list_every_offending_name(tmp_path):
    _, base, adapter = make_adapter(tmp_path, "lora")
    from safetensors.torch import load_file, save_file

    sd = load_file(adapter / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 7)
    sd["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    sd["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = torch.zeros(96, 4)
    sd["base_model.model.model.layers.1.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(sd, adapter / "adapter_model.safetensors")
    with pytest.raises(TensorMismatchError) as e:
        adapt(open_checkpoint(base), [read_adapter(adapter)])
    msg = str(e.value)
    assert "layers.0.self_attn.q_proj.weight A is [4, 7], expected [4, 64]" in msg
    assert "target model.layers.9.mlp.up_proj.weight is not a weight of the base" in msg
    assert "lora_C" in msg


def test_unknown_peft_type_is_refused(tmp_path):
    _, _, adapter = make_adapter(tmp_path, "lora")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="peft_type is 'LOHA'; only LoRA adapters"):
        read_adapter(adapter)


def test_cli_convert_and_verify(tmp_path):
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    _, base, adapter = make_adapter(tmp_path, "lm_head")
    r = CliRunner().invoke(cli, ["convert", str(base), str(tmp_path / "m"), "--to", "hf", "--adapter",
                                 str(adapter), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "separate lm_head" in r.output
    r = CliRunner().invoke(cli, ["verify", f"{base}+{adapter}", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    wrong = scaled_copy(adapter, tmp_path / "wrong", 2.0)
    r = CliRunner().invoke(cli, ["verify", f"{base}+{wrong}", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 3, r.output


@pytest.mark.slow
def test_quantize_with_adapter_is_merge_then_quantize(tmp_path, spm512):
    """gemma2-quantize --adapter (one pass) writes the bytes of convert --adapter then gemma2-quantize."""
    from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint

    _, base, adapter = make_adapter(tmp_path, "dora", tokenizer=spm512)
    (tmp_path / "two").mkdir()
    merged = tmp_path / "two" / "base"  # the same name: the GGUF records its source's name
    convert(base, merged, ConvertOptions(to="hf", adapters=(adapter,), verify=False))
    (merged / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes())
    opts = QuantizeOptions(bits=4, method="rtn", format="gguf", verify=False)
    quantize_checkpoint(merged, tmp_path / "two.gguf", opts)
    quantize_checkpoint(base, tmp_path / "one.gguf", replace(opts, adapters=(adapter,)))
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()


def test_adapter_tokenizer_files_come_along(tmp_path):
    """Added tokens live in the adapter directory's tokenizer files: the merged HF directory carries them."""
    _, base, adapter = make_adapter(tmp_path, "added_tokens")
    decoder = {str(512 + i): {"content": f"<new{i}>", "special": False} for i in range(3)}
    added = {"added_tokens_decoder": decoder}
    (adapter / "tokenizer_config.json").write_text(json.dumps(added))
    res = merged_hf(base, adapter, tmp_path / "m", verify=False)
    assert "tokenizer_config.json" in res.files
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text()) == added


@pytest.mark.slow
def test_untied_head_in_gguf(tmp_path, spm512):
    """An lm_head adapter on the tied model: the GGUF gets output.weight, reads back untied, and verifies
    against the unmerged reference; the doctor keeps calling a stored head in an HF base an error, not in the
    merge."""
    from gemma2_convert.formats.gguf.file import GGUFFile
    from gemma2_convert.pipeline.inspect import inspect_path

    _, base, adapter = make_adapter(tmp_path, "lm_head", tokenizer=spm512)
    res = convert(base, tmp_path / "m.gguf", ConvertOptions(to="gguf", gguf_type="f32", adapters=(adapter,)))
    assert res.report.passed and any("separate lm_head" in w for w in res.warnings)
    assert "output.weight" in GGUFFile(tmp_path / "m.gguf").tensors
    assert not open_checkpoint(tmp_path / "m.gguf").config.tie_word_embeddings
    rep = verify_paths(f"{base}+{adapter}", tmp_path / "m.gguf")
    assert rep.passed and rep.max_abs_logits < 1e-4
    merged_hf(base, adapter, tmp_path / "m_hf")
    codes = {f.code for f in inspect_path(tmp_path / "m_hf").findings}
    assert "untied-lm-head" not in codes


def test_bin_adapter_reads_like_safetensors(tmp_path):
    """adapter_model.bin (torch.save, read weights-only) merges to the same tensors as the safetensors file."""
    from safetensors.torch import load_file

    _, base, adapter = make_adapter(tmp_path, "lora")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    torch.save(load_file(adapter / "adapter_model.safetensors"), binary / "adapter_model.bin")
    a = adapt(open_checkpoint(base), [read_adapter(adapter)]).checkpoint
    b = adapt(open_checkpoint(base), [read_adapter(binary)]).checkpoint
    assert all(torch.equal(t.load(), b.tensors[n].load()) for n, t in a.tensors.items())
    assert a.metadata["adapters"] == str(adapter)
