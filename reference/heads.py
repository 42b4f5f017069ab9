"""Classification heads on the Gemma 2 decoder, and ``CLASSES``: the class for each config ``head``.

As transformers' generic heads (``modeling_layers.py``): a linear ``score`` [num_labels, H] on the
final-normed hidden states (with a bias for token classification only); no logit softcap. Sequence classification pools the rightmost
token that is not padding (works for left and right padding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from reference.cache import HybridCache
from reference.model import Gemma2ForCausalLM, Gemma2Model, Rows
from reference.outputs import ClassifierOutput, finish


def last_token_index(input_ids: torch.Tensor | None, pad_token_id: int | None, batch: int) -> torch.Tensor:
    """Index [B] of the rightmost non-pad token of each row (the last position without ids)."""
    if input_ids is None or pad_token_id is None:
        return torch.full((batch,), -1, dtype=torch.long)
    idx = torch.arange(input_ids.shape[-1])
    return (idx * (input_ids != pad_token_id)).argmax(-1)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """Regression (one label), single-label cross-entropy (integer labels) or multi-label BCE."""
    n = logits.shape[-1]
    if problem_type is None:
        problem_type = ("regression" if n == 1 else "single_label_classification"
                        if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, n), labels.view(-1), ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits, labels)


class _ClassifierBase(Gemma2Model):
    def _common(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, past_key_values: HybridCache | None,
                inputs_embeds: torch.Tensor | None, use_cache: bool | None, output_attentions: bool,
                output_hidden_states: bool, cache_position: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        out = self.decode(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                          output_attentions, output_hidden_states, cache_position)
        return out, self._score(out.last_hidden_state)

    def _score(self, h: torch.Tensor) -> torch.Tensor:
        """The linear head on final-normed hidden states [B, T, H] → [B, T, num_labels], activation dtype."""
        bias = self.weights.get("score.bias") if "score.bias" in self.weights.tensors else None
        return F.linear(h, self.weights.get("score.weight"), bias)


class Gemma2ForSequenceClassification(_ClassifierBase):
    """One label vector per sequence, from its last non-padding token."""

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool | None = None,
                cache_position: torch.Tensor | None = None) -> Any:
        """Class logits float32 [B, num_labels] (see reference.model's return rule)."""
        out, scores = self._common(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                   use_cache, output_attentions, output_hidden_states, cache_position)
        B = scores.shape[0]
        pooled = scores[torch.arange(B), last_token_index(input_ids, self.config.pad_token_id, B)]  # [B, C]
        loss = sequence_classification_loss(pooled, labels, self.config.problem_type) if labels is not None else None
        rec = ClassifierOutput(loss, pooled.float(), out.past_key_values, out.hidden_states, out.attentions)
        extras = labels is not None or output_attentions or output_hidden_states or bool(use_cache)
        return finish(rec, rec.logits, return_dict, extras)

    def verify_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self(ids), None  # [1, num_labels]

    def head_rows(self, hs: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[Rows]:
        out = []
        for h, ids in zip(hs, prompts):
            scores = self._score(h)  # [1, T, C]
            out.append((scores[torch.arange(1), last_token_index(ids, self.config.pad_token_id, 1)].float(), None))
        return out


class Gemma2ForTokenClassification(_ClassifierBase):
    """One label vector per token."""

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool | None = None,
                cache_position: torch.Tensor | None = None) -> Any:
        """Token logits float32 [B, T, num_labels]; ``labels`` [B, T] with -100 ignored."""
        out, scores = self._common(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                   use_cache, output_attentions, output_hidden_states, cache_position)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), labels.reshape(-1), ignore_index=-100)
        rec = ClassifierOutput(loss, scores.float(), out.past_key_values, out.hidden_states, out.attentions)
        extras = labels is not None or output_attentions or output_hidden_states or bool(use_cache)
        return finish(rec, rec.logits, return_dict, extras)

    def head_rows(self, hs: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[Rows]:
        return [(self._score(h).float()[0], None) for h in hs]


CLASSES: dict[str, type[Gemma2Model]] = {
    "causal_lm": Gemma2ForCausalLM, "base": Gemma2Model,
    "sequence_classification": Gemma2ForSequenceClassification,
    "token_classification": Gemma2ForTokenClassification,
}
