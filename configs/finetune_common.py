"""Shared by configs/vqa.py, nlvr2.py and retrieval.py: the pre-training config's shared fields
(`base_config()` of configs/pretrain.py) plus what every fine-tune sets, for the demo and paper variants.

Config files are loaded by path (ml_collections), so siblings are imported by path too.
"""

import ml_collections

from pixelbert_jax.config_files import load_sibling
from pixelbert_jax.data.config import data_config, paper_sizes
from pixelbert_jax.models.presets import model_config

_pretrain = load_sibling(__file__, "pretrain")
BERT_BASE_UNCASED_VOCAB, FROM_DATA = _pretrain.BERT_BASE_UNCASED_VOCAB, _pretrain.FROM_DATA
DEMOS = ("demo", "demo_single")  # the fine-tunes of the demo pre-trainings of those names


def finetune_config(task: str, variant: str, dataset: str) -> ml_collections.ConfigDict:
  """`variant` demo / demo_single: the model of that demo pre-training, on its embedded world. r50 / x152: the
  paper's backbones at the paper's image sizes on `dataset`; the caller sets the task's published recipe."""
  c = _pretrain.base_config()
  c.task = task
  c.loss = ml_collections.ConfigDict()
  if variant in DEMOS:
    demo = _pretrain.get_config(variant)  # same model and world as that demo pre-training, so init_from fits
    c.data, c.model, c.cpu_devices = demo.data, demo.model, demo.cpu_devices
    # As in the demo pre-training, the CNN stays frozen (no backward pass through it: twice the examples
    # per second). It comes from init_from; without init_from (from scratch) it gets the pre-training's
    # warm start first, the demo's stand-in for an ImageNet CNN, so that "from scratch" differs from
    # "from pre-training" by the MLM + ITM pre-training only.
    c.model.cnn.frozen = True
    c.init_hook, c.cnn_warm_start = demo.init_hook, demo.cnn_warm_start
    c.batch_size, c.eval_batch_size = 32, 64
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 0, 200
    c.optim.warmup_steps = 50  # ours
    c.optim.transformer.lr = 5e-4  # ours: higher than the paper's 1e-4 for a short CPU run
    c.optim.grad_clip_norm = 1.0
  elif variant in ("r50", "x152"):
    c.data = paper_sizes(data_config(dataset), variant)
    c.data.vocab_path = ""  # set to BERT-base-uncased's vocab.txt
    c.model = model_config("base", variant, BERT_BASE_UNCASED_VOCAB)
    c.model.dtype = "bfloat16"  # ours, as in pre-training
    c.model.remat = True
    c.init_from = ""  # set to the pre-training workdir
    c.eval_every_steps = 0
  else:
    raise ValueError(f"Unknown variant {variant!r} of configs/{task}.py: use demo, demo_single, r50 or x152")
  c.data.train_split, c.data.eval_split = "train", "val"
  return c
