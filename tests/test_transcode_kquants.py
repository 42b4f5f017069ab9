"""K-quant GGUFs (llama.cpp's Q4_K_M, Q5_K_M) as quantized input: their codes read without decoding
(``quant/gguf_kcodes.py``), decoded bit for bit as the K-quant decoders decode them, and moved — into MLX
4/5-bit groups of 32 (float32 scales and biases, as ggml computes them), into GGUF of the same type byte for
byte — or refused with the count of groups the target cannot hold (Q4_1, compressed-tensors), unless
--requantize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from gemma2_convert.formats.transcode_items import TranscodeError
from gemma2_convert.pipeline.convert import convert
from gemma2_convert.pipeline.load import from_pretrained
from gemma2_convert.pipeline.verify import verify
from quant.gguf_codec import dequantize_tensor, quantize_tensor
from quant.gguf_kcodes import K_TYPES, kquant_codes
from quant.gguf_kquants import unpack_k_scales
from quant.gguf_legacy import f16_from_bytes, split_bytes
from quant.qtensor import QuantTensor
from reference import Gemma2ForCausalLM
from reference.config import Gemma2Config
from tests.conftest import make_hf_model
from tests.downloads_helpers import llama_quantize
from tests.test_mlx import mlx_logits
from tests.test_transcode import all_equal, llama_cpp_logits

# rows of 256 and 512 columns: whole K-quant super-blocks, so llama-quantize keeps every matrix a K-quant
CFG = Gemma2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                   sliding_window=16, max_position_embeddings=256, torch_dtype="float32")
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q2_K": 84, "Q6_K": 210, "Q3_K": 110}
D_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q2_K": (80, 82), "Q6_K": (208,), "Q3_K": (108,)}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    x, y = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    bad = (x != y).nonzero()
    if bad.numel():
        i = tuple(bad[0])
        raise AssertionError(f"{len(bad)} differ, first at {list(i)}: {a[i]} vs {b[i]}")


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random bytes of a ``[rows, cols]`` ``qtype`` tensor, its fp16 super-scales random but finite."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows * cols // 256, BYTES[qtype]), dtype=torch.uint8, generator=g)
    for o in D_OFFSETS[qtype]:
        n = raw.shape[0]
        d = (torch.rand(n, generator=g) * 2 - 1) * 10.0 ** torch.randint(-6, 2, (n,), generator=g)
        raw[:, o:o + 2] = d.half().view(torch.uint8).reshape(-1, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", list(K_TYPES))
def test_kquant_codes_decode_as_the_kquant_decoder_bit_for_bit(qtype):
    """Random blocks (every code, scale and minimum pattern) and blocks of llama.cpp's quantizer: the
    QuantCodes' ``scale·u + bias`` / ``(u − 2^(b−1))·scale`` is the K-quant decoder's float32 output, bit for
    bit."""
    kind, bits, group = K_TYPES[qtype]
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    for raw in (random_blocks(qtype, 16, 512, seed=1), quantize_tensor(w, qtype)):
        c = kquant_codes(raw.reshape(-1), qtype, (16, 512))
        assert (c.kind, c.bits, c.group_size) == (kind, bits, group) and int(c.u.max()) < 1 << bits
        bits_equal(c.dequantize(), dequantize_tensor(raw, qtype, (16, 512)))
        # the float64 values the codes stand for: what a lossless move preserves (the fp32 decode rounds them)
        assert torch.allclose(c.exact(), c.dequantize().double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_compiled_kquant_codes_are_the_torch_ones(qtype):
    raw = random_blocks(qtype, 8, 1024, seed=5)
    a, b = kquant_codes(raw, qtype, (8, 1024)), kquant_codes(raw, qtype, (8, 1024), compiled=False)
    assert torch.equal(a.u, b.u)
    bits_equal(a.scale, b.scale)
    if b.offset is not None:
        bits_equal(a.offset, b.offset)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def kfiles(tmp_path_factory):
    """llama.cpp's own Q4_K_M and Q5_K_M (``llama_model_quantize``) of a tiny random Gemma 2, our ``--type
    q4_k`` (every matrix Q4_K, as ``llama-quantize --pure`` writes it) and our ``--type q5_1``."""
    d = tmp_path_factory.mktemp("kq")
    src = d / "src"
    make_hf_model(CFG, seed=11).save_pretrained(src)
    make_tiny_spm(src / "tokenizer.model", CFG.vocab_size)
    f32 = d / "f32.gguf"
    convert(src, f32, ConvertOptions(to="gguf", gguf_type="f32", verify=False))
    ours = {t: d / f"{t.lower()}.gguf" for t in ("Q4_K", "Q5_1")}
    for t, path in ours.items():
        convert(src, path, ConvertOptions(to="gguf", gguf_type=t.lower(), verify=False))
    return ours | {ft: llama_quantize(f32, d / f"{ft}.gguf", ft) for ft in ("Q4_K_M", "Q5_K_M")}


def test_llama_quantize_file_reads_as_codes(kfiles):
    f = GGUFFile(kfiles["Q4_K_M"])
    ckpt = open_checkpoint(kfiles["Q4_K_M"])
    kept = {n: t for n, t in ckpt.tensors.items() if isinstance(t, QuantTensor)}
    assert {t.layout for t in kept.values()} == {"gguf:Q4_K", "gguf:Q6_K"} and len(kept) == 2 * 7 + 1
    for info in f.tensors.values():
        if info.type_name in K_TYPES:
            raw = torch.from_numpy(f.raw(info.name).copy())
            bits_equal(kquant_codes(raw, info.type_name, info.shape).dequantize(),
                       dequantize_tensor(raw, info.type_name, info.shape))
    emb, info = ckpt.tensors["model.embed_tokens.weight"], f.tensors["token_embd.weight"]
    bits_equal(emb.load(), dequantize_tensor(f.raw(info.name).copy(), "Q6_K", info.shape))  # by blocks of rows
    bits_equal(emb.rows(5, 9), emb.load()[5:9])  # type: ignore[misc]


class Notes(Progress):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def reference_and_mlx(out) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CFG.vocab_size, (2, CFG.sliding_window), generator=g)  # mlx-lm has no window
    with torch.no_grad():
        ref = from_pretrained(out, Gemma2ForCausalLM)(ids)
    return ref, mlx_logits(out, ids)


@pytest.mark.parametrize("ftype,bits", [("Q4_K_M", 4), *(pytest.param(*p, marks=pytest.mark.slow)
                                                          for p in [("Q5_K_M", 5), ("Q5_1", 5)])])
def test_kquant_to_mlx_is_bit_identical_and_mlx_lm_runs_it(kfiles, tmp_path, ftype, bits):
    """Q4_K → MLX 4-bit g32 (Q5_K, Q5_1 → 5-bit), float32 scales and biases: every weight decodes to the same
    float32 values; Q6_K (groups of 16: no MLX form) is written as its float32 values, with a warning."""
    out = tmp_path / "mlx"
    notes = Notes()
    res = convert(kfiles[ftype], out, ConvertOptions(to="mlx"), progress=notes)
    tr = res.details["transcode"]
    assert tr["inexact_groups"] == 0 and tr["transcoded"] >= 10, tr
    assert res.report is not None and res.report.passed and res.report.max_abs_logits == 0.0
    dense = any("written dequantized for mlx" in w for w in notes.warnings)
    assert dense == ftype.endswith("_M"), notes.warnings  # the mixes' Q6_K tensors
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (bits, 32)
    all_equal(kfiles[ftype], out)  # every tensor, the kept and the dense, bit for bit
    rep = verify(kfiles[ftype], out, n_tokens=16)  # the exact tolerance: equal tensors, identical logits
    assert rep.passed and rep.max_abs_logits == 0.0, rep.failures
    back = open_checkpoint(out)
    kept = [t for t in back.tensors.values() if isinstance(t, QuantTensor) and t.bits == bits]
    assert len(kept) == tr["transcoded"]
    ref, got = reference_and_mlx(out)
    d = (got - ref).abs()
    assert d.max() <= 1e-3, f"max |Δ| {d.max():.3e} at {divmod(int(d.argmax()), ref.shape[-1])}"


def test_q4_k_m_to_gguf_q4_k_m_copies_every_block(kfiles, tmp_path):
    out = tmp_path / "copy.gguf"
    res = convert(kfiles["Q4_K_M"], out, ConvertOptions(to="gguf", gguf_type="q4_k_m"))
    assert res.details["transcode"]["inexact_groups"] == 0 and res.details["transcode"]["transcoded"] == 15
    assert res.report is not None and res.report.max_abs_logits == 0.0
    a, b = GGUFFile(kfiles["Q4_K_M"]), GGUFFile(out)
    for name, info in a.tensors.items():
        assert b.tensors[name].type_name == info.type_name, name
        if info.type_name in K_TYPES:
            assert np.array_equal(a.raw(name), b.raw(name)), name
    assert torch.equal(llama_cpp_logits(out), llama_cpp_logits(kfiles["Q4_K_M"]))


def test_a_nan_super_scale_is_caught_when_the_blocks_are_copied(kfiles, tmp_path):
    bad = tmp_path / "nan.gguf"
    data = bytearray(kfiles["Q4_K_M"].read_bytes())
    info = GGUFFile(kfiles["Q4_K_M"]).tensors["blk.0.ffn_up.weight"]
    data[info.offset:info.offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()  # block 0's d
    bad.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"blk\.0\.ffn_up\.weight\.d.*1 NaN.*--allow-nonfinite"):
        convert(bad, tmp_path / "copy.gguf", ConvertOptions(to="gguf", gguf_type="q4_k_m"))


def inexact_q4_k_groups(path) -> int:
    """Groups of the file's Q4_K tensors whose d·sc or dmin·m is not an fp16 value, from the bytes."""
    f, n = GGUFFile(path), 0
    for name, info in f.tensors.items():
        if info.type_name == "Q4_K":
            raw = torch.from_numpy(f.raw(name).copy()).reshape(1, -1)
            d, dmin, scales, _ = split_bytes(raw, 144, [2, 2, 12, 128])
            sc, m = unpack_k_scales(scales)
            a = f16_from_bytes(d).unsqueeze(-1) * sc.float()
            b = f16_from_bytes(dmin).unsqueeze(-1) * m.float()
            n += int(((a.half().float() != a) | (b.half().float() != b)).sum())
    return n


