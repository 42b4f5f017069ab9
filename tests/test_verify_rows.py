"""MLX and compressed-tensors quantized weights decode by rows (``LazyTensor.rows``) bit for bit as their
``load`` does, so ``verify`` looks up a prompt's embedding rows and streams the tied head by blocks instead of
decoding a 256k-row quantized embedding whole (at 9B/27B: 3.7/4.7 GB in float32), as it already does for GGUF
(tests/test_verify_streaming.py). An unmerged LoRA on the tied head streams the head too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma2_convert.pipeline.compare as compare_mod
import gemma2_convert.pipeline.lockstep as lockstep_mod
import reference.model as model_mod
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import SILENT
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.hf_quantized import dequantizing_tensors
from gemma2_convert.formats.mlx_reader import mlx_tensor
from gemma2_convert.pipeline.adapters import open_spec
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from gemma2_convert.pipeline.verify import auto_tolerance, reference_model, verify
from quant.compressed_tensors import compress_weight, quantization_config
from quant.mlx_affine import MLX_BITS, pack_affine
from quant.qparams import choose_qparams, quantize
from quant.spec import QuantSpec
from reference.weights import WeightStore
from tests.adapter_helpers import logits_of, make_adapter
from tests.conftest import with_slow
from tests.test_adapters import assert_close
from tests.test_reference_streaming import LargestFloat32

MODEL = Path(__file__).resolve().parent / "fixtures" / "gemma2-tiny-trained"  # vocab 2048, hidden 256
SPANS = ((0, 1), (7, 8), (3, 19), (32, 48))  # the last runs past the end, as a head block may
EMBED = "model.embed_tokens"


def _whole_decode() -> torch.Tensor:
    raise AssertionError("the quantized embedding was decoded whole")


def _weight(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(40, 256, generator=torch.Generator().manual_seed(1)).to(dtype)


def _assert_rows_equal_load(lt: LazyTensor, label: str) -> None:
    assert lt.rows is not None, f"{label}: no rows decoder"
    whole = lt.load()
    for start, stop in SPANS:
        got = lt.rows(start, stop)
        assert got.dtype == whole.dtype and torch.equal(got, whole[start:stop]), (label, start, stop)


@pytest.mark.parametrize("bits", MLX_BITS)
@pytest.mark.parametrize("group", [32, 64])
def test_mlx_rows_decode_as_its_load(bits, group):
    w = _weight()
    scale, zero = choose_qparams(w.float(), bits, group, symmetric=False)
    words, scales, biases = pack_affine(quantize(w.float(), scale, zero, bits), scale.to(w.dtype), zero, bits)
    parts = {f"{EMBED}.weight": words, f"{EMBED}.scales": scales, f"{EMBED}.biases": biases}
    lt = mlx_tensor(EMBED, {k: LazyTensor.of(v) for k, v in parts.items()}, bits, group, Path("mlx"))
    _assert_rows_equal_load(lt, f"mlx {bits}-bit g{group}")


@pytest.mark.parametrize("bits,group,symmetric",
                         [(4, 128, True), (8, None, True), (4, 32, False), (8, 64, False)])
def test_compressed_tensors_rows_decode_as_its_load(bits, group, symmetric):
    prefix = "model.layers.0.mlp.down_proj"
    spec = QuantSpec(bits, group, symmetric)
    packed = compress_weight(prefix, _weight(), spec)
    tensors = dequantizing_tensors({k: LazyTensor.of(v) for k, v in packed.items()},
                                   quantization_config({prefix: spec}), Path("ct"))
    _assert_rows_equal_load(tensors[f"{prefix}.weight"], f"compressed-tensors {spec}")


@pytest.fixture(scope="module")
def mlx_int4(tmp_path_factory) -> Path:
    """The trained fixture in mlx-lm's layout, its tied embedding quantized too (4-bit, group 64)."""
    out = tmp_path_factory.mktemp("mlx") / "mlx-int4"
    opts = QuantizeOptions(format="mlx", embedding="int4", method="rtn", verify=False)
    quantize_checkpoint(MODEL, out, opts)
    return out


@pytest.fixture(scope="module")
def ct_int4(tmp_path_factory) -> Path:
    """The trained fixture in compressed-tensors int4 g128, then its embedding packed as well: this tool keeps
    a tied embedding dense, but the reader takes any module with ``weight_packed`` under the ``Linear``
    group."""
    out = tmp_path_factory.mktemp("ct") / "ct-int4"
    quantize_checkpoint(MODEL, out, QuantizeOptions(format="hf", method="rtn", verify=False))
    sd = load_file(out / "model.safetensors")
    spec = QuantSpec(4, 128, True)
    sd.update(compress_weight(EMBED, sd.pop(f"{EMBED}.weight").float(), spec))
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("which", with_slow(["mlx_int4", "ct_int4"], "mlx_int4"))  # the MLX one is the slower
def test_verify_never_decodes_a_quantized_embedding_whole(which, request, monkeypatch):
    """With budgets scaled down to the tiny model (the embedding does not fit HOLD_BUDGET, as at 2B–27B),
    verify reads the quantized embedding by rows for the lookup, the comparison and the head; its report
    equals the one that holds the decoded embedding."""
    out = request.getfixturevalue(which)
    name = f"{EMBED}.weight"
    assert open_checkpoint(out).tensors[name].packed
    tol = auto_tolerance(open_checkpoint(MODEL), open_checkpoint(out))
    held = verify(MODEL, out, tolerance=tol, n_tokens=24, resident=False)
    monkeypatch.setattr(lockstep_mod, "HOLD_BUDGET", 1 << 20)  # the decoded embedding pair is 3 MB
    monkeypatch.setattr(model_mod, "HEAD_CHUNK_ROWS", 256)
    monkeypatch.setattr(compare_mod, "COMPARE_ELEMENTS", 256 * 256)
    b = open_checkpoint(out)
    b.tensors[name] = dataclasses.replace(b.tensors[name], thunk=_whole_decode)  # rows only from here
    with LargestFloat32() as probe:
        streamed = verify(MODEL, b, tolerance=tol, n_tokens=24, resident=False)
    embed = 2048 * 256
    assert probe.largest < embed // 2, f"a float32 tensor of {probe.largest} elements (embedding: {embed})"
    assert held.tensors_equal < held.tensors_total and held.max_abs_logits > 0  # quantized: a real comparison
    s, h = streamed.to_json(), held.to_json()
    for d, e in zip(s.pop("worst_tensors"), h.pop("worst_tensors")):  # float64 sums over other blocks
        assert d.pop("sqnr_db") == pytest.approx(e.pop("sqnr_db"), rel=1e-9) and d == e
    assert s == h


def test_an_unmerged_head_lora_streams_the_head(tmp_path, monkeypatch):
    """A plain LoRA update on the (tied) head runs beside the streamed head, from its output alone: the frozen
    head is never fetched whole (a [V, H] cast: 3.7 GB at 9B in float32); the logits are still peft's."""
    pm, base, adapter = make_adapter(tmp_path, "lm_head")
    ck = open_spec(f"{base}+{adapter}", None, SILENT)
    assert ck.adapters.get("lm_head.weight")
    real = WeightStore.get

    def get(self: WeightStore, name: str) -> torch.Tensor:
        assert name != f"{EMBED}.weight", "the whole head was fetched"
        return real(self, name)

    monkeypatch.setattr(WeightStore, "get", get)
    monkeypatch.setattr(model_mod, "HEAD_CHUNK_ROWS", 64)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    assert_close(reference_model(ck, torch.float32, False)(ids), logits_of(pm, ids), 1e-4)
