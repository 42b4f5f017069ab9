"""The whole transformers Gemma2 family against the reference: bare model, hidden states,
attentions, losses, classification heads, logits_to_keep, inputs_embeds, explicit positions."""

from __future__ import annotations

import pytest
import torch

from gemma2_convert.pipeline.load import from_pretrained
from reference import (Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification,
                       Gemma2Model, HybridCache)
from tests.conftest import TINY_CONFIGS, hf_config

TOL = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    d = (a.float() - b.float()).abs()
    assert d.max() <= TOL, f"{what}: max |Δ| {d.max().item():.3e} at {tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))}"


def _hf(cls_name: str, cfg, tmp_path, seed=0, num_labels=3):
    """A random transformers model of ``cls_name`` saved to tmp_path (non-zero norms)."""
    import transformers

    torch.manual_seed(seed)
    hc = hf_config(cfg.replace(architectures=(cls_name,)))
    hc.num_labels = num_labels
    model = getattr(transformers, cls_name)(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.endswith("norm.weight") else 1.0 / p.shape[-1] ** 0.5
                                           if p.ndim == 2 and "embed" not in name else 1.0))
    model.save_pretrained(tmp_path)
    return model


def _ids(cfg, B=2, T=None, seed=1):
    T = T or 3 * cfg.sliding_window + 1
    return torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gqa2", "mha"])
def test_bare_model_hidden_states_and_attentions(name, tmp_path):
    cfg = TINY_CONFIGS[name]
    hf = _hf("Gemma2Model", cfg, tmp_path)
    ours = from_pretrained(tmp_path)
    assert type(ours) is Gemma2Model
    ids = _ids(cfg)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True, output_attentions=True)
    got = ours(ids, output_hidden_states=True, output_attentions=True)
    _close(got.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    assert len(got.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")
    assert len(got.attentions) == len(ref.attentions) == cfg.num_hidden_layers
    for i, (a, b) in enumerate(zip(got.attentions, ref.attentions)):
        _close(a, b, f"attentions[{i}]")
    assert torch.equal(ours(ids), got.last_hidden_state)  # plain call: the main tensor


def test_causal_lm_loss_logits_to_keep_and_records(tmp_path):
    cfg = TINY_CONFIGS["gqa4"]
    hf = _hf("Gemma2ForCausalLM", cfg, tmp_path)
    ours = from_pretrained(tmp_path)
    assert type(ours) is Gemma2ForCausalLM
    ids = _ids(cfg)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels, output_hidden_states=True, output_attentions=True)
    got = ours(ids, labels=labels, output_hidden_states=True, output_attentions=True)
    _close(got.loss, ref.loss, "loss")
    _close(got.logits, ref.logits, "logits")
    for a, b in zip(got.hidden_states, ref.hidden_states):
        _close(a, b, "hidden_states")
    for a, b in zip(got.attentions, ref.attentions):
        _close(a, b, "attentions")
    full = ours(ids)
    _close(ours(ids, num_logits_to_keep=3), full[:, -3:], "num_logits_to_keep")  # same rows, other GEMM shape
    _close(ours(ids, logits_to_keep=1), full[:, -1:], "logits_to_keep")
    assert ours(ids, logits_to_keep=2).shape == (2, 2, cfg.vocab_size)
    loss, logits = ours(ids, labels=labels, return_dict=False)
    assert torch.equal(logits, full) and torch.equal(loss, got.loss)


def test_inputs_embeds_position_ids_and_cache_position(tmp_path):
    cfg = TINY_CONFIGS["gqa2"]
    hf = _hf("Gemma2ForCausalLM", cfg, tmp_path, seed=4)
    ours = from_pretrained(tmp_path)
    ids = _ids(cfg, B=1, T=20)
    embeds = torch.randn(1, 20, cfg.hidden_size)
    pos = torch.arange(5, 25)[None]
    with torch.no_grad():
        ref_e = hf(inputs_embeds=embeds).logits
        ref_p = hf(ids, position_ids=pos).logits
    _close(ours(inputs_embeds=embeds), ref_e, "inputs_embeds")
    _close(ours(ids, position_ids=pos), ref_p, "position_ids")
    # explicit cache_position: two chunks through a cache equal one pass
    cache = HybridCache(cfg)
    a = ours(ids[:, :12], past_key_values=cache, cache_position=torch.arange(12))
    b = ours(ids[:, 12:], past_key_values=cache, cache_position=torch.arange(12, 20))
    _close(torch.cat([a, b], dim=1), ours(ids), "cache_position chunks")
    out = ours(ids[:, :4], use_cache=True)
    assert isinstance(out.past_key_values, HybridCache) and out.past_key_values.seen == 4


@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_sequence_classification(tmp_path, num_labels, padding):
    cfg = TINY_CONFIGS["gqa2"]
    hf = _hf("Gemma2ForSequenceClassification", cfg, tmp_path, seed=2, num_labels=num_labels)
    ours = from_pretrained(tmp_path)
    assert type(ours) is Gemma2ForSequenceClassification and ours.config.num_labels == num_labels
    ids = _ids(cfg, B=3, T=2 * cfg.sliding_window + 3)
    mask = torch.ones_like(ids)
    for row, n in ((0, 4), (2, 9)):
        sl = slice(None, n) if padding == "left" else slice(-n, None)
        ids[row, sl], mask[row, sl] = cfg.pad_token_id, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.randn(3) if num_labels == 1 else torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (3, num_labels)
    _close(got.logits, ref.logits, "class logits")
    _close(got.loss, ref.loss, "loss")


def test_token_classification(tmp_path):
    cfg = TINY_CONFIGS["mha"]
    hf = _hf("Gemma2ForTokenClassification", cfg, tmp_path, seed=3, num_labels=5)
    ours = from_pretrained(tmp_path)
    assert type(ours) is Gemma2ForTokenClassification
    ids = _ids(cfg)
    labels = torch.randint(0, 5, ids.shape)
    labels[:, ::4] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
    got = ours(ids, labels=labels)
    _close(got.logits, ref.logits, "token logits")
    _close(got.loss, ref.loss, "loss")


def test_specific_class_on_other_checkpoints(tmp_path):
    """Like transformers: a bare model loads from a head checkpoint (ignoring the head); a head that
    the checkpoint lacks is an error naming the missing tensor."""
    cfg = TINY_CONFIGS["mha"]
    _hf("Gemma2ForSequenceClassification", cfg, tmp_path)
    bare = from_pretrained(tmp_path, Gemma2Model)
    cls = from_pretrained(tmp_path)
    ids = _ids(cfg, B=1, T=10)
    assert torch.equal(bare(ids), cls(ids, return_dict=True, output_hidden_states=True).hidden_states[-1])
    causal_dir = tmp_path / "causal"
    _hf("Gemma2ForCausalLM", cfg, causal_dir)
    from gemma2_convert.core.errors import TensorMismatchError

    with pytest.raises(TensorMismatchError, match=r"missing 1 tensors: score\.weight"):
        from_pretrained(causal_dir, Gemma2ForSequenceClassification)
