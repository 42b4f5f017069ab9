"""Classification heads through the tools: quantize keeps them exact, verify compares class logits,
GGUF export refuses them unless asked to drop the head."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from gemma2_convert.pipeline.verify import Tolerance, verify
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForSequenceClassification
from tests.conftest import TINY_CONFIGS, hf_config

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("cls")
    cfg = TINY_CONFIGS["gqa2"].replace(architectures=("Gemma2ForSequenceClassification",))
    hc = hf_config(cfg)
    hc.num_labels, hc.id2label, hc.label2id = 3, LABELS, {v: k for k, v in LABELS.items()}
    torch.manual_seed(0)
    model = transformers.Gemma2ForSequenceClassification(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    model.save_pretrained(d)
    return d


def test_quantize_keeps_the_head_and_verifies_class_logits(cls_dir, tmp_path):
    import transformers

    out = tmp_path / "q"
    res = quantize_checkpoint(cls_dir, out, QuantizeOptions(4, 32, True, "mse"))
    assert res.quality["tokens"] == 2  # one class-logit row per prompt: the head's output is what is compared
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma2ForSequenceClassification"]
    assert cfg["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert "score" in cfg["quantization_config"]["ignore"]
    src, q = open_checkpoint(cls_dir), open_checkpoint(out)
    assert torch.equal(src.tensors["score.weight"].load(), q.tensors["score.weight"].load())  # full precision
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    ours = from_pretrained(out)
    assert isinstance(ours, Gemma2ForSequenceClassification)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours(ids) - ref).abs().max() <= 1e-4
    rep = verify(cls_dir, out, tolerance=Tolerance.lossy(max_kl=0.05, min_top1=0.5))
    assert rep.passed and rep.tokens == 1 and rep.ppl_a == 0.0  # one class-logit row, no perplexity


def test_gguf_export_refuses_a_classifier_unless_dropping_the_head(cls_dir, tmp_path):
    from gemma2_convert.pipeline.gguf import to_gguf
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    tok = make_tiny_spm(tmp_path / "tokenizer.model", 512)
    src = open_checkpoint(cls_dir)
    big = tmp_path / "cls512"
    # llama.cpp needs the vocabulary: give the classifier a vocabulary the tiny tokenizer covers
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.core.lazy import LazyTensor

    cfg = src.config.replace(vocab_size=512)
    big.mkdir()
    tensors = dict(src.tensors)
    emb = tensors["model.embed_tokens.weight"].load()
    tensors["model.embed_tokens.weight"] = LazyTensor.of(torch.cat([emb, emb.new_zeros(512 - emb.shape[0], emb.shape[1])]))
    write_hf_dir(big, cfg, list(tensors.items()))
    with pytest.raises(UnsupportedError, match=r"Gemma2ForSequenceClassification \(3 labels\).*--drop-head"):
        to_gguf(big, tmp_path / "x.gguf", type_name="f32", tokenizer=tok)
    assert not (tmp_path / "x.gguf").exists()
    r = subprocess.run([sys.executable, "-m", "gemma2_convert.cli.main", "to-gguf", str(big), str(tmp_path / "x.gguf"),
                        "--type", "f32", "--tokenizer", str(tok), "--drop-head"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dropping the sequence classification head" in r.stderr
    g = open_checkpoint(tmp_path / "x.gguf")
    assert g.config.head == "causal_lm" and "score.weight" not in g.tensors
    assert torch.equal(g.tensors["model.layers.0.mlp.up_proj.weight"].load(),
                       src.tensors["model.layers.0.mlp.up_proj.weight"].load())
