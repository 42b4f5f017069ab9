"""The fast path of a transcode: compiled code moves equal to the torch ones byte for byte, the sym → sym exactness
check equal to the general one, the GGUF writer's codes path (no float decode) checking the scales it moves, and
bad input (a compressed-tensors config whose group size is not the tensors') refused with one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma2_convert.core.errors import ConversionError, NonFiniteError
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.pipeline.convert import convert
from quant import gguf_legacy as lg
from quant import transcode as tr
from quant.gguf_blocks import blocks_from_codes, codes_from_blocks
from quant.pack import pack_unsigned, unpack_unsigned
from quant.qtensor import QuantCodes
from tests.test_transcode import ct_dir, src_dir  # noqa: F401 - fixtures


def test_compiled_nibble_moves_equal_the_torch_ones():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2**31, 2**31 - 1, (37, 40), generator=g, dtype=torch.int64).to(torch.int32)
    b = w.view(torch.uint8)
    want = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(37, -1)                    # [37, 320]
    assert torch.equal(unpack_unsigned(w, 4, 320), want)
    assert torch.equal(unpack_unsigned(w[:, :38].contiguous(), 4, 300), want[:, :300])  # a padded last word
    assert torch.equal(pack_unsigned(want, 4), w) and torch.equal(pack_unsigned(want | 0xF0, 4), w)  # low nibbles
    u = torch.randint(0, 16, (33, 256), generator=g, dtype=torch.uint8)
    d, m = torch.rand(33, 8, generator=g), -torch.rand(33, 8, generator=g)
    blocks = u.reshape(33, 8, 32)
    assert torch.equal(blocks_from_codes(QuantCodes(u, d, None, "sym", 4), "Q4_0"),
                       lg.pack_q4_0(d.to(torch.float16), blocks))
    assert torch.equal(blocks_from_codes(QuantCodes(u, d, m, "affine", 4), "Q4_1"),
                       lg.pack_q4_1(d.to(torch.float16), m.to(torch.float16), blocks))
    for qtype, size, fields in (("Q4_0", 18, [2, 16]), ("Q4_1", 20, [2, 2, 16])):  # and back, vs the torch split
        raw = torch.randint(0, 256, (33, 8 * size), generator=g, dtype=torch.uint8)
        raw.view(33, 8, size)[..., 1] &= 0x3B                                             # finite fp16 scales
        raw.view(33, 8, size)[..., 3] &= 0x3B
        c, parts = codes_from_blocks(raw, qtype, (33, 256)), lg.split_bytes(raw, size, fields)
        assert torch.equal(c.u, lg.unpack_nibbles(parts[-1]).reshape(33, 256))
        assert torch.equal(c.scale, lg.f16_from_bytes(parts[0]))
        assert c.offset is None if qtype == "Q4_0" else torch.equal(c.offset, lg.f16_from_bytes(parts[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind,target", [("sym", "sym"), ("asym", "asym"), ("affine", "affine"), ("sym", "affine")])
def test_shortcut_agrees_with_the_line_check(dtype, kind, target):
    """``recode``'s shortcut for a same-kind or sym → affine move (only parameters compared) gives the general rule's verdict (lines
    ``a·u + b`` equal in float64): all exact, and — once one scale is one fp16 cannot hold, inf, NaN, an overflow
    (1e6) or a subnormal — the line check's count and error."""
    g = torch.Generator().manual_seed(1)
    scale = (torch.rand(16, 8, generator=g) * 0.01).to(torch.float16).to(dtype)
    offset = {"sym": None, "asym": torch.randint(0, 16, (16, 8), generator=g, dtype=torch.int16),
              "affine": -8 * scale}[kind]
    c = QuantCodes(torch.randint(0, 16, (16, 256), generator=g, dtype=torch.uint8), scale, offset, kind, 4)
    t = tr.Target(target, 4, 32, torch.float16, torch.float32, "gguf:Q4_x")
    r = tr.recode(c, t, "w")
    assert r.bad_groups == 0 and r.max_error == 0.0 and torch.equal(r.codes.exact(), c.exact())
    for bad in (0.01 + 1e-6, float("inf"), float("nan"), 1e6, 1e-9):
        s = scale.clone()
        s[3, 3] = bad
        c2 = QuantCodes(c.u, s, offset, kind, 4)
        r = tr.recode(c2, t, "w")
        s16, off16 = tr._params(c2, t)
        (a0, b0), (a1, b1) = c2.line(), QuantCodes(c.u, s16, off16, t.kind, 4).line()
        diff = torch.maximum((b1 - b0).abs(), ((a1 - a0) * 15 + (b1 - b0)).abs())
        assert r.bad_groups == int((diff.ne(0) | ~torch.isfinite(diff)).sum()) >= (not 0 < bad < 1)


def _edit(ct: object, tmp_path, edit) -> object:
    d = tmp_path / "edited"
    shutil.copytree(ct, d)
    f = d / "model.safetensors"
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})
    return d


def test_a_nan_scale_is_refused_naming_the_tensor(ct_dir, tmp_path):  # noqa: F811
    """The codes path never decodes the weight, so the writer checks the scales it moves."""
    name = "model.layers.1.mlp.up_proj.weight_scale"
    d = _edit(ct_dir, tmp_path, lambda t: t[name].view(-1).__setitem__(5, float("nan")))
    with pytest.raises(NonFiniteError, match=r"tensor 'blk\.1\.ffn_up\.weight\.scale': 1 NaN .* index \[1, 1\].*--allow-nonfinite"):
        convert(d, tmp_path / "x.gguf", ConvertOptions(to="gguf", gguf_type="q4_0", requantize=True))


def test_a_config_group_size_the_tensors_do_not_have_is_refused(ct_dir, tmp_path):  # noqa: F811
    d = tmp_path / "g64"
    shutil.copytree(ct_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"weight_scale: expected float\[\d+, \d+\], got .*\[\d+, \d+\]"):
        convert(d, tmp_path / "x.gguf", ConvertOptions(to="gguf", gguf_type="q4_0", verify=False))
