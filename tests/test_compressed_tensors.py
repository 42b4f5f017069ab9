"""compressed-tensors ``pack-quantized``: tensors bit-exact with the library, and transformers loads them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from gemma2_convert.core.errors import FormatError, UnsupportedError
from quant.compressed_tensors import (
    compress_weight,
    pack_quantized,
    quantization_config,
    read_compressed,
    spec_for_module,
)
from quant.methods import quantize_weight
from quant.policy import default_policy
from quant.qparams import dequantize
from quant.spec import QuantSpec
from reference.config import Gemma2Config
from tests.conftest import make_hf_model
from tests.test_quant_primitives import assert_equal

import compressed_tensors as ct
import transformers
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

# in_features 128 and 256 everywhere, so group 128 applies to every projection.
CFG = Gemma2Config(
    vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
    max_position_embeddings=64, torch_dtype="float32",
)
CT_ONLY_KEYS = ("version", "sparsity_config", "transform_config")


def ct_scheme(spec: QuantSpec, qconfig: dict):
    groups = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k not in CT_ONLY_KEYS})
    (scheme,) = groups.config_groups.values()
    return scheme


def random_weight(out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.05 + 0.01).to(dtype)


# ---- the tensors, against the library's own compressor ------------------------------------------------

LAYOUTS = [(4, 32, True), (4, 128, False), (8, None, True), (8, 64, False), (4, None, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", LAYOUTS)
def test_pack_quantized_equals_library_compress(bits: int, group_size: int | None, symmetric: bool) -> None:
    spec = QuantSpec(bits, group_size, symmetric, "rtn")
    w = random_weight(40, 256, torch.float32)                                  # 40 rows: zp words pad
    q, scale, zero = quantize_weight(w, spec)
    ours = pack_quantized("m", q, scale, zero, spec)
    qc = quantization_config({"m": spec})
    state = {"weight": w, "weight_scale": scale}
    if zero is not None:
        state["weight_zero_point"] = zero
    theirs = PackedQuantizationCompressor.compress(state, ct_scheme(spec, qc))
    assert sorted(ours) == sorted(f"m.{k}" for k in theirs)
    for k, v in theirs.items():
        assert_equal(ours[f"m.{k}"], v, f"m.{k} vs PackedQuantizationCompressor.compress")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,symmetric", LAYOUTS)
def test_read_compressed_equals_library_decompress(bits, group_size, symmetric, dtype) -> None:
    spec = QuantSpec(bits, group_size, symmetric, "mse")
    w = random_weight(40, 256, dtype, seed=1)
    q, scale, zero = quantize_weight(w, spec)
    tensors = pack_quantized("layer.proj", q, scale, zero, spec)
    qc = quantization_config({"layer.proj": spec})
    mine = read_compressed(tensors, qc)
    assert mine.dtype == dtype
    assert_equal(mine, dequantize(q, scale, zero), "read_compressed vs dequantize")
    local = {k.removeprefix("layer.proj."): v for k, v in tensors.items()}
    theirs = PackedQuantizationCompressor.decompress(local, ct_scheme(spec, qc))["weight"]
    assert_equal(mine, theirs, "read_compressed vs PackedQuantizationCompressor.decompress")


def test_tensor_names_dtypes_shapes() -> None:
    p = "model.layers.0.mlp.down_proj"
    t = compress_weight(p, random_weight(40, 256, torch.bfloat16), QuantSpec(4, 64, False, "hqq"))
    got = {k: (v.dtype, list(v.shape)) for k, v in t.items()}
    assert got == {
        f"{p}.weight_packed": (torch.int32, [40, 32]),
        f"{p}.weight_scale": (torch.bfloat16, [40, 4]),
        f"{p}.weight_zero_point": (torch.int32, [5, 4]),
        f"{p}.weight_shape": (torch.int64, [2]),
    }
    assert t[f"{p}.weight_shape"].tolist() == [40, 256]


# ---- config.json -----------------------------------------------------------------------------------


def test_quantization_config_single_and_mixed() -> None:
    a, b = QuantSpec(4, 128, False, "gptq"), QuantSpec(8, None, True, "rtn")
    single = quantization_config({"x.q_proj": a, "x.k_proj": QuantSpec(4, 128, False, "mse"), "x.v_proj": None})
    assert single["config_groups"] == {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None, "format": None,
        "weights": {
            "num_bits": 4, "type": "int", "symmetric": False, "group_size": 128, "strategy": "group", "dynamic": False,
        },
    }}
    assert single["ignore"] == ["lm_head", "x.v_proj"] and single["format"] == "pack-quantized"
    assert single["quant_method"] == "compressed-tensors" and single["quantization_status"] == "compressed"
    parsed = QuantizationConfig.model_validate({k: v for k, v in single.items() if k not in CT_ONLY_KEYS})
    assert parsed.config_groups["group_0"].weights.strategy == "group"
    mixed = quantization_config({"x.q_proj": a, "x.o_proj": b, "x.k_proj": a})
    assert sorted(g["targets"][0] for g in mixed["config_groups"].values()) == ["x.k_proj", "x.o_proj"]
    assert spec_for_module(mixed, "x.k_proj") == QuantSpec(4, 128, False)
    assert spec_for_module(mixed, "x.o_proj") == QuantSpec(8, None, True)
    assert spec_for_module(mixed, "lm_head") is None and spec_for_module(single, "x.v_proj") is None
    # compressed-tensors' priority: exact name, then regex, then the class name
    layered = {**single, "config_groups": {
        "group_0": single["config_groups"]["group_0"],
        "group_1": {**mixed["config_groups"]["group_1"], "targets": ["x.o_proj"]},
        "group_2": {**mixed["config_groups"]["group_1"], "targets": ["re:.*k_proj$"]},
    }}
    assert spec_for_module(layered, "x.o_proj") == spec_for_module(layered, "x.k_proj") == QuantSpec(8, None, True)
    assert spec_for_module(layered, "x.q_proj") == QuantSpec(4, 128, False)


def test_errors_name_the_problem() -> None:
    with pytest.raises(UnsupportedError, match="model.embed_tokens: the compressed-tensors output keeps"):
        quantization_config({"model.embed_tokens": QuantSpec(8, None)})
    spec = QuantSpec(4, 32, False)
    t = compress_weight("p", random_weight(16, 64, torch.float32), spec)
    qc = quantization_config({"p": spec})
    with pytest.raises(FormatError, match=r"p\.weight_zero_point is missing"):
        read_compressed({k: v for k, v in t.items() if "zero" not in k}, qc)
    msg = r"p\.weight_packed: expected torch\.int32\[16, 8\], got torch\.int64\[16, 8\]"
    with pytest.raises(FormatError, match=msg):
        read_compressed({**t, "p.weight_packed": t["p.weight_packed"].long()}, qc)
    with pytest.raises(UnsupportedError, match="only int group/channel"):
        fp8 = {"targets": ["Linear"], "weights": {"type": "float", "strategy": "tensor"}}
        spec_for_module({**qc, "config_groups": {"g": fp8}}, "p")


# ---- the real client: transformers + compressed-tensors load what we write ----------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = make_hf_model(CFG, seed=0)
    d = tmp_path_factory.mktemp("dense")
    model.save_pretrained(d)
    from safetensors.torch import load_file

    return d, load_file(d / "model.safetensors")


def write_quantized(dense, out: Path, pick) -> tuple[dict, dict[str, torch.Tensor], dict[str, QuantSpec]]:
    """Quantize every spec'd projection of the dense checkpoint into ``out``; returns (qconfig, tensors, specs)."""
    from safetensors.torch import save_file

    src, state = dense
    tensors, specs = {}, {}
    for name, t in state.items():
        spec = pick(name, tuple(t.shape))
        if spec is None:
            tensors[name] = t
            continue
        prefix = name.removesuffix(".weight")
        specs[prefix] = spec
        tensors.update(compress_weight(prefix, t, spec))
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc = quantization_config(specs)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return qc, tensors, specs


