"""The core every other layer may import: errors, lazy tensors, dtype names, units, memory, progress.

It imports nothing else from the project (torch and the standard library only), so ``reference`` and
``quant`` can use it without depending on the formats, the pipeline or the command line.
"""
