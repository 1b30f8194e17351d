"""PyTorch interop: name mapping between torchvision / HF BERT and the Flax trees (see mapping.py)."""
from pixelbert_jax.convert.mapping import (MappingError, bert_from_hf, bert_to_hf, cnn_from_torchvision,
                                           cnn_to_torchvision, merge_into)

__all__ = ["MappingError", "bert_from_hf", "bert_to_hf", "cnn_from_torchvision", "cnn_to_torchvision",
           "merge_into"]
