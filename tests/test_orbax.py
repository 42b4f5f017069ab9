"""Orbax (Flax) Gemma 2 checkpoints, read with tensorstore only: the committed fixtures
(tools/make_orbax_fixture.py) convert to HF tensors bit-equal to the transformers model they were made
from, transformers on the converted directory gives the reference's logits on the Orbax directory, jax
is never imported, and damaged checkpoints give one clear error."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorstore", reason="the Orbax reader needs tensorstore (pip install 'gemma2-convert[flax]')")

from gemma2_convert.core.errors import ConfigError, ConversionError, FormatError, TensorMismatchError  # noqa: E402
from gemma2_convert.formats import detect_format, open_checkpoint  # noqa: E402
from gemma2_convert.formats import flax_map as fm  # noqa: E402
from gemma2_convert.formats.hf import write_hf_dir  # noqa: E402
from gemma2_convert.formats.orbax import read_arrays  # noqa: E402
from gemma2_convert.formats.orig_config import ShapeOptions  # noqa: E402
from gemma2_convert.pipeline.load import from_pretrained  # noqa: E402
from reference import Gemma2ForCausalLM  # noqa: E402
from reference.config import PRESETS, Gemma2Config  # noqa: E402
from tests.badinputs.mutate import orbax_set_write_shape, orbax_set_zarray  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "orbax"
# fixture → (what to open, how its config is pinned); the 27B-like one needs only the query scale
CASES = {
    "gemma2_2b_layout": ("kaggle", "config"),
    "gemma2_27b_layout": ("kaggle/gemma2-tiny", 4.0),
    "mha_nested_zarr": ("ckpt", "config"),
}


def options(name: str) -> ShapeOptions:
    pin = CASES[name][1]
    if pin == "config":
        return ShapeOptions(config=FIXTURES / name / "hf" / "config.json")
    return ShapeOptions(query_pre_attn_scalar=pin)


def source(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURES / name / "hf" / "model.safetensors")


def open_fixture(name: str, path: Path | None = None):
    return open_checkpoint(path or FIXTURES / name / CASES[name][0], options=options(name))


def assert_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        d = (a.float() - b.float()).abs()
        i = int(d.argmax()) if d.numel() else 0
        raise AssertionError(f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}, max |Δ| "
                             f"{d.max().item():.3g} at flat index {i}")


# ---- the fixtures convert exactly -------------------------------------------------------------

def test_detects_checkpoint_and_kaggle_directories():
    for name, (path, _) in CASES.items():
        assert detect_format(FIXTURES / name / path) == "orbax"
        assert detect_format(FIXTURES / name / "hf") == "hf"
    assert detect_format(FIXTURES / "gemma2_2b_layout" / "kaggle" / "gemma2-tiny") == "orbax"


@pytest.mark.parametrize("name", sorted(CASES))
def test_tensors_equal_the_source_model(name):
    ck = open_fixture(name)
    expected = source(name)
    assert sorted(ck.tensors) == sorted(expected)
    for k, v in expected.items():
        got = ck.tensors[k].load()
        assert_equal(got, v, k)
        assert got.is_contiguous(), f"{k}: strides {got.stride()} (matmul kernels, hence logits, depend on them)"
    want = Gemma2Config.from_json_file(FIXTURES / name / "hf" / "config.json")
    assert ck.config.replace(extra=()) == want.replace(extra=()), (ck.config, want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_on_converted_dir_matches_reference_on_orbax(tmp_path, name):
    import transformers

    ck = open_fixture(name)
    write_hf_dir(tmp_path, ck.config, list(ck.tensors.items()), tokenizer=ck.tokenizer)
    assert (tmp_path / "tokenizer.json").is_file() == (ck.tokenizer is not None)
    ids = torch.randint(3, ck.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    ref = from_pretrained(FIXTURES / name / CASES[name][0], Gemma2ForCausalLM, dtype=torch.float32,
                          options=options(name))(ids)
    ref = getattr(ref, "logits", ref)
    for d in (tmp_path, FIXTURES / name / "hf"):  # converted, and the model the fixture was made from
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
        with torch.no_grad():
            assert_equal(hf(ids).logits, ref, f"logits, transformers on {d.name}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_apply_like_the_flax_einsums(name):
    """google-deepmind/gemma's einsums on the stored kernels equal F.linear with the converted weights."""
    ck = open_fixture(name)
    _, arrays, d = read_arrays(FIXTURES / name / CASES[name][0])
    w = {k: a.read().float() for k, a in arrays.items() if "layer_1/" in k}
    hf = {k: t.load().float() for k, t in ck.tensors.items() if ".layers.1." in k}
    lin = torch.nn.functional.linear
    x = torch.randn(3, d.hidden, generator=torch.Generator().manual_seed(1))
    enc = torch.randn(3, d.num_heads, d.head_dim, generator=torch.Generator().manual_seed(2))
    f, p = "transformer/layer_1/", "model.layers.1."
    if d.fused_qkv:
        q, k, v = torch.einsum("TD,SNDH->STNH", x, w[f + "attn/qkv_einsum.w"])
    else:
        q = torch.einsum("TD,NDH->TNH", x, w[f + "attn/q_einsum.w"])
        k, v = torch.einsum("SD,CKDH->CSKH", x, w[f + "attn/kv_einsum.w"])
    for got, proj in ((q, "q"), (k, "k"), (v, "v")):
        torch.testing.assert_close(got.reshape(3, -1), lin(x, hf[f"{p}self_attn.{proj}_proj.weight"]))
    torch.testing.assert_close(torch.einsum("TNH,NHD->TD", enc, w[f + "attn/attn_vec_einsum.w"]),
                               lin(enc.reshape(3, -1), hf[p + "self_attn.o_proj.weight"]))
    eq = "TF,NHF->TNH" if d.gating_transposed else "TF,NFH->TNH"
    gate = torch.einsum(eq, x, w[f + "mlp/gating_einsum.w"])
    torch.testing.assert_close(gate[:, 0], lin(x, hf[p + "mlp.gate_proj.weight"]))
    torch.testing.assert_close(gate[:, 1], lin(x, hf[p + "mlp.up_proj.weight"]))
    torch.testing.assert_close(torch.einsum("TH,HF->TF", gate[:, 0], w[f + "mlp/linear.w"]),
                               lin(gate[:, 0], hf[p + "mlp.down_proj.weight"]))


