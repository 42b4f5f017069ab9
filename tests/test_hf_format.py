"""HF directories: our writer's output loads in transformers with identical tensors and logits."""

from __future__ import annotations

import json

import pytest
import torch

from gemma2_convert.core.errors import FormatError, TensorMismatchError
from gemma2_convert.formats import open_checkpoint
from gemma2_convert.formats.hf import write_hf_dir
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.pipeline.load import from_pretrained
from reference import Gemma2ForCausalLM
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model


@pytest.mark.parametrize("shard", ["5GB", "40KB"])
def test_written_dir_loads_in_transformers(tmp_path, shard):
    import transformers

    cfg = TINY_CONFIGS["gqa2"]
    sd = hf_state_dict(make_hf_model(cfg))
    write_hf_dir(tmp_path, cfg, [(k, LazyTensor.of(v)) for k, v in sd.items()], max_shard_size=shard)
    if shard == "40KB":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    for k, v in hf_state_dict(hf).items():
        assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = from_pretrained(tmp_path, Gemma2ForCausalLM)(ids)
    assert (ours - ref).abs().max() <= 1e-4
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["torch_dtype"] == "float32" and cfg_json["query_pre_attn_scalar"] == 24


def test_reader_is_zero_copy_and_strict(tmp_path):
    cfg = TINY_CONFIGS["mha"]
    sd = hf_state_dict(make_hf_model(cfg))
    write_hf_dir(tmp_path, cfg, [(k, LazyTensor.of(v)) for k, v in sd.items()])
    ck = open_checkpoint(tmp_path)
    assert ck.format == "hf" and set(ck.tensors) == set(sd)
    a = ck.tensors["model.norm.weight"].load()
    b = ck.tensors["model.norm.weight"].load()
    assert a.data_ptr() == b.data_ptr()  # both views of the same mmap
    missing = {k: v for k, v in ck.tensors.items() if "layers.1." not in k}
    with pytest.raises(TensorMismatchError, match=r"missing 11 tensors: model\.layers\.1\.input_layernorm"):
        Gemma2ForCausalLM(cfg, __import__("reference.weights", fromlist=["x"]).WeightStore(missing, cfg, torch.float32))


def test_missing_shard_is_named(tmp_path):
    cfg = TINY_CONFIGS["mha"]
    sd = hf_state_dict(make_hf_model(cfg))
    write_hf_dir(tmp_path, cfg, [(k, LazyTensor.of(v)) for k, v in sd.items()], max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(FormatError, match=rf"index points at missing shard\(s\): {shards[1].name}"):
        open_checkpoint(tmp_path)
