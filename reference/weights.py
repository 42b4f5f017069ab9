"""Weight access for the reference model: HF tensor names → tensors in the compute dtype.

Weights arrive as lazy tensors (usually zero-copy views of mmap'd files, or packed quantized
data whose ``load`` dequantizes). ``resident=True`` keeps each weight after its first cast
(one copy of the model at most, none when the file dtype already is the compute dtype) —
except packed weights, which stay packed and are dequantized each time a layer runs;
``resident=False`` re-reads every layer on every forward, so peak memory is one layer —
this is how a model larger than RAM is verified.

Casts of streamed weights reuse memory (a fresh multi-hundred-MB cast costs more in page faults than the cast
itself): ``row_chunks`` casts a streamed tensor a cache-sized slice at a time into one buffer, and while a
caller holds a layer (``hold`` … ``release``) the casts ``get`` makes go to the buffers of a ``CastPool``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from gemma2_convert.core.errors import TensorMismatchError, check_names
from gemma2_convert.core.lazy import LazyTensor
from reference.config import Gemma2Config

CAST_SLICE_BYTES = 8 << 20
"""Bytes of one cast slice of a streamed tensor (``row_chunks``, ``cast_slices``): it stays in the CPU's cache
between the cast and the matmul that reads it."""

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


class CastPool:
    """Buffers for weights cast to a compute dtype, lent for one layer and reused by the next layers (which
    have the same shapes); at most ``budget`` bytes are kept, beyond that a cast gets fresh memory. Stores may
    share one pool (the budget is then theirs together)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.kept = budget, 0
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A buffer of this shape and dtype (contents undefined), or None when the budget is spent."""
        free = self.free.get((shape, dtype))
        if free:
            return free.pop()
        need = math.prod(shape) * dtype.itemsize
        if self.kept + need > self.budget:
            return None
        self.kept += need
        return torch.empty(shape, dtype=dtype)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        for b in buffers:
            self.free.setdefault((tuple(b.shape), b.dtype), []).append(b)


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
        self.pool: CastPool | None = None
        """Where ``get`` casts while a layer is held (None: fresh memory); set by the caller of ``hold``."""
        self._holding = False
        self._lent: list[torch.Tensor] = []

    def hold(self, loaded: Mapping[str, torch.Tensor]) -> None:
        """Use these already-loaded tensors (as ``LazyTensor.load`` returns them) instead of loading again,
        until ``release``: a caller that has just read a layer (to compare it) runs it from the same read.
        Until ``release``, ``get`` may cast into ``pool`` buffers: what it returns is valid until then."""
        self._held.update(loaded)
        self._holding = True

    def release(self) -> None:
        """Forget what ``hold`` gave; the pool's buffers ``get`` lent since are reused from now on."""
        self._held.clear()
        self._holding = False
        if self.pool is not None:
            self.pool.give_back(self._lent)
        self._lent.clear()

    def _load(self, name: str) -> torch.Tensor:
        held = self._held.get(name)
        return held if held is not None else self.tensors[name].load()

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor in the compute dtype."""
        if name in self._cache:
            return self._cache[name]
        raw = self._load(name)
        buf = self._lend(raw)
        if buf is not None:
            return buf.copy_(raw)  # contiguous: a strided view would change GEMM rounding
        t = raw.to(self.dtype).contiguous()
        if self.keeps(name):
            self._cache[name] = t
        return t

    def keeps(self, name: str) -> bool:
        """Whether ``get(name)`` returns the same kept tensor on every call (resident, not packed)."""
        return self.resident and not self.tensors[name].packed

    def _lend(self, raw: torch.Tensor) -> torch.Tensor | None:
        """A pool buffer for ``raw``'s cast while a layer is held (None: fresh memory, or no cast)."""
        if self.pool is None or not self._holding or self.resident or raw.dtype == self.dtype:
            return None
        buf = self.pool.take(tuple(raw.shape), self.dtype)
        if buf is not None:
            self._lent.append(buf)
        return buf

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
        """(start, slice of about ``rows`` rows or fewer in the compute dtype), in order; the whole tensor at
        once when resident. Rows needing a cast come in ``cast_slices``: each is valid until the next one."""
        if self.resident or name in self._cache:
            yield 0, self.get(name)
            return
        reader = self._row_reader(name)
        n = self.tensors[name].shape[0]
        raw = self._load(name) if reader is None else None
        if raw is not None and raw.dtype != self.dtype:  # the whole tensor in slices: none short but the last
            yield from cast_slices(raw, self.dtype, rows)
            return
        for start in range(0, n, rows):
            part = raw[start:start + rows] if raw is not None else reader(start, start + rows)  # type: ignore
            if part.dtype == self.dtype:
                yield start, part.contiguous()  # a strided view would change GEMM rounding
            else:
                yield from ((start + i, t) for i, t in cast_slices(part, self.dtype, rows))


SLICE_ROWS = 64
"""Cast slices have a multiple of this many rows, at least this many: MKL's float32 GEMM then gives every
output column the bits of one GEMM over the whole matrix (measured: 64 to 32768 rows, K 40 to 14336, 1 to 257
positions, 1 and 2 threads); under 32 rows it may not."""


def cast_slices(t: torch.Tensor, dtype: torch.dtype, most: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows of ``t`` cast to ``dtype``) in slices of about ``CAST_SLICE_BYTES`` (``most`` rows at
    most), all cast into one buffer (each slice valid until the next): the slice is still in the CPU's cache
    when the matmul reads it, and no fresh memory is touched. A remainder under ``SLICE_ROWS`` joins the
    slice before it."""
    n, row_bytes = t.shape[0], max(1, math.prod(t.shape[1:]) * dtype.itemsize)
    step = min(most, max(SLICE_ROWS, CAST_SLICE_BYTES // row_bytes // SLICE_ROWS * SLICE_ROWS))
    buf = torch.empty((min(n, step + SLICE_ROWS - 1), *t.shape[1:]), dtype=dtype)  # [S, cols]
    i = 0
    while i < n:
        stop = n if n - i < step + SLICE_ROWS else i + step
        yield i, buf[:stop - i].copy_(t[i:stop])
        i = stop
