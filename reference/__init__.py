"""Reference Gemma 2: configuration and an exact, plain-PyTorch forward pass over given tensors.

Opening a checkpoint file is the pipeline's job (``from_pretrained`` in ``pipeline/load.py``), which hands
these classes its tensors.
"""

from reference.cache import HybridCache
from reference.config import PRESETS, Gemma2Config
from reference.heads import Gemma2ForSequenceClassification, Gemma2ForTokenClassification
from reference.model import Gemma2ForCausalLM, Gemma2Model

__all__ = [
    "PRESETS", "Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification", "Gemma2Model", "HybridCache",
]