class _Warnings(logging.Handler):
    """Collects the warnings transformers logs (its load report among them)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_and_check(out: Path, qc: dict, tensors: dict, specs: dict, dense_state: dict, dequant: bool) -> None:
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequant else {}
    warned, hf_logger = _Warnings(), logging.getLogger("transformers")
    hf_logger.addHandler(warned)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, output_loading_info=True, **kw
        )
        ids = torch.arange(1, 25)[None]
        with torch.no_grad():
            logits = model(ids).logits                              # decompresses on the first forward
    finally:
        hf_logger.removeHandler(warned)
    assert not warned.messages, "transformers warned:\n" + "\n".join(warned.messages)
    bad_keys = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    problems = {k: v for k, v in info.items() if v and k in bad_keys}
    assert not problems, problems
    assert torch.isfinite(logits).all()
    loaded = model.state_dict()
    expected = dict(dense_state)
    for prefix in specs:
        mine = read_compressed({k: v for k, v in tensors.items() if k.startswith(prefix + ".")}, qc)
        assert_equal(loaded[f"{prefix}.weight"], mine, f"{prefix}.weight as transformers dequantized it")
        expected[f"{prefix}.weight"] = mine
    for name, t in dense_state.items():
        if name.removesuffix(".weight") not in specs:
            assert_equal(loaded[name], t, f"{name} (kept dense)")
    # Same architecture, same weights: the logits equal those of the original model with our decode.
    ref = make_hf_model(CFG, seed=0)
    ref.load_state_dict(expected, strict=False)                    # lm_head is tied to embed_tokens
    with torch.no_grad():
        assert_equal(logits, ref(ids).logits, "logits vs the original model with our dequantized weights")


def uniform(bits: int, group_size: int | None, symmetric: bool, method: str):
    def pick(name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        return default_policy(name, shape, bits=bits, group_size=group_size, symmetric=symmetric, method=method)
    return pick


CASES = {
    "int4-g32-sym": ((4, 32, True, "rtn"), (False, True)),
    "int4-g128-asym": ((4, 128, False, "mse"), (True,)),
    "int8-ch-sym": ((8, None, True, "hqq"), (False, True)),
}


# transformers warns that an explicit CompressedTensorsConfig(dequantize=True) overrides the load
# attributes of the checkpoint's config: that is the intent here, not a key problem.
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_pack_quantized(case: str, dense, tmp_path) -> None:
    args, modes = CASES[case]
    qc, tensors, specs = write_quantized(dense, tmp_path / case, uniform(*args))
    assert len(specs) == 7 * CFG.num_hidden_layers
    for dequant in modes:
        load_and_check(tmp_path / case, qc, tensors, specs, dense[1], dequant)


def test_transformers_loads_mixed_schemes(dense, tmp_path) -> None:
    def pick(name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        if "self_attn" in name and name.endswith("proj.weight"):
            return QuantSpec(8, None, True, "rtn")
        return uniform(4, 32, True, "mse")(name, shape)

    qc, tensors, specs = write_quantized(dense, tmp_path / "mixed", pick)
    assert len(qc["config_groups"]) == 2
    load_and_check(tmp_path / "mixed", qc, tensors, specs, dense[1], dequant=False)


@pytest.mark.xfail(
    strict=True, raises=RuntimeError,
    reason="compressed-tensors 0.20.0 builds the load-time layout on meta without packing the zero-point "
    "(PackedQuantizationCompressor.compress meta branch), so transformers' default path expects int8 [out, G] "
    "where every asymmetric pack-quantized checkpoint has int32 [out/8, G]; load with dequantize=True",
)
def test_transformers_default_path_asymmetric(dense, tmp_path) -> None:
    qc, tensors, specs = write_quantized(dense, tmp_path / "asym", uniform(4, 128, False, "rtn"))
    load_and_check(tmp_path / "asym", qc, tensors, specs, dense[1], dequant=False)
