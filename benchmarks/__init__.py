"""Benchmarks, run through `bins/vocoder/benchmark.py <name> ...`."""
