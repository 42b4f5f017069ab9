"""Output records in the transformers style (field names as in ``transformers.modeling_outputs``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from reference.cache import HybridCache


@dataclass
class ModelOutput:
    """Base: attribute access, and ``to_tuple()`` of the fields that are set (transformers' tuple order)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i: int) -> Any:
        return self.to_tuple()[i]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    past_key_values: HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """Embedding output, then each layer's output; the last entry is the final-normed state."""
    attentions: tuple[torch.Tensor, ...] | None = None
    """Per layer: softmax probabilities [B, N, T, S] in the activation dtype."""


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def finish(out: ModelOutput, main: torch.Tensor, return_dict: bool | None, extras: bool) -> Any:
    """The house return rule: the main tensor when nothing else was asked for (``return_dict=None``),
    the record with ``return_dict=True`` or when extras were requested, a tuple with ``False``."""
    if return_dict is False:
        return out.to_tuple()
    if return_dict or extras:
        return out
    return main
