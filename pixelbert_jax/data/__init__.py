"""Data: the embedded synthetic world, TFDS builders, preprocessing, text processing and the grain pipeline
(`pipeline.py` is the entry point). Nothing is imported here, so that configs can use `data.config` without
loading the pipeline's dependencies.
"""
