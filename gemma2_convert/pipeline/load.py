"""``from_pretrained``: open any checkpoint the project reads and wrap it as a reference model.

The reference classes take tensors, never paths; this is where a path becomes a
``WeightStore`` over the reader's ``{HF name: LazyTensor}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, overload

import torch

from gemma2_convert.core.lazy import dtype_nbytes
from gemma2_convert.core.memory import fits_resident
from gemma2_convert.formats import open_checkpoint
from reference.heads import CLASSES
from reference.model import Gemma2Model
from reference.weights import WeightStore

HEAD_TENSORS = ("lm_head.weight", "score.weight", "score.bias")
"""Tensors of an output head, which a bare ``Gemma2Model`` opened from a headed checkpoint ignores."""

M = TypeVar("M", bound=Gemma2Model)


@overload
def from_pretrained(path: str | Path, cls: None = None, *, dtype: torch.dtype = ...,
                    resident: bool | None = ..., **options: Any) -> Gemma2Model: ...
@overload
def from_pretrained(path: str | Path, cls: type[M], *, dtype: torch.dtype = ...,
                    resident: bool | None = ..., **options: Any) -> M: ...


def from_pretrained(
    path: str | Path, cls: type[Gemma2Model] | None = None, *, dtype: torch.dtype = torch.float32,
    resident: bool | None = None, **options: Any,
) -> Gemma2Model:
    """Open ``path`` lazily (format auto-detected) as ``cls``, or as the class its config's
    ``architectures`` names when ``cls`` is None.

    ``resident=None`` keeps weights after first use when the model fits comfortably in RAM
    (:func:`gemma2_convert.core.memory.fits_resident`) and streams them layer by layer from the
    mmap'd files otherwise. ``options`` go to the reader (``format=``, ``options=ShapeOptions(...)``,
    ``tokenizer=``). A bare ``Gemma2Model`` ignores any head tensors; other mismatches (e.g. a
    classification class on a causal-LM checkpoint without ``score.weight``) are errors naming the
    missing tensors. The opened ``Checkpoint`` is kept as ``model.checkpoint``.
    """
    ckpt = open_checkpoint(path, **options)
    if cls is None:
        cls = CLASSES[ckpt.config.head]
    elif ckpt.config.architectures[0] != cls.__name__:
        ckpt.config = ckpt.config.replace(architectures=(cls.__name__,))
        if ckpt.config.head == "base":
            ckpt.tensors = {k: v for k, v in ckpt.tensors.items() if k not in HEAD_TENSORS}
    if resident is None:
        resident = fits_resident(sum(t.numel for t in ckpt.tensors.values()) * dtype_nbytes(dtype))
    store = WeightStore(ckpt.tensors, ckpt.config, dtype, resident, source=str(ckpt.path))
    model = cls(ckpt.config, store)
    model.checkpoint = ckpt
    return model
