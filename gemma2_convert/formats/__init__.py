"""Readers and writers, one module per format, registered here in one place (``registry.READERS`` and
``registry.WRITERS``).

Each reader's ``detect`` looks at the container (an HF directory, a safetensors file whose metadata
holds a config, a torch.save zip archive), so at most one claims a path.
"""

# Readers are tried in this order by detect_format.
from gemma2_convert.formats import hf  # noqa: F401, I001  (reader and writer)
from gemma2_convert.formats import single_safetensors  # noqa: F401  (reader and writer)
from gemma2_convert.formats import gemma_pytorch  # noqa: F401  (reader)
from gemma2_convert.formats import orbax, orbax_writer  # noqa: F401  (reader; writer)
from gemma2_convert.formats import keras, keras_writer  # noqa: F401  (reader; writer)
from gemma2_convert.formats.gguf import reader as gguf_reader, output as gguf_output  # noqa: F401
from gemma2_convert.formats import mlx_reader, mlx_writer  # noqa: F401  (reader; writer)
from gemma2_convert.formats.registry import READERS, WRITERS, Checkpoint, detect_format, open_checkpoint

__all__ = ["READERS", "WRITERS", "Checkpoint", "detect_format", "open_checkpoint"]
