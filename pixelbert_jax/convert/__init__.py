"""PyTorch interop: name mapping between torchvision / HF BERT and the Flax trees (see mapping.py), the
`python -m pixelbert_jax.convert to-torch|from-torch` CLI (to_torch.py, from_torch.py) and a PyTorch
Pixel-BERT (torch_model.py, optional torch dependency)."""

from pixelbert_jax.convert.mapping import (
    MappingError,
    bert_from_hf,
    bert_to_hf,
    cnn_from_torchvision,
    cnn_to_torchvision,
    merge_into,
)

__all__ = ["MappingError", "bert_from_hf", "bert_to_hf", "cnn_from_torchvision", "cnn_to_torchvision", "merge_into"]
