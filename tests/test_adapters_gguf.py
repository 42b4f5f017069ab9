"""``lora-to-gguf``: llama.cpp runs our LoRA GGUF on a base GGUF (ours, with the query fold at a non-standard
depth; llama.cpp's own at a standard one) and computes the logits of our merged GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.pipeline.adapters import lora_to_gguf
from gemma2_convert.pipeline.convert import convert
from tests.adapter_helpers import CFG, make_adapter, tiny_tokenizer

import llama_cpp
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def spm512(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory)
N = 24


def llama_logits(path, ids: list[int], lora=None) -> torch.Tensor:
    """[T, V] logits of llama.cpp (CPU, F32 KV cache) with an optional LoRA GGUF."""
    llm = llama_cpp.Llama(str(path), lora_path=None if lora is None else str(lora), logits_all=True,
                          n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), type_k=0, type_v=0,
                          flash_attn=False, verbose=False)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    finally:
        llm.close()


def assert_same(got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    d = (got - want).abs()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    pos = int(d.max(-1).values.argmax())
    assert d.max() <= bound and top1 == 1.0, f"max |Δ| {d.max():.3g} at position {pos}, top-1 {top1:.2%}"


def ids_for(vocab: int) -> list[int]:
    return [2] + torch.randint(3, vocab, (N - 1,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "rslora", "all_linear"])
def test_lora_gguf_on_our_base_matches_merged(tmp_path, kind, spm512):
    """gqa2 at 4 layers with query_pre_attn_scalar 24 ≠ head_dim 32: our base GGUF carries the fold, and so
    does attn_q's lora_b."""
    _, base, adapter = make_adapter(tmp_path, kind, tokenizer=spm512)
    f32 = ConvertOptions(to="gguf", gguf_type="f32", verify=False)
    convert(base, tmp_path / "base.gguf", f32)
    convert(base, tmp_path / "merged.gguf", ConvertOptions(to="gguf", gguf_type="f32", adapters=(adapter,)))
    res = lora_to_gguf(adapter, tmp_path / "lora.gguf", tmp_path / "base.gguf")
    assert res.query_fold != 1.0
    f = GGUFFile(tmp_path / "lora.gguf")
    assert f.kv["general.type"] == "adapter" and f.kv["adapter.type"] == "lora"
    alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
    assert f.kv["adapter.lora.alpha"] == alpha
    assert "blk.0.attn_q.weight.lora_a" in f.tensors and "blk.0.attn_q.weight.lora_b" in f.tensors
    ids = ids_for(CFG.vocab_size)
    with_lora = llama_logits(tmp_path / "base.gguf", ids, tmp_path / "lora.gguf")
    assert_same(with_lora, llama_logits(tmp_path / "merged.gguf", ids), 5e-3)
    assert (with_lora - llama_logits(tmp_path / "base.gguf", ids)).abs().max() > 0.05  # the adapter acts


@pytest.mark.slow
def test_lora_gguf_on_llama_cpp_base(tmp_path, spm512):
    """A base GGUF made by llama.cpp's own converter (standard depth: no fold) with our LoRA GGUF."""
    from tests.downloads_helpers import llama_cpp_convert

    cfg = CFG.replace(query_pre_attn_scalar=CFG.head_dim)
    _, base, adapter = make_adapter(tmp_path, "lora", cfg=cfg, tokenizer=spm512)
    llama_cpp_convert(base, tmp_path / "base.gguf")
    convert(base, tmp_path / "merged.gguf", ConvertOptions(to="gguf", gguf_type="f32", adapters=(adapter,)))
    res = lora_to_gguf(adapter, tmp_path / "lora.gguf", tmp_path / "base.gguf")
    assert res.query_fold == 1.0
    ids = ids_for(cfg.vocab_size)
    assert_same(llama_logits(tmp_path / "base.gguf", ids, tmp_path / "lora.gguf"),
                llama_logits(tmp_path / "merged.gguf", ids), 5e-3)


@pytest.mark.parametrize("kind", ["dora", "embed", "lm_head", "added_tokens"])
def test_what_a_lora_gguf_cannot_hold_is_refused(tmp_path, kind):
    _, base, adapter = make_adapter(tmp_path, kind)
    with pytest.raises(UnsupportedError, match=r"cannot express .* Merge it instead: gemma2-convert convert"):
        lora_to_gguf(adapter, tmp_path / "lora.gguf", base)
    assert not (tmp_path / "lora.gguf").exists()
