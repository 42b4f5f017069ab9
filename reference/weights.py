"""Weight access for the reference model: HF tensor names → tensors in the compute dtype.

Weights arrive as lazy tensors (usually zero-copy views of mmap'd files, or packed quantized
data whose ``load`` dequantizes). ``resident=True`` keeps each weight after its first cast
(one copy of the model at most, none when the file dtype already is the compute dtype) —
except packed weights, which stay packed and are dequantized each time a layer runs;
``resident=False`` re-reads every layer on every forward, so peak memory is one layer —
this is how a model larger than RAM is verified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from gemma2_convert.core.errors import TensorMismatchError, check_names
from gemma2_convert.core.lazy import LazyTensor
from reference.config import Gemma2Config

LAYER_TENSORS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
)


def expected_shapes(c: Gemma2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Gemma2ForCausalLM with its shape (spec §4.1)."""
    H, I = c.hidden_size, c.intermediate_size
    per_layer = dict(zip(LAYER_TENSORS, [
        (c.q_dim, H), (c.kv_dim, H), (c.kv_dim, H), (H, c.q_dim),
        (I, H), (I, H), (H, I), (H,), (H,), (H,), (H,),
    ]))
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    if c.head == "causal_lm" and not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    if c.head in ("sequence_classification", "token_classification"):
        shapes["score.weight"] = (c.num_labels, H)
    if c.head == "token_classification":
        shapes["score.bias"] = (c.num_labels,)  # transformers' token head is a Linear with bias
    return shapes


class WeightStore:
    """Named weights in one compute dtype, checked against the config when built."""

    def __init__(
        self, tensors: Mapping[str, LazyTensor], config: Gemma2Config, dtype: torch.dtype,
        resident: bool = True, source: str | None = None,
    ) -> None:
        shapes = expected_shapes(config)
        check_names(shapes, tensors, source)
        bad = [f"{n}: expected {list(s)}, got {list(tensors[n].shape)}"
               for n, s in shapes.items() if tuple(tensors[n].shape) != s]
        if bad:
            raise TensorMismatchError("shapes inconsistent with the config: " + "; ".join(sorted(bad)), source)
        self.tensors = dict(tensors)
        self.dtype = dtype
        self.resident = resident
        self._cache: dict[str, torch.Tensor] = {}
        self._held: dict[str, torch.Tensor] = {}

    def hold(self, loaded: Mapping[str, torch.Tensor]) -> None:
        """Use these already-loaded tensors (as ``LazyTensor.load`` returns them) instead of loading again,
        until ``release``: a caller that has just read a layer (to compare it) runs it from the same read."""
        self._held.update(loaded)

    def release(self) -> None:
        """Forget what ``hold`` gave."""
        self._held.clear()

    def _load(self, name: str) -> torch.Tensor:
        held = self._held.get(name)
        return held if held is not None else self.tensors[name].load()

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor in the compute dtype."""
        if name in self._cache:
            return self._cache[name]
        lt = self.tensors[name]
        t = self._load(name).to(self.dtype).contiguous()  # a strided view would change GEMM rounding
        if self.resident and not lt.packed:
            self._cache[name] = t
        return t

    def replace(self, name: str, t: torch.Tensor | None) -> None:
        """Use ``t`` for ``name`` from now on (None: back to the stored tensor), e.g. during calibration."""
        if t is None:
            self._cache.pop(name, None)
        else:
            self._cache[name] = t.to(self.dtype)

    def output_head(self) -> str:
        return "model.embed_tokens.weight" if "lm_head.weight" not in self.tensors else "lm_head.weight"

    def _row_reader(self, name: str) -> Callable[[int, int], torch.Tensor] | None:
        """``LazyTensor.rows`` of ``name`` when streaming it pays (a packed tensor not held): rows decoded
        on demand instead of the whole tensor."""
        if name in self._held:
            return None
        return self.tensors[name].rows

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows for ids [B, T] → [B, T, H], reading only those rows when streaming."""
        name = "model.embed_tokens.weight"
        if self.resident or name in self._cache:
            return torch.nn.functional.embedding(ids, self.get(name))
        rows = self._row_reader(name)
        if rows is not None:  # decode only the prompt's distinct rows: [U, H], then gather
            uniq, where = torch.unique(ids, return_inverse=True)
            table = torch.cat([rows(int(i), int(i) + 1) for i in uniq])  # [U, H]
            return torch.nn.functional.embedding(where, table).to(self.dtype)
        raw = self._load(name)
        return torch.nn.functional.embedding(ids, raw).to(self.dtype)

    def row_chunks(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, rows×cols slice in the compute dtype); the whole tensor at once when resident."""
        if self.resident or name in self._cache:
            yield 0, self.get(name)
            return
        reader = self._row_reader(name)
        raw = self._load(name) if reader is None else None
        for start in range(0, self.tensors[name].shape[0], rows):
            part = raw[start:start + rows] if raw is not None else reader(start, start + rows)  # type: ignore
            yield start, part.to(self.dtype).contiguous()
