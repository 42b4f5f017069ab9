"""bf16 weights packed once in oneDNN's layout (reference.packing): the same bits as ``F.linear``, for every
Gemma 2 shape and in the whole model, kept only for resident weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import Gemma2ForCausalLM, HybridCache
from reference.packing import Packer, can_pack, pack, packed_linear
from tests.conftest import TINY_CONFIGS, hf_state_dict, make_hf_model

if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
    pytest.skip("this CPU has no oneDNN bf16 kernels: the reference does not pack", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # the shape check sets its own thread counts

SHAPES = {  # [N, K] of each linear weight
    "2b": {"q": (2048, 2304), "kv": (1024, 2304), "o": (2304, 2048), "up": (9216, 2304),
           "down": (2304, 9216)},
    "9b": {"q": (4096, 3584), "kv": (2048, 3584), "o": (3584, 4096), "up": (14336, 3584),
           "down": (3584, 14336)},
    "27b": {"q": (4096, 4608), "kv": (2048, 4608), "o": (4608, 4096), "up": (36864, 4608),
            "down": (4608, 36864)},
}


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _check_shapes(shapes: dict[str, tuple[int, int]], tokens: tuple[int, ...]) -> list[str]:
    g = torch.Generator().manual_seed(0)
    bad = []
    for name, (N, K) in shapes.items():
        w = (torch.rand(N, K, generator=g) - 0.5).to(torch.bfloat16)  # rand: quicker than randn
        p = pack(w)
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for T in tokens:
                x = torch.randn(1, T, K, generator=g).to(torch.bfloat16)
                a, b = F.linear(x, w), packed_linear(x, p)
                if not torch.equal(a, b):
                    bad.append(f"{name} [{N}, {K}] T={T} threads={n_threads}: max |Δ| "
                               f"{(a.float() - b.float()).abs().max().item():.3e}")
    return bad


@pytest.mark.parametrize("size", ["2b", pytest.param("9b", marks=pytest.mark.slow),
                                  pytest.param("27b", marks=pytest.mark.slow)])
def test_packed_product_is_f_linear_bitwise(size, threads):
    """Decode (1 token), an odd prompt and a 16-token prompt, on 1 and 2 threads."""
    bad = _check_shapes(SHAPES[size], (1, 7, 16))
    assert not bad, "packed products differ from F.linear: " + "; ".join(bad)


def test_packed_product_handles_batches_and_strided_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 9, 64, generator=g).to(torch.bfloat16)
    p = pack(w)
    assert torch.equal(packed_linear(x, p), F.linear(x, w))
    assert torch.equal(packed_linear(x[:, 2:5], p), F.linear(x[:, 2:5], w))  # a strided slice


def test_fp32_and_gradients_are_not_packed():
    w = torch.randn(8, 4)
    assert not can_pack(w, [torch.randn(1, 4)])
    wb = torch.randn(8, 4).to(torch.bfloat16)
    assert can_pack(wb, [torch.randn(1, 4).to(torch.bfloat16)])
    assert not can_pack(wb, [torch.randn(1, 4).to(torch.bfloat16).requires_grad_()])


def _bf16_model(name: str, resident: bool = True) -> Gemma2ForCausalLM:
    cfg = TINY_CONFIGS[name]
    sd = hf_state_dict(make_hf_model(cfg, seed=11))
    return Gemma2ForCausalLM.from_tensors(cfg, sd, dtype=torch.bfloat16, resident=resident)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_packed_model_equals_unpacked_bitwise(name):
    """Prefill then cached decode steps: the packed model's logits equal those of the same model without
    packing (every product through F.linear), bit for bit; every linear weight is kept packed."""
    packed, plain = _bf16_model(name), _bf16_model(name)
    plain.packer.keep = False
    cfg = packed.config
    T = 2 * cfg.sliding_window + 3
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    got, want, c1, c2 = [], [], HybridCache(cfg), HybridCache(cfg)
    for a, b in [(0, 5), *((t, t + 1) for t in range(5, ids.shape[1]))]:
        got.append(packed(ids[:, a:b], cache=c1))
        want.append(plain(ids[:, a:b], cache=c2))
    bad = [i for i, (x, y) in enumerate(zip(got, want)) if not torch.equal(x, y)]
    assert not bad, f"steps {bad} differ; the first by {(got[bad[0]] - want[bad[0]]).abs().max().item():.3e}"
    assert len(packed.packer.kept()) == 7 * cfg.num_hidden_layers + 1  # the projections and the tied head
    assert plain.packer.kept() == []


def test_streamed_weights_are_not_kept_and_streams_share_a_pack():
    """resident=False: nothing stays packed; several streams through one layer (verify's prompts) equal
    each prompt run alone."""
    model, alone = _bf16_model("gqa2", resident=False), _bf16_model("gqa2", resident=False)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (1, T), generator=g) for T in (5, 12)]
    streams = [model.start(x) for x in prompts]
    for i in range(cfg.num_hidden_layers):
        model.run_layer(i, streams)
    rows = model.finish_streams(streams, prompts)
    for (out, _), x in zip(rows, prompts):
        assert torch.equal(out, alone.verify_outputs(x)[0])
    assert model.packer.kept() == []


def test_replaced_weight_is_repacked():
    """A weight replaced after packing (calibration does this) is used, not its stale packed copy."""
    model = _bf16_model("gqa2")
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    before = model(ids)
    name = "model.layers.1.mlp.up_proj.weight"
    new = model.weights.get(name).flip(0)  # (a scale would vanish in the next norm)
    model.weights.replace(name, new)
    after = model(ids)
    fresh = _bf16_model("gqa2")
    fresh.weights.replace(name, new)
    fresh.packer.keep = False
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(ids))


def test_nothing_is_kept_packed_when_it_would_not_fit():
    model = _bf16_model("gqa2")
    model.packer = Packer(1 << 60)  # more than any machine has
    model(torch.tensor([[1, 2, 3]]))
    assert model.packer.keep is False and model.packer.kept() == []
