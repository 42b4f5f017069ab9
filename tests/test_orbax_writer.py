"""The jax-free Orbax writer: our reader reads back exactly what it was given (both gating layouts, fused
and separate q/kv, padded embeddings), the layout is byte-for-byte the metadata real Orbax wrote for the
committed fixture, real Orbax restores it (when jax and orbax are installed), it never imports jax, and
it writes atomically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorstore", reason="the Orbax writer needs tensorstore (pip install 'gemma2-convert[flax]')")

from gemma2_convert.core.errors import OutputExistsError, TensorMismatchError  # noqa: E402
from gemma2_convert.formats import flax_map as fm  # noqa: E402
from gemma2_convert.formats import open_checkpoint  # noqa: E402
from gemma2_convert.formats.orbax import read_arrays  # noqa: E402
from gemma2_convert.formats.orbax_writer import TARGET_FILE_BYTES, chunk_shape, write_orbax  # noqa: E402
from gemma2_convert.formats.orig_config import ShapeOptions  # noqa: E402
from gemma2_convert.core.lazy import LazyTensor  # noqa: E402
from gemma2_convert.formats.synthetic import random_tensors  # noqa: E402
from reference.config import Gemma2Config  # noqa: E402
from tests.test_orbax import FIXTURES, assert_equal  # noqa: E402

GQA = Gemma2Config(vocab_size=96, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
MHA = GQA.replace(num_key_value_heads=4)
ROWS = 128
"""Embedding rows written for the 96-token vocabulary: padded, as the released 256000 → 256128."""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True], ids=["gating_2HI", "gating_2IH"])
@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_reader_reads_back_the_input(tmp_path, cfg, transposed, dtype):
    src = random_tensors(cfg, 0, dtype)
    out = write_orbax(tmp_path / "ckpt", cfg, src, rows=ROWS, gating_transposed=transposed)
    ck = open_checkpoint(out, options=ShapeOptions(config=cfg))
    assert ck.format == "orbax" and sorted(ck.tensors) == sorted(src)
    for k, t in src.items():
        assert_equal(ck.tensors[k].load(), t.load(), k)
    assert ck.metadata["gating_einsum"] == ("[2, I, H]" if transposed else "[2, H, I]")
    _, arrays, d = read_arrays(out)
    assert d.fused_qkv == (cfg is MHA) and d.gating_transposed == transposed and d.rows == ROWS
    emb = arrays[fm.EMBED].read()
    assert emb.dtype == dtype and not emb[cfg.vocab_size:].any(), "padding rows must be zero"


def fixture_model(name: str = "gemma2_2b_layout") -> tuple[Gemma2Config, dict[str, LazyTensor]]:
    from safetensors.torch import load_file

    sd = load_file(FIXTURES / name / "hf" / "model.safetensors")
    return (Gemma2Config.from_json_file(FIXTURES / name / "hf" / "config.json"),
            {k: LazyTensor.of(v) for k, v in sd.items()})


def test_layout_matches_what_orbax_wrote(tmp_path):
    """The fixture's model, written again: _METADATA, _sharding and every zarr header equal what
    orbax.checkpoint wrote for it, and so do the arrays (but the fixture's random padding rows)."""
    import tensorstore as ts

    cfg, src = fixture_model()
    ours = write_orbax(tmp_path / "ckpt", cfg, src, rows=512)
    theirs = FIXTURES / "gemma2_2b_layout" / "kaggle" / "gemma2-tiny"
    for f in ("_METADATA", "_sharding"):
        assert json.loads((ours / f).read_text()) == json.loads((theirs / f).read_text()), f
    assert json.loads((ours / "_CHECKPOINT_METADATA").read_text()).keys() == \
        json.loads((theirs / "_CHECKPOINT_METADATA").read_text()).keys()
    stores = [ts.KvStore.open({"driver": "ocdbt", "base": d.resolve().as_uri() + "/"}).result() for d in (ours, theirs)]
    headers = [{k: kv[k] for k in kv.list().result() if k.endswith(b".zarray")} for kv in stores]
    assert len(headers[0]) == 20 and headers[0] == headers[1]
    a, b = read_arrays(ours)[1], read_arrays(theirs)[1]
    for name in a:
        rows = slice(0, cfg.vocab_size) if name == fm.EMBED else slice(None)
        assert_equal(a[name].read()[rows], b[name].read()[rows], name)


def test_padded_rows_are_cut_to_the_tokenizer_vocabulary(tmp_path):
    cfg, src = fixture_model()
    write_orbax(tmp_path / "kaggle" / "gemma2-tiny", cfg, src, rows=512)
    shutil.copy(FIXTURES / "gemma2_2b_layout" / "kaggle" / "tokenizer.model", tmp_path / "kaggle")
    ck = open_checkpoint(tmp_path / "kaggle", options=ShapeOptions(query_pre_attn_scalar=12))
    assert ck.config.vocab_size == 448 and ck.metadata["embedding_rows"] == "512"
    assert ck.metadata["vocab_from"].startswith("tokenizer")
    for k, t in src.items():
        assert_equal(ck.tensors[k].load(), t.load(), k)


def test_real_orbax_restores_the_output(tmp_path):
    """A development cross-check (jax and orbax-checkpoint are not in the test extra): orbax.checkpoint
    restores the writer's output, and google-deepmind/gemma's einsums on it equal the HF linear maps."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("jax", reason="dev-only cross-check: pip install -e '.[dev-orbax]'")
    ocp = pytest.importorskip("orbax.checkpoint", reason="dev-only cross-check: pip install -e '.[dev-orbax]'")
    src = {k: t.load() for k, t in random_tensors(GQA, 1, torch.bfloat16).items()}
    out = write_orbax(tmp_path / "ckpt", GQA, {k: LazyTensor.of(v) for k, v in src.items()}, rows=ROWS,
                      gating_transposed=True)
    with pytest.warns(UserWarning, match="Sharding info not provided"):
        tree = ocp.PyTreeCheckpointer().restore(out.resolve())
    got = {f"{m}.{leaf}": torch.from_numpy(np.array(v).view(np.uint16)).view(torch.bfloat16)
           for m, leaves in tree.items() for leaf, v in leaves.items()}
    arrays = read_arrays(out)[1]
    assert sorted(got) == sorted(arrays)
    for name, a in arrays.items():
        assert_equal(got[name], a.read(), f"orbax vs our reader: {name}")
    w = {k: v.float() for k, v in got.items()}
    x = torch.randn(3, GQA.hidden_size, generator=torch.Generator().manual_seed(0))
    f, p, lin = "transformer/layer_1/", "model.layers.1.", torch.nn.functional.linear
    k, v = torch.einsum("SD,CKDH->CSKH", x, w[f + "attn/kv_einsum.w"])
    checks = {"q": torch.einsum("TD,NDH->TNH", x, w[f + "attn/q_einsum.w"]), "k": k, "v": v}
    for proj, y in checks.items():
        torch.testing.assert_close(y.reshape(3, -1), lin(x, src[f"{p}self_attn.{proj}_proj.weight"].float()))
    gate = torch.einsum("TF,NHF->TNH", x, w[f + "mlp/gating_einsum.w"])
    torch.testing.assert_close(gate[:, 1], lin(x, src[p + "mlp.up_proj.weight"].float()))
    assert torch.equal(got[fm.EMBED][:GQA.vocab_size], src["model.embed_tokens.weight"])


def test_writing_never_imports_jax(tmp_path):
    code = f"""
import json, sys
from pathlib import Path
from gemma2_convert.formats.orbax_writer import write_orbax
from gemma2_convert.formats.synthetic import random_tensors
from reference.config import Gemma2Config
cfg = Gemma2Config.preset("tiny")
write_orbax(Path({str(tmp_path / "ckpt")!r}), cfg, random_tensors(cfg), rows=576)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "orbax"))
print(json.dumps({{"bad": bad, "tensorstore": "tensorstore" in sys.modules}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"bad": [], "tensorstore": True}
    assert (tmp_path / "ckpt" / "manifest.ocdbt").is_file()


def test_refuses_an_existing_directory(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="already exists"):
        write_orbax(out, GQA, random_tensors(GQA))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_nothing(tmp_path):
    src = dict(random_tensors(GQA))
    name = "model.layers.1.mlp.down_proj.weight"

    def broken() -> torch.Tensor:
        raise OSError("disk went away")

    src[name] = LazyTensor(src[name].shape, src[name].dtype, broken)
    with pytest.raises(OSError, match="disk went away"):
        write_orbax(tmp_path / "ckpt", GQA, src)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_are_refused(tmp_path):
    src = dict(random_tensors(GQA))
    with pytest.raises(TensorMismatchError, match="96 embedding rows|cannot hold the vocabulary of 96"):
        write_orbax(tmp_path / "a", GQA, src, rows=64)
    src["model.norm.weight"] = LazyTensor.of(torch.zeros(15, dtype=torch.bfloat16))
    with pytest.raises(TensorMismatchError, match=r"model\.norm\.weight: expected \[16\], got \[15\]"):
        write_orbax(tmp_path / "b", GQA, src)
    src["model.norm.weight"] = LazyTensor.of(torch.zeros(16))
    with pytest.raises(TensorMismatchError, match="one dtype of bfloat16, float16, float32, got bfloat16, float32"):
        write_orbax(tmp_path / "c", GQA, src)
    del src["model.norm.weight"]
    with pytest.raises(TensorMismatchError, match=r"missing 1 tensors: model\.norm\.weight"):
        write_orbax(tmp_path / "d", GQA, src)
    assert list(tmp_path.iterdir()) == []


def test_chunks_stay_below_the_target_file_size():
    assert chunk_shape((40, 16), 2) == (40, 16)
    rows, h = 256128, 4608                                   # the released 27B embedding: 2.36 GB in bfloat16
    n, w = chunk_shape((rows, h), 2)
    assert w == h and rows % n == 0 and n * h * 2 <= TARGET_FILE_BYTES and (rows // n) == 2
