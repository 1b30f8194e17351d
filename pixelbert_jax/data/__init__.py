"""Data: embedded synthetic world, TFDS builders, preprocessing, text processing and the grain pipeline."""

from pixelbert_jax.data.config import data_config
from pixelbert_jax.data.pipeline import (
    answer_vocab,
    make_iterator,
    nlvr2_identifiers,
    num_examples,
    retrieval_gallery,
    tokenizer,
    vocab_size,
    vqa_ground_truth,
)
from pixelbert_jax.data.preprocess import BadImageError, decode_image

__all__ = [
    "BadImageError",
    "answer_vocab",
    "data_config",
    "decode_image",
    "make_iterator",
    "nlvr2_identifiers",
    "num_examples",
    "retrieval_gallery",
    "tokenizer",
    "vocab_size",
    "vqa_ground_truth",
]
