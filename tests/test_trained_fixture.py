"""The trained fixture (tests/fixtures/gemma2-tiny-trained, made by tools/train_fixture.py).

It loads in the reference and in transformers with equal logits, has the shapes the quantizers need,
and has learned: its perplexity on the held-out eval.txt is a small fraction of the uniform one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "gemma2-tiny-trained"
CONTEXT = 256  # the training context (config max_position_embeddings); windows are <bos> + 255 tokens

# Measured with the reference forward pass in fp32 on the bf16 weights: held-out perplexity 75.84 on
# eval.txt (4.3287 nats over 14,583 predicted tokens). A uniform guess over the 2048-piece vocabulary
# scores 2048; unigram and bigram counts over the training tokens score about 554 and 86.
MEASURED_PPL = 75.84


def _eval_windows() -> torch.Tensor:
    """eval.txt as consecutive [<bos> + 255 tokens] rows, the last padded with <pad> (0)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))
    ids = torch.tensor(sp.encode((FIXTURES / "eval.txt").read_text(encoding="utf-8")))
    n = CONTEXT - 1
    rows = torch.zeros((math.ceil(len(ids) / n), CONTEXT), dtype=torch.long)  # [R, C]
    rows[:, 0] = 2
    for r, start in enumerate(range(0, len(ids), n)):
        chunk = ids[start:start + n]
        rows[r, 1:1 + len(chunk)] = chunk
    return rows


def _nll(logits: torch.Tensor, rows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) over real tokens, and their count."""
    targets = rows[:, 1:]
    real = targets != 0
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [R, C-1, V]
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [R, C-1]
    return nll[real].sum().item(), int(real.sum())


def test_fixture_layout():
    """≤ 10 MB, bf16, sliding window well inside the context, every in_features a multiple of 256."""
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size <= 10 * 1024 * 1024, f"fixture is {size} bytes"
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["sliding_window"] * 2 < cfg["max_position_embeddings"] == CONTEXT
    assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]
    # Stock llama.cpp scales queries by 1/sqrt(head_dim) at this depth, whatever config.json says; any
    # other value would make its converter's GGUF (the Q4_0 baseline) a different model.
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"]
    with safe_open(MODEL / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        widths = {k: f.get_slice(k).get_shape()[1] for k in f.keys() if k.endswith("proj.weight")}
    assert dtypes == {"BF16"}
    odd = {k: w for k, w in widths.items() if w % 256}
    assert len(widths) == 7 * cfg["num_hidden_layers"] and not odd, odd


def test_tokenizer_json_matches_tokenizer_model():
    import tokenizers
    import sentencepiece as spm
    text = (FIXTURES / "eval.txt").read_text(encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))
    fast = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text)


def test_logits_match_transformers():
    import transformers
    rows = _eval_windows()[:2]  # [2, 256]: four sliding windows per row
    hf = transformers.Gemma2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf.eval()(rows).logits.float()
    got = from_pretrained(MODEL, Gemma2ForCausalLM)(rows)
    d = (got - ref).abs()
    idx = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))
    assert d.max() <= 1e-4, f"max |Δ| {d.max():.3e} at {idx}: ours {got[idx]:.6f} vs transformers {ref[idx]:.6f}"


@pytest.mark.slow  # held-out perplexity of the trained fixture over the whole eval text
def test_heldout_perplexity_shows_training():
    rows = _eval_windows()
    model = from_pretrained(MODEL, Gemma2ForCausalLM)
    total, count = 0.0, 0
    for i in range(0, len(rows), 16):
        nll, n = _nll(model(rows[i:i + 16]), rows[i:i + 16])
        total, count = total + nll, count + n
    ppl = math.exp(total / count)
    vocab = json.loads((MODEL / "config.json").read_text())["vocab_size"]
    assert ppl <= 1.01 * MEASURED_PPL, f"held-out perplexity {ppl:.2f}, measured {MEASURED_PPL} when trained"
    assert ppl < 0.1 * vocab, f"held-out perplexity {ppl:.2f} is not far below uniform ({vocab})"
