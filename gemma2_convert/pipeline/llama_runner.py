"""Run GGUF files in llama.cpp (llama-cpp-python): logits, and llama.cpp's own quantizer.

Used to prove our GGUF output in the runtime people use; llama-cpp-python is a test extra, so
everything here imports it lazily and raises ``UnsupportedError`` when it is missing.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from gemma2_convert.core.errors import ConversionError, UnsupportedError


def llama_tools_dir() -> Path:
    """Where tools/build_llama_tools.sh puts llama.cpp's ``llama-quantize`` and ``llama-imatrix``, built from
    the sources of the installed llama-cpp-python (the tests, benchmarks and quality tools run them from there)."""
    import llama_cpp

    return Path.home() / ".cache" / "gemma2-convert" / "llama-tools" / llama_cpp.__version__ / "bin"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError("llama-cpp-python is not installed (pip install 'gemma2-convert[test]')") from None
    return llama_cpp


def llama_cpp_logits(gguf: str | Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits [T, V] of every prompt (token ids) under llama.cpp, each evaluated from scratch.

    F32 KV cache and no flash attention: llama.cpp's most exact CPU settings; ``swa_full=False`` (a
    window-sized cache on the sliding layers) gives the same logits as a full cache."""
    llama_cpp = _llama_cpp()
    n = max(len(p) for p in prompts)
    llm = llama_cpp.Llama(str(gguf), logits_all=True, n_ctx=max(64, n), n_batch=n, n_ubatch=n, type_k=0, type_v=0,
                          flash_attn=False, swa_full=False, verbose=False)
    out = []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            out.append(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)))
    finally:
        llm.close()
    return out


def llama_quantize(src: str | Path, out: str | Path, ftype: str, *, pure: bool = False,
                   token_embedding_type: str | None = None, threads: int = 2) -> None:
    """llama.cpp's ``llama_model_quantize`` on ``src`` (a GGUF): ``ftype`` like 'Q4_0' or 'Q4_K_M'."""
    import gguf

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    params.pure = pure
    if token_embedding_type is not None:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[token_embedding_type.upper()])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConversionError(f"llama_model_quantize returned {rc}", src)
