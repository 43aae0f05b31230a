"""Benchmarks run from the command line: ``fastkd bench kernels`` and ``fastkd bench data``."""
