"""Data: embedded synthetic world, TFDS builders, preprocessing, text processing and the grain pipeline."""
from pixelbert_jax.data.config import data_config
from pixelbert_jax.data.pipeline import make_iterator, num_examples, tokenizer, vocab_size
from pixelbert_jax.data.preprocess import BadImageError, decode_image

__all__ = ["BadImageError", "data_config", "decode_image", "make_iterator", "num_examples", "tokenizer",
           "vocab_size"]
