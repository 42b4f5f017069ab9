"""Which tensor gets which precision: one predicate ``(name, shape) -> QuantSpec | None``.

Names are HF Gemma 2 tensor names. ``None`` means "store unquantized".

* The seven decoder Linear weights of every layer
  (``model.layers.N.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.N.mlp.{gate,up,down}_proj.weight``)
  get the requested spec.
* ``model.embed_tokens.weight`` is also Gemma 2's tied output head, the most sensitive matrix of the
  model (../shared/spec/PITFALLS.md (b), "Tied 256k embedding / output"). ``embedding='keep'`` (default)
  leaves it alone; ``'int8'`` gives int8 symmetric per-row (per-token) RTN; ``'int4'`` gives 4 bits
  with the requested group size and symmetry. A calibration method ('gptq') has no Hessian for an
  embedding lookup, so the embedding then falls back to 'mse'. An untied ``lm_head.weight`` follows
  the same option. ``'q6_k'`` (GGUF only) keeps it out of the policy here; the GGUF writer stores it as
  Q6_K, llama.cpp's own type for the output head of its Q4_0/Q4_1 files, for comparisons at equal size.
* Norms, ``score.weight`` (a classification head) and anything else are kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gemma2_convert.core.errors import UnsupportedError
from quant.spec import QuantSpec

LINEAR_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
EMBEDDING_OPTIONS = ("keep", "int8", "int4", "q6_k")
CALIBRATION_FREE = ("rtn", "mse", "hqq")


def is_decoder_linear(name: str) -> bool:
    """True for the seven per-layer projection weights."""
    return LINEAR_RE.match(name) is not None


def default_policy(
    name: str, shape: Sequence[int], *, bits: int, group_size: int | None, symmetric: bool,
    method: str, embedding: str = "keep",
) -> QuantSpec | None:
    """The spec for tensor ``name`` of ``shape``, or None to keep it; raises if the shape cannot be grouped."""
    if embedding not in EMBEDDING_OPTIONS:
        raise UnsupportedError(f"embedding={embedding!r}; choose one of {list(EMBEDDING_OPTIONS)}")
    if is_decoder_linear(name):
        spec = QuantSpec(bits, group_size, symmetric, method)
    elif name in EMBEDDING_NAMES and embedding not in ("keep", "q6_k"):
        emb_method = method if method in CALIBRATION_FREE else "mse"
        spec = (
            QuantSpec(8, None, True, "rtn") if embedding == "int8"
            else QuantSpec(4, group_size, symmetric, emb_method)
        )
    else:
        return None
    spec.check_shape(name, tuple(shape))
    return spec
