"""GGUFs as users download them: llama.cpp's own conversion (``convert_hf_to_gguf.py``) and quantization
(``llama_model_quantize``) of an HF directory, and copies of such a file broken the ways real files were broken
(norms without the +1, no query-scale fold at a non-standard depth, no softcap keys, another vocabulary,
q and k swapped). Used by tests/test_verify_downloads.py.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemma2_convert.formats.gguf.file import GGUFFile
from quant.gguf_types import file_type_id

LLAMA_CPP = Path("/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp")

TensorEdit = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
KvEdit = Callable[[dict[str, tuple[object, int, int | None]]], dict[str, tuple[object, int, int | None]]]


def llama_cpp_convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own converter on ``hf_dir`` (it imports the gguf-py beside it, as in llama.cpp's tree)."""
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    r = subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}"
    return out


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's ``llama_model_quantize`` of ``src`` to file type ``ftype`` (``"Q4_K_M"``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type_id(ftype)
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype}) returned {rc}"
    return dst


def rewrite(src: Path, dst: Path, tensors: TensorEdit | None = None, kv: KvEdit | None = None) -> Path:
    """A copy of the F32 GGUF ``src`` through gguf-py's writer, its tensors (numpy, GGUF name → array) and its
    metadata (key → (value, type, item type)) passed through the edits."""
    import gguf

    f = GGUFFile(src)
    items = {k: (v, *f.kv_types[k]) for k, v in f.kv.items()}
    items = kv(items) if kv is not None else items
    arrays = {n: f.raw(n).view(np.float32).reshape(i.shape).copy() for n, i in f.tensors.items()}
    arrays = tensors(arrays) if tensors is not None else arrays
    w = gguf.GGUFWriter(str(dst), f.kv["general.architecture"])
    for key, (value, vtype, item) in items.items():
        if key != "general.architecture" and not key.startswith("GGUF."):
            w.add_key_value(key, list(value) if isinstance(value, bytes) else value, gguf.GGUFValueType(vtype),
                            None if item is None else gguf.GGUFValueType(item))
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def norms_without_one(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every norm stored as the zero-centred w, not 1 + w (the bug of a converter that forgets the shift)."""
    return {n: a - 1.0 if n.endswith("norm.weight") else a for n, a in t.items()}


def swap_q_k(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """attn_q and attn_k exchanged in every layer (equal shapes: multi-head attention)."""
    out = dict(t)
    for n, q in t.items():
        if n.endswith("attn_q.weight"):
            k = n.replace("attn_q", "attn_k")
            out[n], out[k] = t[k], q
    return out


def drop_softcaps(items: dict) -> dict:
    """No softcap keys (the files llama.cpp made before its PR #8197)."""
    return {k: v for k, v in items.items() if "softcapping" not in k}


def other_vocabulary(items: dict) -> dict:
    """Another vocabulary of the same size: the pieces of every id from 300 on rotated by one."""
    tokens, vtype, item = items["tokenizer.ggml.tokens"]
    tokens = list(tokens)
    tokens[300:] = tokens[301:] + tokens[300:301]
    return {**items, "tokenizer.ggml.tokens": (tokens, vtype, item)}


def more_tokens(extra: int) -> tuple[TensorEdit, KvEdit]:
    """``extra`` more tokens (pieces ``<extra_i>``) and as many zero rows in the embedding: a file made with
    another model's vocabulary size."""
    def tensors(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        e = t["token_embd.weight"]
        return {**t, "token_embd.weight": np.concatenate([e, np.zeros((extra, e.shape[1]), e.dtype)])}

    def kv(items: dict) -> dict:
        out = dict(items)
        for key, add in (("tokenizer.ggml.tokens", [f"<extra_{i}>" for i in range(extra)]),
                         ("tokenizer.ggml.scores", [0.0] * extra), ("tokenizer.ggml.token_type", [4] * extra)):
            value, vtype, item = items[key]
            out[key] = (list(value) + add, vtype, item)
        return out

    return tensors, kv
