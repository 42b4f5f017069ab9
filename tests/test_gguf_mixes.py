"""llama-quantize's mixes (formats/gguf/mix.py) against llama.cpp's own choice (``llama_model_quantize``).

* Per-tensor types: tiny Gemma-2-shaped F32 GGUFs with the 2B / 9B / 27B depths (26 / 42 / 46 layers, n_gqa 2,
  every row whole 256-blocks) and one with 288-wide rows and n_gqa 4 (fallbacks, and the Q2_K / IQ4_XS
  ``n_gqa >= 4`` rules) are quantized by llama.cpp to each file type, without ``pure``; ``choose_type`` must give
  the type llama.cpp wrote for every tensor, and the file type must match. ``q6_k`` (every matrix Q6_K) is
  compared with llama.cpp's Q6_K file type: the same.
* Whole files: our ``--type`` output of a tiny model equals llama.cpp's quantization of our F32 file tensor for
  tensor and block for block, and llama.cpp runs it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp  # a real client: missing in CI is a failure, not a skip
import numpy as np
import pytest
import torch

from gemma2_convert.formats.gguf.mix import MIXES, choose_type, file_type
from gemma2_convert.formats.gguf.reader import GGUFFile
from quant.gguf_types import file_type_id, ggml_type
from tests.conftest import with_slow
from tests.gguf_helpers import llama_logits

KEYS = [*MIXES, "q6_k"]
"""Every mix, and q6_k: llama-quantize's Q6_K file type is every matrix Q6_K for Gemma 2."""
SHAPES = {  # name: (layers, hidden, intermediate, heads, kv heads, head_dim)
    "2b": (26, 256, 256, 2, 1, 128),
    "9b": (42, 256, 256, 2, 1, 128),
    "27b": (46, 256, 256, 2, 1, 128),
    "wide-gqa4": (16, 288, 512, 4, 1, 64),  # q/k/v/gate/up/embedding rows of 288: fallbacks; n_gqa = 4
}
VOCAB = 320


def _llama_ftype(key: str) -> int:
    return file_type_id("IQ4_XS" if key == "iq4_xs_mix" else key)


