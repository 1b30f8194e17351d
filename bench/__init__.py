"""Benchmarks of pixelbert_jax against PyTorch, and tools that measure one part (bench/README.md).

Each benchmark is a module of this package, run from the repository root: `python -m bench.train_step`.
"""
