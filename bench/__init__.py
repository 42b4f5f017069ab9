"""Benchmarks (not tests): ``python -m bench NAME --help``. Results go to docs/BENCHMARKS.md."""
