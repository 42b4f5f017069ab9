"""Quantized tensors that stay quantized: what a reader hands out for a block-quantized weight.

A ``QuantTensor`` is a ``LazyTensor`` (``load()`` decodes it, so every consumer that wants floats works
unchanged) that also gives its codes: ``codes() -> QuantCodes``, read from the file and never decoded, so a
transcoder can move the same numbers into another layout. One vocabulary for every source:

* ``u``: unsigned codes ``[out, in]`` uint8 in ``[0, 2^bits - 1]``; groups of ``group_size`` along ``in``;
* ``scale``: ``[out, in/g]`` float (the stored dtype: fp16 for GGUF blocks, the model's for the others);
* ``offset`` by ``kind``:

  ==========  ==============================  ======================================================
  kind        offset                          decode (op for op as the source's own dequantizer)
  ==========  ==============================  ======================================================
  ``sym``     None                            ``(u - 2^(b-1)) · scale``  (CT sym, GGUF Q4_0/Q5_0/Q8_0/Q6_K/Q3_K)
  ``asym``    int16 zero ``[out, G]``          ``(u - zero) · scale``    (CT asymmetric: ``zero = z + 2^(b-1)``)
  ``affine``  float bias ``[out, G]``          ``scale · u + bias``      (MLX, GGUF Q4_1/Q5_1, Q4_K/Q5_K/Q2_K)
  ==========  ==============================  ======================================================

``layout`` names the source layout (``compressed-tensors``, ``mlx``, ``gguf:Q4_0``…) for reports and errors.
A dequantized ``sym``/``asym`` value is computed in the scale dtype, as compressed-tensors does; GGUF's are
float32 (its fp16 scales are widened first): its readers hand out float32 scales (a K-quant's are the
float32 products of its super-block and sub-block scales, ``quant/gguf_kcodes.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gemma2_convert.core.lazy import LazyTensor

KINDS = ("sym", "asym", "affine")


@dataclass(frozen=True)
class QuantCodes:
    """One tensor's codes and parameters (see the module docstring)."""

    u: Tensor
    scale: Tensor
    offset: Tensor | None
    kind: str
    bits: int

    @property
    def group_size(self) -> int:
        return self.u.shape[1] // self.scale.shape[1]

    def dequantize(self, out: Tensor | None = None) -> Tensor:
        """The float ``[out, in]`` weight in ``scale.dtype`` (codes and zero-points are integers ≤ 255, exact in
        every float dtype, so ``u - zero`` in the scale dtype is compressed-tensors' ``q - z``); ``out``: a
        contiguous ``[out, in]`` tensor of that dtype to decode into."""
        out_f, in_f = self.u.shape
        g = self.group_size
        u = self.u.reshape(out_f, in_f // g, g)
        x = u.to(self.scale.dtype) if out is None else out.view(out_f, in_f // g, g).copy_(u)  # [out, G, g]
        if self.kind == "affine":  # in place: the same two roundings as ``x * scale + bias``
            assert self.offset is not None
            return x.mul_(self.scale[..., None]).add_(self.offset[..., None]).reshape(out_f, in_f)
        if self.kind == "sym":
            x -= float(1 << (self.bits - 1))
        else:
            assert self.offset is not None
            x -= self.offset.to(self.scale.dtype)[..., None]
        return x.mul_(self.scale[..., None]).reshape(out_f, in_f)

    def exact(self) -> Tensor:
        """The values the codes stand for, in float64 (exact: small integers times fp32/fp16/bf16 parameters,
        before any decoder rounds them): what a lossless transcode must preserve."""
        out_f, in_f = self.u.shape
        g = self.group_size
        x = self.u.reshape(out_f, in_f // g, g).double()             # [out, G, g]
        s = self.scale.double()[..., None]
        if self.kind == "affine":
            return (x * s + self.offset.double()[..., None]).reshape(out_f, in_f)  # type: ignore[union-attr]
        zero = float(1 << (self.bits - 1)) if self.kind == "sym" else self.offset.double()[..., None]  # type: ignore
        return ((x - zero) * s).reshape(out_f, in_f)


    def line(self) -> tuple[Tensor, Tensor]:
        """Each group as the line ``a·u + b`` its codes are decoded on, ``(a, b)`` float64 ``[out, G]``
        (exact): two groups with the same codes stand for the same values when their lines are equal."""
        a = self.scale.double()
        if self.kind == "affine":
            return a, self.offset.double()  # type: ignore[union-attr]
        zero = float(1 << (self.bits - 1)) if self.kind == "sym" else self.offset.double()  # type: ignore[union-attr]
        return a, -zero * a


@dataclass(frozen=True)
class QuantTensor(LazyTensor):
    """A lazy weight whose quantized codes can be read without decoding (``codes``)."""

    codes: Callable[[], QuantCodes] | None = None
    kind: str = "sym"
    bits: int = 4
    group_size: int = 32
    layout: str = ""
    """The source layout: ``compressed-tensors``, ``mlx``, ``gguf:Q4_0`` …"""
    blocks: Callable[[], Tensor] | None = None
    """A GGUF source's stored block bytes (uint8, flat): what a GGUF target of the same type copies."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; choose one of {list(KINDS)}")

    @property
    def label(self) -> str:
        return f"{self.layout} {self.kind} {self.bits}-bit g{self.group_size}"


def quant_tensor(shape: tuple[int, ...], dtype: torch.dtype, codes: Callable[[], QuantCodes], *, kind: str,
                 bits: int, group_size: int, layout: str, stored_nbytes: int | None,
                 prefetch: Callable[[], None] | None = None,
                 rows: Callable[[int, int], torch.Tensor] | None = None,
                 blocks: Callable[[], Tensor] | None = None) -> QuantTensor:
    """A ``QuantTensor`` whose ``load()`` decodes ``codes()`` into ``dtype``; ``stored_nbytes`` None: the
    consumers treat it as a plain tensor (the reference may keep it decoded), as GGUF's always were."""
    return QuantTensor(tuple(shape), dtype, lambda: codes().dequantize().to(dtype), stored_nbytes, prefetch,
                       rows, codes=codes, kind=kind, bits=bits, group_size=group_size, layout=layout,
                       blocks=blocks)
