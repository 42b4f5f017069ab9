"""Reference Gemma 2: configuration and an exact, plain-PyTorch forward pass."""

from reference.cache import HybridCache
from reference.config import PRESETS, Gemma2Config
from reference.model import Gemma2ForCausalLM

__all__ = ["PRESETS", "Gemma2Config", "Gemma2ForCausalLM", "HybridCache"]