def test_q4_k_to_q4_1_counts_the_groups_fp16_cannot_hold(kfiles, tmp_path):
    want = inexact_q4_k_groups(kfiles["Q4_K_M"])
    with pytest.raises(TranscodeError, match=rf"{want} of \d+ quantization groups cannot be held exactly by "
                                             r"gguf:Q4_1.*--requantize"):
        convert(kfiles["Q4_K_M"], tmp_path / "no.gguf", ConvertOptions(to="gguf", gguf_type="q4_1"))
    assert not (tmp_path / "no.gguf").exists()
    res = convert(kfiles["Q4_K_M"], tmp_path / "re.gguf", ConvertOptions(to="gguf", gguf_type="q4_1",
                                                                         requantize=True))
    tr = res.details["transcode"]
    assert tr["inexact_groups"] == want and 0 < want < tr["groups"] and tr["requantized"]
    assert res.report is not None and res.report.passed, res.report.failures
    print(f"Q4_K → Q4_1: {want} of {tr['groups']} groups not fp16-representable")


def test_kquant_routes_without_an_exact_target_are_refused(kfiles, tmp_path):
    no_mlx = r"embed_tokens.*Q6_K sym 6-bit g16 has groups of 16.*mlx quantizes groups of 32, 64, 128 only"
    with pytest.raises(ConversionError, match=no_mlx + ".*--quantized dequantize"):
        convert(kfiles["Q4_K_M"], tmp_path / "m", ConvertOptions(to="mlx", quantized="keep"))
    for t, pattern in [("q4_k", r"Q6_K.*kept only in its own type.*--type q4_k stores it as Q4_K"),
                       ("q8_0", r"Q6_K sym 6-bit g16 cannot become Q8_0 blocks.*re-quantizing")]:
        with pytest.raises(ConversionError, match=pattern):
            opts = ConvertOptions(to="gguf", gguf_type=t, quantized="keep")
            convert(kfiles["Q4_K_M"], tmp_path / f"{t}.gguf", opts)
    with pytest.raises(ConversionError, match=r"v_proj.*Q6_K sym 6-bit g16 has no compressed-tensors form"):
        convert(kfiles["Q4_K_M"], tmp_path / "ct", ConvertOptions(to="hf", quantized="keep"))
    # compressed-tensors' asymmetric int4: the zero-point dmin·m / d·sc is almost never a whole code
    with pytest.raises(TranscodeError, match=r"cannot be held exactly by compressed-tensors.*--requantize"):
        convert(kfiles["Q4_K"], tmp_path / "ct", ConvertOptions(to="hf", quantized="keep"))
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_mlx_words_of_odd_widths_are_mx_quantize_s(bits):
    """3/5/6-bit codes straddle uint32 words: a little-endian bit stream per row, as ``mx.quantize`` packs."""
    import mlx.core as mx

    from quant.mlx_affine import pack_stream, unpack_codes

    w = np.random.default_rng(bits).standard_normal((6, 256)).astype(np.float32)
    q, s, b = mx.quantize(mx.array(w), group_size=32, bits=bits)
    deq = np.array(mx.dequantize(q, s, b, group_size=32, bits=bits))
    want = np.round((deq - np.repeat(np.array(b), 32, 1)) / np.repeat(np.array(s), 32, 1))
    words = torch.from_numpy(np.array(q).view(np.int32))
    u = unpack_codes(words.view(torch.uint32), bits, 256)
    assert np.array_equal(u.numpy().astype(np.float32), want)
    assert torch.equal(pack_stream(u, bits).view(torch.int32), words)
