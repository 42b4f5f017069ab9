"""Reference Gemma 2: configuration and an exact, plain-PyTorch forward pass."""

from reference.cache import HybridCache
from reference.config import PRESETS, Gemma2Config
from reference.heads import AutoModel, Gemma2ForSequenceClassification, Gemma2ForTokenClassification
from reference.model import Gemma2ForCausalLM, Gemma2Model

__all__ = [
    "PRESETS", "AutoModel", "Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification", "Gemma2Model", "HybridCache", "from_pretrained",
]


def from_pretrained(path: str, **kwargs: object) -> Gemma2Model:
    """Open any supported checkpoint as the class its config names (see :class:`AutoModel`)."""
    return AutoModel.from_pretrained(path, **kwargs)  # type: ignore[arg-type]
