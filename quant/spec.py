"""What one weight is quantized to: bits, group size, symmetry and the method that picks the codes.

A ``QuantSpec`` is the granularity dataclass of the quantization vocabulary
(``quant/qparams.py``). It is valid on its own (``__post_init__``) and checks a concrete
``[out, in]`` weight with ``check_shape`` before any work is done, so a bad request fails
with one message that names the tensor instead of a reshape error deep inside a method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gemma2_convert.core.errors import TensorMismatchError, UnsupportedError

BITS = (4, 5, 8)
"""Code widths; 5 bits is written only as GGUF Q5_0 / Q5_1 (the ``--bpw`` allocation's GPTQ,
``pipeline/typed_gptq.py``): the CLI's ``--bits`` offers 4 and 8."""
GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("rtn", "mse", "hqq", "gptq", "autoround")
"""The registered methods' names (``quant.methods.QUANTIZERS``, which imports this module, so it cannot be read
from here; tests/test_quant_methods.py holds the two equal)."""


class InvalidQuantSpecError(UnsupportedError):
    """A quantization request this toolkit cannot carry out (bits, group size or method)."""


class GroupShapeError(TensorMismatchError):
    """A weight's shape does not fit the requested grouping."""


@dataclass(frozen=True)
class QuantSpec:
    """Integer weight-only quantization of a ``[out, in]`` matrix.

    Codes are signed, ``q ∈ [-2^(bits-1), 2^(bits-1) - 1]``; the decode is
    ``x̂ = (q - zero) · scale`` with one ``(scale, zero)`` per group of ``group_size``
    consecutive input columns of a row (``quant/qparams.py`` states the full contract).
    """

    bits: int
    """Code width: 8, 5 (GGUF Q5_0 / Q5_1 only) or 4."""
    group_size: int | None
    """Input columns sharing one scale: 32, 64, 128 or 256; None = one scale per output row."""
    symmetric: bool = True
    """True: zero = 0 and only a scale is stored; False: an integer zero-point per group too."""
    method: str = "rtn"
    """How codes and qparams are chosen: 'rtn', 'mse', 'hqq', 'gptq' or 'autoround' (``quant/methods``)."""

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InvalidQuantSpecError(f"bits={self.bits!r} is not supported; choose one of {list(BITS)}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise InvalidQuantSpecError(
                f"group_size={self.group_size!r} is not supported; choose one of {list(GROUP_SIZES)} "
                "or None for one scale per output channel"
            )
        if self.method not in METHODS:
            raise InvalidQuantSpecError(f"method={self.method!r} is unknown; choose one of {list(METHODS)}")

    @property
    def qmin(self) -> int:
        """Smallest code, ``-2^(bits-1)``."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest code, ``2^(bits-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def strategy(self) -> str:
        """compressed-tensors' name for the granularity: 'group' or 'channel'."""
        return "channel" if self.group_size is None else "group"

    def group_len(self, in_features: int) -> int:
        """Columns per group for a weight with ``in_features`` columns."""
        return in_features if self.group_size is None else self.group_size

    def check_shape(self, name: str, shape: Sequence[int]) -> None:
        """Raise GroupShapeError unless ``shape`` is a 2-D ``[out, in]`` with ``in % group_size == 0``."""
        if len(shape) != 2:
            raise GroupShapeError(
                f"{name}: quantization needs a 2-D [out, in] weight, got shape {list(shape)}; "
                "leave this tensor unquantized in the policy"
            )
        out_f, in_f = shape
        if self.group_size is not None and in_f % self.group_size:
            raise GroupShapeError(
                f"{name}: shape {list(shape)} has in_features={in_f}, not a multiple of "
                f"group_size={self.group_size}; pick a group size that divides {in_f} or None (per channel)"
            )
        if out_f <= 0 or in_f <= 0:
            raise GroupShapeError(f"{name}: empty weight of shape {list(shape)} cannot be quantized")

    def label(self) -> str:
        """Short human-readable form, e.g. ``int4-g128-asym-gptq``."""
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}-{self.method}"