def _shapes(n_layer: int, h: int, ff: int, n_head: int, n_kv: int, hd: int) -> dict[str, tuple[int, ...]]:
    """GGUF names -> numpy shapes [rows, cols] (GEMMA2_FORMATS.md §5.2)."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, h), "output_norm.weight": (h,)}
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (h,), b + "attn_q.weight": (n_head * hd, h),
            b + "attn_k.weight": (n_kv * hd, h), b + "attn_v.weight": (n_kv * hd, h),
            b + "attn_output.weight": (h, n_head * hd),
            b + "post_attention_norm.weight": (h,), b + "ffn_norm.weight": (h,), b + "ffn_gate.weight": (ff, h),
            b + "ffn_up.weight": (ff, h), b + "ffn_down.weight": (h, ff), b + "post_ffw_norm.weight": (h,),
        }
    return shapes


def _write_f32(path: Path, shape: str) -> dict[str, tuple[int, ...]]:
    n_layer, h, ff, n_head, n_kv, hd = SHAPES[shape]
    shapes = _shapes(n_layer, h, ff, n_head, n_kv, hd)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(file_type_id("F32"))
    w.add_float32("gemma2.attn_logit_softcapping", 50.0)
    w.add_float32("gemma2.final_logit_softcapping", 30.0)
    w.add_sliding_window(4096)
    for name, s in shapes.items():
        w.add_tensor(name, (rng.standard_normal(s) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


def _llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize(ftype {ftype}) returned {rc}"


@pytest.mark.parametrize("shape", with_slow(list(SHAPES), "9b", "27b"))
def test_types_equal_llama_quantize(shape: str, tmp_path):
    """Type choice only: every key's type for every tensor, and general.file_type, as llama.cpp's."""
    src = tmp_path / "f32.gguf"
    shapes = _write_f32(src, shape)
    n_layer, n_gqa = SHAPES[shape][0], SHAPES[shape][3] // SHAPES[shape][4]
    wrong = []
    for key in KEYS:
        dst = tmp_path / f"{key}.gguf"
        _llama_quantize(src, dst, _llama_ftype(key))
        theirs = GGUFFile(dst)
        assert theirs.kv["general.file_type"] == file_type(key), key
        ours = {n: choose_type(n, s, key, n_layer, n_gqa).qtype for n, s in shapes.items()}
        wrong += [f"{key} {n}: ours {ours[n]}, llama.cpp {t.type_name}" for n, t in theirs.tensors.items()
                  if ours[n] != t.type_name]
        assert set(ours) == set(theirs.tensors), key
        dst.unlink()
    assert not wrong, f"{len(wrong)} tensor types differ from llama-quantize's:\n" + "\n".join(wrong[:20])


def test_the_rules_show_on_the_shapes():
    """The comparison above is not vacuous: on the 2B depth each mix picks what QUANT_FORMATS §1.5 says."""
    shapes = _shapes(*SHAPES["2b"])

    def kinds(key: str, role: str) -> list[str]:
        return [choose_type(f"blk.{i}.{role}.weight", shapes[f"blk.{i}.{role}.weight"], key, 26).qtype
                for i in range(26)]

    assert choose_type("token_embd.weight", (VOCAB, 256), "q2_k", 26).qtype == "Q6_K"
    assert set(kinds("q2_k", "attn_v")) == set(kinds("q2_k", "ffn_down")) == {"Q3_K"}
    assert set(kinds("q2_k", "attn_q")) == {"Q2_K"}
    assert kinds("q3_k_m", "attn_v")[:3] == ["Q5_K", "Q5_K", "Q4_K"]
    assert kinds("q3_k_m", "ffn_down")[:2] == ["Q5_K", "Q4_K"]  # 26 // 16 = 1
    assert kinds("q4_k_s", "ffn_down")[:4] == ["Q5_K"] * 3 + ["Q4_K"]  # 26 // 8 = 3
    assert kinds("iq4_xs_mix", "ffn_down")[:4] == ["Q5_K"] * 3 + ["IQ4_XS"]
    assert set(kinds("q3_k_s", "attn_v")) == {"Q3_K"} and set(kinds("q5_k_s", "ffn_down")) == {"Q5_K"}


# ---- whole files ------------------------------------------------------------------------------

N_TOKENS = 48
FILE_KEYS = ["q2_k", "q3_k_m", "q3_k_l", "q4_k_s", "iq4_xs_mix"]


@pytest.fixture(scope="module")
def kmix(tmp_path_factory):
    from tests.gguf_helpers import CONFIGS, write_model

    return write_model(tmp_path_factory.mktemp("mixes") / "kmix", CONFIGS["kmix"], seed=11), CONFIGS["kmix"]




def _reference_logits(path, ids: list[int]) -> torch.Tensor:
    from gemma2_convert.pipeline.load import from_pretrained
    from reference import Gemma2ForCausalLM

    model = from_pretrained(path, Gemma2ForCausalLM, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("key", with_slow(FILE_KEYS, *FILE_KEYS[2:]))
def test_file_equals_llama_quantize_and_runs(kmix, key: str, tmp_path):
    """Our ``--type key`` (verified against the source on writing) vs ``llama_model_quantize`` of our F32 file:
    the same type per tensor and the same bytes; llama.cpp then runs ours."""
    from gemma2_convert.pipeline.gguf import to_gguf

    src, cfg = kmix
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    to_gguf(src, f32, type_name="f32", verify=False)
    result = to_gguf(src, ours, type_name=key)
    print(f"{key} verification: mean KL {result.report.mean_kl:.4g}, top-1 {result.report.top1:.2%}")
    _llama_quantize(f32, theirs, _llama_ftype(key))
    a, b = GGUFFile(ours), GGUFFile(theirs)
    types = {n: t.type_name for n, t in a.tensors.items()}
    assert types == {n: t.type_name for n, t in b.tensors.items()}
    assert a.kv["general.file_type"] == b.kv["general.file_type"] == file_type(key)
    blocks = differ = 0
    for name, t in a.tensors.items():
        size = ggml_type(t.type_name).type_size if ggml_type(t.type_name).is_quantized else 4
        x, y = a.raw(name).reshape(-1, size), b.raw(name).reshape(-1, size)
        blocks += len(x)
        differ += int((x != y).any(axis=1).sum())
    print(f"{key}: {sorted(set(types.values()))}, {blocks - differ}/{blocks} blocks identical to llama-quantize")
    assert differ <= blocks // 1000

    gen = torch.Generator().manual_seed(4)
    ids = [2] + torch.randint(3, cfg.vocab_size, (N_TOKENS - 1,), generator=gen).tolist()
    got, want = llama_logits(ours, ids), _reference_logits(ours, ids)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{key}: llama.cpp vs reference on the dequantized weights: "
          f"max |Δ| {(got - want).abs().max().item():.3g}, top-1 {top1:.2%}")
    assert top1 >= 0.95, f"llama.cpp's top-1 agrees with the reference on {top1:.2%} of {N_TOKENS} positions"
