"""Named model sizes: `model_config(size, cnn, vocab_size)` -> the `config.model` ConfigDict.

`vocab_size` (and `num_answers`) may be -1: the trainer reads them off the data (pipeline.resolve_from_data).

Sizes fix the transformer (`tiny` for tests, `demo` for the CPU demo, `base` = BERT-base); CNN names fix
the backbone (`r50`, `x152` = the paper's backbones, `tiny`/`demo` = one bottleneck per stage for training
from scratch). Every field stays overridable from the command line.
"""

import ml_collections

_TRANSFORMERS = {
    # hidden, layers, heads, intermediate, max positions
    "tiny": (32, 2, 2, 64, 64),
    "demo": (128, 2, 4, 512, 64),
    "base": (768, 12, 12, 3072, 512),
}

_CNNS = {
    # stage_sizes, groups, width_per_group, stem_width, base_planes, norm
    "r50": ((3, 4, 6, 3), 1, 64, 64, 64, "frozen_bn"),
    "x152": ((3, 8, 36, 3), 32, 4, 64, 64, "frozen_bn"),
    # Trained from scratch on small batches: group norm has no train/eval gap and no batch coupling.
    # width_per_group 64 with groups 1 is a plain ResNet (torchvision's width formula needs it).
    "tiny": ((1, 1, 1, 1), 1, 64, 8, 4, "gn"),
    "demo": ((1, 1, 1, 1), 1, 64, 16, 16, "gn"),
}

# Answers seen at least 9 times in VQA v2 train (the paper); small sizes get a small head.
_NUM_ANSWERS = {"tiny": 16, "demo": 64, "base": 3129}
# Pixels kept per image in pre-training: the paper keeps 100 of ~260 (R50 at 800x1333); the small sizes
# see ~192 px images (3x3 = 9 pixels) and keep a similar fraction.
_NUM_PIXELS = {"tiny": 4, "demo": 6, "base": 100}


def cnn_config(cnn: str) -> ml_collections.ConfigDict:
  if cnn not in _CNNS:
    raise ValueError(f"unknown cnn {cnn!r}; expected one of {sorted(_CNNS)}")
  stages, groups, wpg, stem, planes, norm = _CNNS[cnn]
  return ml_collections.ConfigDict(
      dict(
          name=cnn,
          stage_sizes=list(stages),
          groups=groups,
          width_per_group=wpg,
          stem_width=stem,
          base_planes=planes,
          norm=norm,  # 'frozen_bn' | 'bn' | 'gn'
          gn_groups=4 if cnn == "tiny" else 8 if cnn == "demo" else 32,
          norm_eps=1e-5,  # torchvision BatchNorm2d / GroupNorm default
          bn_momentum=0.1,  # torchvision convention: new = (1 - m) * old + m * batch
          # How XLA is given the same computation (models/resnet.py): auto = 'cpu' on the CPU backend (1x1
          # convs as matmuls, explicit max-pool and batch-norm gradients), 'generic' (lax.conv, autodiff)
          # elsewhere. Parameters and checkpoints do not depend on it.
          impl="auto",
          # Not trained: the CNN runs in inference mode (batch norm on its running statistics) under
          # stop_gradient, so no backward pass goes through it, and the optimizer leaves it alone.
          frozen=False,
      )
  )


def model_config(size: str, cnn: str, vocab_size: int) -> ml_collections.ConfigDict:
  """The model config for transformer `size` and backbone `cnn`; every field overridable."""
  if size not in _TRANSFORMERS:
    raise ValueError(f"unknown size {size!r}; expected one of {sorted(_TRANSFORMERS)}")
  if vocab_size <= 0 and vocab_size != -1:
    raise ValueError(f"vocab_size must be positive, or -1 for the data's (set by the trainer), got {vocab_size}")
  hidden, layers, heads, inter, max_pos = _TRANSFORMERS[size]
  return ml_collections.ConfigDict(
      dict(
          size=size,
          cnn=cnn_config(cnn),
          hidden_size=hidden,
          num_layers=layers,
          num_heads=heads,
          intermediate_size=inter,
          vocab_size=vocab_size,
          max_position_embeddings=max_pos,
          type_vocab_size=2,
          hidden_dropout=0.1,
          attention_dropout=0.1,
          # einsum: scores, float32 softmax, dropout. dot_product: jax.nn.dot_product_attention, XLA's
          # implementation; cudnn: the same with cuDNN's fused kernel (CUDA GPU, bf16/fp16). Neither has
          # attention dropout, so they are for inference or attention_dropout=0.
          attention_impl="einsum",
          layer_norm_eps=1e-12,  # HF BERT
          initializer_range=0.02,
          pixel_sampling=dict(enabled=True, num_pixels=_NUM_PIXELS[size]),
          pos_embed_2d=False,
          max_grid=64,  # rows / columns of the optional 2D position embedding (64 * 64 = 4096 px per side)
          dtype="float32",  # compute dtype; params are always float32
          remat=False,
          num_answers=_NUM_ANSWERS[size],
          head_hidden_multiplier=2,  # VQA / NLVR2 MLP width = multiplier * hidden_size
      )
  )
