"""Benchmarks (not tests): ``python -m bench all --size 2b``; results go to docs/BENCHMARKS.md."""