def test_padded_embedding_is_cut_to_the_tokenizer_vocabulary():
    ck = open_checkpoint(FIXTURES / "gemma2_27b_layout" / "kaggle", options=options("gemma2_27b_layout"))
    assert ck.config.vocab_size == 448 and ck.metadata["embedding_rows"] == "512"
    assert ck.metadata["vocab_from"].startswith("tokenizer") and ck.metadata["gating_einsum"] == "[2, I, H]"


def test_conversion_never_imports_jax(tmp_path):
    code = f"""
import json, sys
from pathlib import Path
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
p = Path({str(FIXTURES / "gemma2_27b_layout" / "kaggle")!r})
ck = open_checkpoint(p, options=ShapeOptions(query_pre_attn_scalar=4))
write_hf_dir(Path({str(tmp_path)!r}), ck.config, list(ck.tensors.items()), tokenizer=ck.tokenizer)
from_pretrained(p, Gemma2ForCausalLM, options=ShapeOptions(query_pre_attn_scalar=4))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "orbax"))
print(json.dumps({{"bad": bad, "tensorstore": "tensorstore" in sys.modules}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"bad": [], "tensorstore": True}, got
    assert (tmp_path / "model.safetensors").is_file()


# ---- config inference and the mapping's pure parts -----------------------------------------------

def flax_dims(cfg: Gemma2Config, rows: int = fm.PADDED_ROWS, transposed: bool = True) -> fm.FlaxDims:
    return fm.FlaxDims(rows, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                       cfg.num_key_value_heads, cfg.head_dim, transposed, False)


@pytest.mark.parametrize("variant,scalar", [("2b", 256), ("9b", 256), ("27b", 144)])
def test_published_sizes_get_published_config(variant, scalar):
    cfg = PRESETS[variant]
    vocab, _ = fm.resolve_vocab(fm.PADDED_ROWS, None, None, None, Path("x"))
    got, how = fm.infer_flax_config(flax_dims(cfg), vocab, ShapeOptions(), Path("x"))
    assert vocab == 256000 and got == cfg and got.query_pre_attn_scalar == scalar and variant in how


def test_unpublished_shapes_need_the_query_scale():
    d = dataclasses.replace(flax_dims(PRESETS["2b"], rows=512), layers=3)
    with pytest.raises(ConfigError, match="--query-pre-attn-scalar is required"):
        fm.infer_flax_config(d, 512, ShapeOptions(), Path("x"))
    cfg, how = fm.infer_flax_config(d, 512, ShapeOptions(query_pre_attn_scalar=256), Path("x"))
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.query_pre_attn_scalar)
    assert heads == (8, 4, 256, 256)
    assert how == "shapes + --query-pre-attn-scalar 256"


def test_config_contradicting_the_shapes_is_refused():
    cfg = PRESETS["9b"]
    with pytest.raises(ConfigError, match=r"num_attention_heads 8 \(the arrays have 16\)"):
        fm.infer_flax_config(flax_dims(cfg), 256000, ShapeOptions(config=cfg.replace(num_attention_heads=8,
                                                                                    num_key_value_heads=4,
                                                                                    head_dim=512)), Path("x"))


def test_gating_orientation_is_read_from_the_shape():
    assert fm.gating_transposed((2, 96, 32), 32, 96, Path("x")) is True    # [2, I, H] (9B/27B)
    assert fm.gating_transposed((2, 32, 96), 32, 96, Path("x")) is False   # [2, H, I] (2B)
    with pytest.raises(TensorMismatchError, match=r"expected \[2, 96, 32\] or \[2, 32, 96\] .*, got \[2, 32, 95\]"):
        fm.gating_transposed((2, 32, 95), 32, 96, Path("x"))
    with pytest.raises(ConfigError, match="cannot be told"):
        fm.gating_transposed((2, 32, 32), 32, 32, Path("x"))


def test_transforms_against_index_formulas():
    n, h, d, k = 3, 5, 4, 2
    q = torch.randn(n, h, d)
    rows = fm.heads_to_rows(q, None)                          # [N·D, H]
    assert rows[1 * d + 2, 3] == q[1, 3, 2]
    o = torch.randn(n, d, h)
    assert fm.attn_vec_to_o_proj(o, None)[3, 2 * d + 1] == o[2, 1, 3]  # [H, N·D]
    kv = fm.heads_to_rows(torch.randn(k, h, d)[:1], None)     # K = 1: still a contiguous copy
    assert kv.is_contiguous()


def test_vocabulary_resolution():
    where = Path("x")
    assert fm.resolve_vocab(512, None, None, None, where) == (512, "embedding rows")
    assert fm.resolve_vocab(512, 448, 500, None, where)[0] == 448                  # a config wins
    assert fm.resolve_vocab(512, None, 500, Path("t.model"), where)[0] == 500
    with pytest.raises(ConfigError, match="vocabulary of 600, but .* only 512 rows"):
        fm.resolve_vocab(512, None, 600, Path("t.model"), where)


def test_nested_and_released_trees_name_arrays_alike():
    assert fm.array_name(("transformer/layer_0/mlp/linear", "w")) == "transformer/layer_0/mlp/linear.w"
    assert fm.array_name(("layer_0", "mlp", "linear")) == "transformer/layer_0/mlp/linear.w"
    assert fm.array_name(("layer_0", "attn", "q_einsum", "w")) == "transformer/layer_0/attn/q_einsum.w"
    assert fm.array_name(("embedder", "input_embedding")) == fm.EMBED


# ---- damaged checkpoints: one clear error ------------------------------------------------------

@pytest.fixture
def kaggle_copy(tmp_path) -> Path:
    dst = tmp_path / "kaggle"
    shutil.copytree(FIXTURES / "gemma2_2b_layout" / "kaggle", dst)
    return dst


def fail(path: Path, error: type[ConversionError] = ConversionError, name: str = "gemma2_2b_layout") -> str:
    """The one-line message of opening and reading everything."""
    with pytest.raises(error) as e:
        ck = open_fixture(name, path)
        for t in ck.tensors.values():
            t.load()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def edit_metadata(ckpt: Path, fn) -> None:
    meta = json.loads((ckpt / "_METADATA").read_text())
    fn(meta["tree_metadata"])
    (ckpt / "_METADATA").write_text(json.dumps(meta))


def test_missing_metadata(kaggle_copy):
    (kaggle_copy / "gemma2-tiny" / "_METADATA").unlink()
    msg = fail(kaggle_copy, FormatError)
    assert msg.startswith(str(kaggle_copy / "gemma2-tiny" / "_METADATA")) and "missing" in msg


def test_damaged_metadata_json(kaggle_copy):
    f = kaggle_copy / "gemma2-tiny" / "_METADATA"
    f.write_text(f.read_text()[:100])
    assert "_METADATA: not valid JSON" in fail(kaggle_copy, FormatError)


def test_metadata_missing_a_leaf_lists_it(kaggle_copy):
    edit_metadata(kaggle_copy / "gemma2-tiny", lambda t: t.pop("('transformer/layer_1/mlp/linear', 'w')"))
    msg = fail(kaggle_copy, TensorMismatchError)
    assert "missing 1 arrays: transformer/layer_1/mlp/linear.w" in msg and "_METADATA" in msg


def test_unknown_leaves_are_listed(kaggle_copy):
    def add(tree):
        for leaf in ("transformer/layer_0/attn/_key_norm", "transformer/layer_1/attn/_query_norm"):
            keys = [{"key": leaf, "key_type": 2}, {"key": "scale", "key_type": 2}]
            tree[str((leaf, "scale"))] = {"key_metadata": keys, "value_metadata": {"value_type": "jax.Array"}}
    edit_metadata(kaggle_copy / "gemma2-tiny", add)
    msg = fail(kaggle_copy, TensorMismatchError)
    assert ("unexpected 2 arrays: transformer/layer_0/attn/_key_norm.scale, "
            "transformer/layer_1/attn/_query_norm.scale") in msg


def test_missing_array_data(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "mha_nested_zarr" / "ckpt", ckpt)
    shutil.rmtree(ckpt / "layer_1.mlp.linear")
    msg = fail(ckpt, FormatError, "mha_nested_zarr")
    assert msg.startswith(str(ckpt)) and "1 array(s) listed in _METADATA are missing" in msg
    assert "transformer/layer_1/mlp/linear.w" in msg


def test_wrong_shape_is_named(kaggle_copy):
    """Header, _METADATA and data agree on a shape the other arrays contradict."""
    import numpy as np
    import tensorstore as ts

    ckpt = kaggle_copy / "gemma2-tiny"
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": ckpt.resolve().as_uri() + "/",
                                          "path": "transformer/layer_1/attn/q_einsum.w/"}}
    arr = ts.open(spec, create=True, delete_existing=True, dtype=ts.bfloat16, shape=[2, 16, 10]).result()
    arr.write(np.zeros((2, 16, 10), dtype=ts.bfloat16.numpy_dtype)).result()
    orbax_set_write_shape(ckpt, ("transformer/layer_1/attn/q_einsum", "w"), [2, 16, 10])
    msg = fail_at_open(kaggle_copy, TensorMismatchError)
    assert "transformer/layer_1/attn/q_einsum.w: expected [2, 16, 12], got [2, 16, 10]" in msg
    assert msg.startswith(str(ckpt))


# ---- lying zarr headers: one FormatError naming the array when the checkpoint is opened ------------

LINEAR = "transformer/layer_0/mlp/linear.w"  # [40, 16] bfloat16 in both fixtures, one chunk


def fail_at_open(path: Path, error: type[ConversionError] = FormatError, name: str = "gemma2_2b_layout") -> str:
    """The one-line message of opening (no array is read)."""
    with pytest.raises(error) as e:
        open_fixture(name, path)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_zarr_shape_contradicting_metadata(kaggle_copy):
    orbax_set_zarray(kaggle_copy / "gemma2-tiny", LINEAR, shape=[40, 8])
    msg = fail_at_open(kaggle_copy)
    assert msg.startswith(str(kaggle_copy / "gemma2-tiny" / "manifest.ocdbt"))
    assert (f"array {LINEAR}: its zarr header says shape [40, 8], but _METADATA says [40, 16] was written; the "
            "header and the tree disagree") in msg


def test_zarr_dtype_contradicting_the_data(kaggle_copy):
    orbax_set_zarray(kaggle_copy / "gemma2-tiny", LINEAR, dtype="<f4")
    assert (f"array {LINEAR}: chunk 0.0 holds 1280 bytes, but its zarr header (<f4, chunks [40, 16]) needs 2560; "
            "the header disagrees with the data") in fail_at_open(kaggle_copy)


def test_zarr_chunks_contradicting_the_data(kaggle_copy):
    orbax_set_zarray(kaggle_copy / "gemma2-tiny", LINEAR, chunks=[20, 16])
    assert f"array {LINEAR}: 1 of 2 chunks missing (1.0); its zarr header (shape [40, 16], chunks [20, 16])" in \
        fail_at_open(kaggle_copy)


def test_missing_chunk_is_not_read_as_zeros(tmp_path):
    """With fill_value null tensorstore reads a missing chunk as zeros; the reader refuses it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "mha_nested_zarr" / "ckpt", ckpt)
    (ckpt / "layer_0.mlp.linear" / "0.0").unlink()
    msg = fail_at_open(ckpt, name="mha_nested_zarr")
    assert msg.startswith(str(ckpt)) and f"array {LINEAR}: 1 of 1 chunks missing (0.0)" in msg


