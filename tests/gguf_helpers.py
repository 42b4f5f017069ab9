"""Tiny Gemma 2 models on disk for the GGUF tests: HF directories with a SentencePiece tokenizer.

Shapes respect llama.cpp's CPU kernels: rows (hidden size, head widths, intermediate size) are
multiples of 32, and of 256 where K-quants are tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.formats.synthetic import random_tensors
from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
from reference.config import Gemma2Config

VOCAB = 512  # the tiny tokenizer's size; the embedding has exactly as many rows

CONFIGS: dict[str, Gemma2Config] = {
    # non-standard depth, query_pre_attn_scalar != head_dim: llama.cpp's scale differs → attn_q folded
    "fold": Gemma2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=48,
                         sliding_window=16, max_position_embeddings=256, torch_dtype="float32"),
    # multi-head attention, head_dim 32, scale = head_dim: nothing folded
    "mha": Gemma2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=32, query_pre_attn_scalar=32,
                        sliding_window=8, max_position_embeddings=256, attn_logit_softcapping=20.0,
                        final_logit_softcapping=15.0, torch_dtype="float32"),
    # every row a multiple of 256, so the K-quant mixes need no fallback; 4 layers: 2 get more bits
    "kmix": Gemma2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=48,
                         sliding_window=16, max_position_embeddings=256, torch_dtype="float32"),
    # a layer pattern other than Gemma 2's alternation: written as a per-layer sliding_window_pattern
    "pattern": Gemma2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=8, max_position_embeddings=256, torch_dtype="float32",
                            layer_types=("full_attention", "sliding_attention", "sliding_attention",
                                         "full_attention")),
    # 46 layers: llama.cpp types it 27B and uses n_embd / n_head = 64, the model uses 32 → folded
    "depth46": Gemma2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=46,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=16, max_position_embeddings=256, torch_dtype="float32"),
}


def tensors(cfg: Gemma2Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random HF-named tensors (norms zero-centred, embedding unit-variance, unit-gain linears)."""
    return {k: v.load() for k, v in random_tensors(cfg, seed, dtype).items()}


def write_model(out: Path, cfg: Gemma2Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                tokenizer: bool = True) -> Path:
    """An HF directory (config, safetensors, tokenizer files) with random weights; returns ``out``."""
    out.mkdir(parents=True)
    tok = make_tiny_spm(out.parent / f"{out.name}-tokenizer.model", cfg.vocab_size) if tokenizer else None
    items = [(k, LazyTensor.of(v)) for k, v in tensors(cfg, seed, dtype).items()]
    write_hf_dir(out, cfg.replace(torch_dtype=str(dtype).removeprefix("torch.")), items, tokenizer=tok)
    return out


def first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors diverge, for assertion messages."""
    d = (a.float() - b.float()).abs()
    i = int(d.argmax())
    return f"max |Δ| {d.max().item():.3g} at flat index {i}: {a.flatten()[i].item()!r} vs {b.flatten()[i].item()!r}"


def importance(kind: str, cols: int, seed: int = 1, decades: int = 16) -> np.ndarray | None:
    """Importance weights [cols] (float32) of one kind: none, mean_sq (mean squared activations over two
    decades), zeros (zero on whole blocks and scattered columns), wide (spread over ``decades`` decades)."""
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    if kind == "mean_sq":
        q = rng.standard_normal(cols) ** 2 + 1e-2
    elif kind == "zeros":
        q = rng.uniform(0.0, 1.0, cols)
        q[rng.random(cols) < 0.2] = 0
        q[:32] = 0
    else:
        q = 10.0 ** rng.uniform(-decades / 2, decades / 2, cols)
    return q.astype(np.float32)


def diff_blocks(ours: np.ndarray, want: np.ndarray, block_bytes: int) -> tuple[int, int, str]:
    """(differing blocks, blocks, where the first differs: its differing byte offsets and both blocks' ends)."""
    o, w = ours.reshape(-1, block_bytes), want.reshape(-1, block_bytes)
    diff = np.nonzero((o != w).any(axis=1))[0]
    first = ""
    if len(diff):
        i = diff[0]
        first = (f"block {i}, bytes {np.nonzero(o[i] != w[i])[0][:8].tolist()}: ours {o[i][:12].tolist()} … "
                 f"{o[i][-16:].tolist()} want {w[i][:12].tolist()} … {w[i][-16:].tolist()}")
    return len(diff), len(o), first


def llama_logits(path: Path | str, ids: list[int]) -> torch.Tensor:
    """[T, V] float32 logits of llama.cpp (CPU, F32 KV cache, no flash attention) for one sequence."""
    import llama_cpp  # a real client: missing in CI is a failure, not a skip

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids),
                          type_k=0, type_v=0, flash_attn=False, swa_full=False, verbose=False)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    finally:
        llm.close()
