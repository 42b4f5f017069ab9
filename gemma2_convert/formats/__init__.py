"""Readers and writers, one module per format; importing this package registers every reader.

Each reader's ``detect`` looks at the container (an HF directory, a safetensors file whose metadata
holds a config, a torch.save zip archive), so at most one claims a path.
"""

from gemma2_convert.formats import hf  # noqa: F401  (registers the reader)
from gemma2_convert.formats import single_safetensors  # noqa: F401
from gemma2_convert.formats import gemma_pytorch  # noqa: F401
from gemma2_convert.formats import orbax  # noqa: F401  (tensorstore is imported only when reading)
import gemma2_convert.formats.gguf.reader as gguf_reader  # noqa: F401
from gemma2_convert.formats.registry import READERS, Checkpoint, detect_format, open_checkpoint

__all__ = ["READERS", "Checkpoint", "detect_format", "open_checkpoint"]
