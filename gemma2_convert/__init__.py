"""gemma2-convert: exact, streaming, verified conversion and quantization of Gemma 2 checkpoints."""

__version__ = "0.1.0"