def test_chunk_that_is_not_zstd(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "mha_nested_zarr" / "ckpt", ckpt)
    (ckpt / "layer_0.mlp.linear" / "0.0").write_bytes(bytes(1062))
    assert f"array {LINEAR}: chunk 0.0 is not a zstd frame" in fail_at_open(ckpt, name="mha_nested_zarr")


def test_truncated_data_file_fails_at_open(kaggle_copy):
    data = max((kaggle_copy / "gemma2-tiny" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    msg = fail_at_open(kaggle_copy)
    assert re.search(r"cannot read array transformer/\S+: chunk [\d.]+ \(.*\); the data is damaged or incomplete",
                     msg), msg


def test_zstd_frame_content_size():
    from gemma2_convert.formats.zarr_check import zstd_content_size

    magic = b"\x28\xb5\x2f\xfd"
    head = (FIXTURES / "mha_nested_zarr" / "ckpt" / "layer_0.mlp.linear" / "0.0").read_bytes()[:18]
    assert zstd_content_size(head) == 40 * 16 * 2                                   # 2-byte field, + 256
    assert zstd_content_size(magic + bytes([0x20, 200])) == 200                     # single segment, 1 byte
    assert zstd_content_size(magic + bytes([0xA0]) + (70000).to_bytes(4, "little")) == 70000
    assert zstd_content_size(magic + bytes([0x00, 0x50])) is None                   # size not stated


def test_missing_store_file(kaggle_copy):
    data = max((kaggle_copy / "gemma2-tiny" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.unlink()
    msg = fail(kaggle_copy, FormatError)
    assert msg.startswith(str(kaggle_copy / "gemma2-tiny" / "manifest.ocdbt"))
    assert "cannot read array transformer/" in msg and "damaged or incomplete" in msg


def test_unmerged_per_process_store_is_read(kaggle_copy):
    ckpt = kaggle_copy / "gemma2-tiny"
    (ckpt / "manifest.ocdbt").unlink()
    shutil.rmtree(ckpt / "d")
    ck = open_fixture("gemma2_2b_layout", kaggle_copy)
    assert_equal(ck.tensors["model.norm.weight"].load(), source("gemma2_2b_layout")["model.norm.weight"], "norm")


def test_two_checkpoints_in_one_archive(kaggle_copy):
    shutil.copytree(kaggle_copy / "gemma2-tiny", kaggle_copy / "gemma2-tiny-it")
    with pytest.raises(FormatError, match=r"found 2 \(gemma2-tiny, gemma2-tiny-it\)"):
        open_checkpoint(kaggle_copy, format="orbax", options=options("gemma2_2b_layout"))


# ---- commands ----------------------------------------------------------------------------------

def test_orig_to_hf_command_converts_orbax(tmp_path):
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    r = CliRunner().invoke(cli, ["orig-to-hf", str(FIXTURES / "gemma2_27b_layout" / "kaggle"), str(tmp_path / "hf"),
                                 "--query-pre-attn-scalar", "4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["verify"]["passed"] and res["verify"]["max_abs_logits"] == 0
    assert "tokenizer.json" in res["files"]


def test_verify_command_compares_orbax_with_its_source():
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    d = FIXTURES / "gemma2_2b_layout"
    r = CliRunner().invoke(cli, ["verify", str(d / "kaggle"), str(d / "hf"), "--config", str(d / "hf" / "config.json"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["tensors_equal"] == rep["tensors_total"] == 24 and rep["max_abs_logits"] == 0
