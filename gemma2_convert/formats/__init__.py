"""Readers and writers, one module per format; importing this package registers every reader."""

from gemma2_convert.formats import hf  # noqa: F401  (registers the reader)
from gemma2_convert.formats.registry import READERS, Checkpoint, detect_format, open_checkpoint

__all__ = ["READERS", "Checkpoint", "detect_format", "open_checkpoint"]
