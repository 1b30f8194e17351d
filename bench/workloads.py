"""What the benchmarks run: the configs of configs/ with `KEY=VALUE` overrides, and synthetic batches of the
shapes a config's task takes.

Nothing here imports the data pipeline (grain, tensorflow_datasets), which a bare accelerator host need not
have. So the sizes a config reads off its data (-1) are set here instead: the synthetic world's vocabulary is
counted from its word list (what `pipeline.vocab_size` reads off the vocab file it writes); any other -1
must come as an override.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pixelbert_jax.config_files import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FROM_DATA = -1


@dataclasses.dataclass(frozen=True)
class Workload:
  config: str  # FILE:VARIANT in configs/
  about: str
  overrides: tuple[str, ...] = ()
  gpu_batch: int | None = 16  # None: the config's batch_size
  cpu_batch: int | None = 1


TRAIN = {
    "pretrain-r50": Workload("pretrain.py:r50", "the paper's pre-training: BERT-base + ResNet-50, 100 sampled pixels"),
    "finetune-r50": Workload("vqa.py:r50", "VQA fine-tuning of the same model: 3129 answers, all pixels"),
    "pretrain-x152": Workload("pretrain.py:x152", "pre-training with ResNeXt-152 32x4d"),
    "demo": Workload(
        "pretrain.py:demo",
        "the README's demo pre-training step as it trains: frozen CNN, 8 of 9 pixels, batch 64 on 2 CPU devices",
        gpu_batch=None,
        cpu_batch=None,
    ),
    "demo-finetune": Workload(
        "vqa.py:demo",
        "finetune-r50's code path (VQA head, all pixels) at demo size, for CPU rehearsals; 64 answers stand in "
        "for the world's",
        overrides=("model.num_answers=64",),
        gpu_batch=None,
        cpu_batch=None,
    ),
}


def demo_vocab_size() -> int:
  """The synthetic world's vocabulary: the special tokens and the world's words."""
  from pixelbert_jax.data import synthetic, text

  return len(text.SPECIAL_TOKENS) + len(synthetic.world_words())


def load(workload: Workload, overrides=(), *, batch: int | None = None, gpu: bool = False):
  """The workload's config with its overrides, then `overrides`; `batch_size` is `batch`, else the workload's
  for this kind of device, else the config's."""
  config = load_config(os.path.join(CONFIGS, workload.config), [*workload.overrides, *overrides])
  if int(config.model.vocab_size) == FROM_DATA:
    if config.data.name != "synthetic":
      raise SystemExit(f"error: {workload.config} reads model.vocab_size off its data: give --set model.vocab_size=N")
    config.model.vocab_size = demo_vocab_size()
  if int(config.model.get("num_answers", 0)) == FROM_DATA:
    raise SystemExit(f"error: {workload.config} reads model.num_answers off its data: give --set model.num_answers=N")
  default = workload.gpu_batch if gpu else workload.cpu_batch
  config.batch_size = int(batch or default or config.batch_size)
  return config


def image_hw(config, image: str | None = None) -> tuple[int, int]:
  """`image` ("HxW"), else the config's largest bucket: the batch shape that needs the most memory."""
  from pixelbert_jax import model_context

  if image:
    h, _, w = image.partition("x")
    return int(h), int(w)
  return model_context.largest_bucket(config)


def num_pixel_tokens(hw: tuple[int, int]) -> int:
  """Pixels per image after the CNN (stride 32) and the 2x2 max-pool: 832x1344 -> 13x21 = 273."""
  return (hw[0] // 32 // 2) * (hw[1] // 32 // 2)


def text_batch(rng, batch: int, text_len: int, vocab: int) -> dict:
  """Token ids away from the special ids [0, 4) and an all-ones text mask."""
  return dict(
      input_ids=rng.integers(4, vocab, (batch, text_len), dtype=np.int32),
      text_mask=np.ones((batch, text_len), np.int32),
  )


def image_batch(rng, batch: int, hw: tuple[int, int]) -> dict:
  h, w = hw
  return dict(image=rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8), image_mask=np.ones((batch, h, w), bool))


def synthetic_batch(config, batch: int, hw: tuple[int, int], seed: int = 0) -> dict:
  """One global batch of `config.task` as NumPy, the same in every worker: every key, shape and dtype of the
  task's `batch_spec` (what the data pipeline delivers), with random images and captions, the config's MLM
  masking rate and random ITM labels, or a few VQA answers per question at soft scores."""
  from pixelbert_jax import tasks

  rng = np.random.default_rng(seed)
  cfg, length = config.model, config.data.max_text_len
  values = {**image_batch(rng, batch, hw), **text_batch(rng, batch, length, cfg.vocab_size)}
  values["example_mask"] = np.ones((batch,), np.float32)
  if config.task == "pretrain":
    values["mlm_labels"] = rng.integers(4, cfg.vocab_size, (batch, length), dtype=np.int32)
    values["mlm_weights"] = (rng.random((batch, length)) < config.data.mlm_prob).astype(np.float32)
    values["itm_label"] = rng.integers(0, 2, (batch,), dtype=np.int32)
  elif config.task == "vqa":
    targets = np.zeros((batch, cfg.num_answers), np.float32)
    for i in range(batch):
      targets[i, rng.integers(0, cfg.num_answers, 3)] = rng.choice([0.3, 0.6, 0.9, 1.0], 3)
    values["vqa_targets"] = targets
  spec = tasks.get_task(config.task).batch_spec(config, batch, hw)
  if set(spec) != set(values):
    raise ValueError(f"synthetic {config.task} batch has {sorted(values)}, the task's batch_spec {sorted(spec)}")
  return {k: values[k].astype(spec[k].dtype).reshape(spec[k].shape) for k in spec}
