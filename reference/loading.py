"""``from_pretrained``: open any supported checkpoint and wrap it for the reference forward pass."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from gemma2_convert.core.lazy import dtype_nbytes
from reference.weights import WeightStore

if TYPE_CHECKING:
    from reference.model import Gemma2Model

RESIDENT_FRACTION = 0.5  # keep weights in RAM when their compute-dtype size is below this share of RAM


def available_memory() -> int:
    """Bytes of physical memory currently available (MemAvailable), or total RAM as a fallback."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


HEAD_TENSORS = ("lm_head.weight", "score.weight", "score.bias")


def open_for_reference(
    cls: type[Gemma2Model] | None, path: str, dtype: torch.dtype, resident: bool | None, **options: Any,
) -> Gemma2Model:
    """Open ``path`` as ``cls``, or as the class its config's ``architectures`` names when cls is None.

    A bare ``Gemma2Model`` ignores any head tensors; other mismatches (e.g. a classification class on a
    causal-LM checkpoint without ``score.weight``) are errors naming the missing tensors.
    """
    from gemma2_convert.formats import open_checkpoint
    from reference.heads import CLASSES

    ckpt = open_checkpoint(path, **options)
    if cls is None:
        cls = CLASSES[ckpt.config.head]
    elif ckpt.config.architectures[0] != cls.__name__:
        ckpt.config = ckpt.config.replace(architectures=(cls.__name__,))
        if ckpt.config.head == "base":
            ckpt.tensors = {k: v for k, v in ckpt.tensors.items() if k not in HEAD_TENSORS}
    if resident is None:
        size = sum(t.numel for t in ckpt.tensors.values()) * dtype_nbytes(dtype)
        resident = size < RESIDENT_FRACTION * available_memory()
    store = WeightStore(ckpt.tensors, ckpt.config, dtype, resident, source=str(ckpt.path))
    model = cls(ckpt.config, store)
    model.checkpoint = ckpt
    return model
