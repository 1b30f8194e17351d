"""NLVR2 fine-tuning: `--config=configs/nlvr2.py[:demo|demo_single|r50|x152] --config.init_from=PRETRAIN_WORKDIR`.

The paper's fine-tuning recipe: each image with the sentence is one pass, the two [CLS] vectors are concatenated
and classified true/false with cross-entropy; batch 128, otherwise as VQA (18 epochs, lr x0.1 at 12 and 16,
SGD 1e-2 for the CNN, AdamW 1e-4 for the transformer).
"""

import ml_collections

from pixelbert_jax.config_files import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  common = load_sibling(__file__, "finetune_common")
  c = common.finetune_config("nlvr2", variant, "nlvr2")
  if variant in common.DEMOS:
    c.num_epochs = 2.0  # ours: 4000 pairs, 250 steps of two passes each
    c.optim.decay_epochs = (1.5,)
  else:
    c.batch_size = 128  # paper
    c.num_epochs = 18.0  # paper ("otherwise as VQA")
    c.optim.decay_epochs = (12.0, 16.0)  # paper
    c.data.eval_split = "dev"
  return c
