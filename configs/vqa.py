"""VQA fine-tuning: `--config=configs/vqa.py[:demo|demo_single|r50|x152] --config.init_from=PRETRAIN_WORKDIR`.

The paper's fine-tuning recipe: [CLS] -> MLP -> 3129 answers (seen >= 9 times in train), BCE on soft scores,
batch 256, 18 epochs, lr x0.1 at epochs 12 and 16, the pre-training optimisers (SGD 1e-2 for the CNN,
AdamW 1e-4 for the transformer). Test-dev predictions go to the evaluation server as results/*.json.
"""

import ml_collections

from pixelbert_jax.config_files import load_sibling


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  common = load_sibling(__file__, "finetune_common")
  c = common.finetune_config("vqa", variant, "vqa2")
  if variant in common.DEMOS:
    c.num_epochs = 1.0  # ours: 12000 questions, about 375 steps
    c.optim.decay_epochs = (0.7,)
    c.model.num_answers = common.FROM_DATA  # the world's answers
  else:
    c.batch_size = 256  # paper
    c.num_epochs = 18.0  # paper
    c.optim.decay_epochs = (12.0, 16.0)  # paper
    c.model.num_answers = 3129  # paper: answers seen at least 9 times
    c.data.vqa_min_answer_count = 9  # paper
    c.data.max_text_len = 40  # ours (paper silent on question length)
  return c
