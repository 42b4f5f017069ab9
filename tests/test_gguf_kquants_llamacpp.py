"""Our GGUF block bytes vs llama.cpp's own quantizer (``llama_model_quantize``, ``pure``, no imatrix).

A tiny Gemma-2-shaped F32 GGUF (rows of 256 / 512, so no type fallback) is quantized by llama.cpp to
each type; every quantized tensor is compared block by block with ``quant.gguf_codec.quantize_tensor``
on the same F32 data, and the dequantized errors are compared.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp  # a real client: missing in CI is a failure, not a skip
import numpy as np
import pytest
import torch

from quant.gguf_codec import dequantize_tensor, quantize_tensor
from quant.gguf_types import file_type_id, ggml_type

H, FF, N_HEAD, N_KV, HEAD_DIM, VOCAB, N_LAYER = 256, 512, 2, 1, 128, 320, 2
# pure=True: every 2-D weight gets the ftype's default type (Q4_K_M -> Q4_K, Q5_K_M -> Q5_K).
FTYPE_FOR = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "Q8_0": "Q8_0", "Q4_0": "Q4_0",
             "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1"}


def _tensor_shapes() -> dict[str, tuple[int, ...]]:
    """GGUF names (GEMMA2_FORMATS.md §5.2) -> numpy shapes [ne1, ne0]."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, H), "output_norm.weight": (H,)}
    for i in range(N_LAYER):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (H,), b + "attn_q.weight": (N_HEAD * HEAD_DIM, H),
            b + "attn_k.weight": (N_KV * HEAD_DIM, H), b + "attn_v.weight": (N_KV * HEAD_DIM, H),
            b + "attn_output.weight": (H, N_HEAD * HEAD_DIM), b + "post_attention_norm.weight": (H,),
            b + "ffn_norm.weight": (H,), b + "ffn_gate.weight": (FF, H), b + "ffn_up.weight": (FF, H),
            b + "ffn_down.weight": (H, FF), b + "post_ffw_norm.weight": (H,),
        }
    return shapes


def _weights(shape: tuple[int, ...], kind: int, rng: np.random.Generator) -> np.ndarray:
    """Six value distributions, plus a zero super-block, a constant sub-block and an outlier per matrix."""
    a = [
        lambda: rng.standard_normal(shape) * 0.02,
        lambda: rng.standard_t(2, shape) * 1e-3,  # heavy tails
        lambda: rng.integers(-8, 8, shape) * 0.125,  # on a grid: many rounding ties
        lambda: rng.standard_normal(shape) * 300,
        lambda: rng.integers(-3, 4, shape) * 1e-4 + (rng.random(shape) < 0.01) * 0.5,
        lambda: np.abs(rng.standard_normal(shape)) * 1e-5 + 0.1,  # all positive, tiny spread
    ][kind % 6]().astype(np.float32)
    if a.ndim == 2:
        a[0, :256] = 0
        a[1, :32] = 0.01
        a[2, 5] = 1.0
    return a


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("llamacpp") / "tiny-gemma2-f32.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_context_length(8192)
    w.add_embedding_length(H)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_file_type(file_type_id("F32"))
    w.add_float32("gemma2.attn_logit_softcapping", 50.0)
    w.add_float32("gemma2.final_logit_softcapping", 30.0)
    w.add_sliding_window(4096)
    data = {}
    for i, (name, shape) in enumerate(_tensor_shapes().items()):
        data[name] = _weights(shape, i, rng)
        w.add_tensor(name, data[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, data


def _imatrix_entries(imatrix: dict[str, np.ndarray], keep: list) -> ctypes.Array:
    """A NULL-terminated ``llama_model_imatrix_data[]``; ``keep`` holds the buffers alive."""
    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        buf = ctypes.create_string_buffer(name.encode())
        keep += [buf, values]
        arr[i].name = ctypes.cast(buf, ctypes.c_char_p)
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(imatrix)].name = None
    return arr


def _llama_quantize(src: Path, dst: Path, qtype: str, imatrix: dict[str, np.ndarray] | None = None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type_id(FTYPE_FOR[qtype])
    params.pure = True
    params.nthread = 1
    keep: list = []
    if imatrix is not None:
        params.imatrix = _imatrix_entries(imatrix, keep)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({qtype}) returned {rc}"


def _sse(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a.double() - torch.from_numpy(b).double()).pow(2).sum())


def _compare(dst: Path, data: dict[str, np.ndarray], qtype: str, imatrix: dict[str, np.ndarray] | None) -> None:
    """Block-by-block comparison of llama.cpp's file with ``quantize_tensor``; prints and asserts the counts."""
    t = ggml_type(qtype)
    n_blocks = n_diff = 0
    err_ours = err_ref = 0.0
    first_diff = ""
    for ti in gguf.GGUFReader(dst).tensors:
        if ti.name not in data or data[ti.name].ndim != 2:
            continue
        assert ti.tensor_type.name == qtype, f"{ti.name}: llama.cpp wrote {ti.tensor_type.name}, expected {qtype}"
        x = data[ti.name]
        qw = None if imatrix is None else torch.from_numpy(imatrix[ti.name])
        ref = np.asarray(ti.data).reshape(x.shape[0], -1)
        ours = quantize_tensor(torch.from_numpy(x), qtype, qw).numpy()
        ref_b, ours_b = ref.reshape(-1, t.type_size), ours.reshape(-1, t.type_size)
        diff = np.nonzero((ref_b != ours_b).any(axis=1))[0]
        n_blocks, n_diff = n_blocks + len(ref_b), n_diff + len(diff)
        if len(diff) and not first_diff:
            i = diff[0]
            first_diff = (f"{ti.name} block {i}: bytes {np.nonzero(ref_b[i] != ours_b[i])[0][:8].tolist()} "
                          f"llama.cpp {ref_b[i][:12].tolist()} ours {ours_b[i][:12].tolist()}")
        err_ours += _sse(dequantize_tensor(torch.from_numpy(ours), qtype, x.shape), x)
        err_ref += _sse(dequantize_tensor(ti.data, qtype, x.shape), x)  # straight from the reader's memmap
    ratio = (err_ours / err_ref) ** 0.5
    label = qtype + (" +imatrix" if imatrix is not None else "")
    print(f"{label}: {n_blocks - n_diff}/{n_blocks} blocks identical, RMSE ours/llama.cpp = {ratio:.6f}")
    assert n_blocks > 0
    assert n_diff <= n_blocks // 1000, f"{label}: {n_diff}/{n_blocks} blocks differ; first: {first_diff}"
    assert abs(ratio - 1) < 1e-3, f"{label}: dequantized RMSE ratio {ratio}"


@pytest.mark.parametrize("qtype", list(FTYPE_FOR))
def test_bytes_match_llama_quantize(qtype: str, f32_model, tmp_path):
    src, data = f32_model
    dst = tmp_path / f"tiny-gemma2-{qtype}.gguf"
    _llama_quantize(src, dst, qtype)
    _compare(dst, data, qtype, None)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_imatrix_bytes_match_llama_quantize(qtype: str, f32_model, tmp_path):
    src, data = f32_model
    rng = np.random.default_rng(1)  # mean squared activations: positive, spread over two decades
    imatrix = {
        k: (rng.standard_normal(v.shape[1]) ** 2 + 1e-2).astype(np.float32) for k, v in data.items() if v.ndim == 2
    }
    dst = tmp_path / f"tiny-gemma2-{qtype}-imatrix.gguf"
    _llama_quantize(src, dst, qtype, imatrix)
    _compare(dst, data, qtype, imatrix)
