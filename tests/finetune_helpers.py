"""Tiny fine-tuning configs on the synthetic world, sized like train_helpers' tiny pre-training config."""

from __future__ import annotations

from pixelbert_jax.data import pipeline
from tests import train_helpers as th


def set_key(config, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def tiny_finetune_config(
    task: str, data_dir: str, *, total_steps: int = 2, init_from: str = "", variant: str = "demo_single", **extra
):
  """`task`'s demo config at test size; `demo_single` by default: its model (no pixel positions) is the one
  `th.tiny_config`'s pre-training writes, so `init_from` fits."""
  config = th.load_config(task, variant)
  # no CNN warm start (the demo runs it when there is no init_from): the same code is tested with pre-training
  overrides = {**th.tiny_overrides(data_dir, total_steps), "init_from": init_from, "cnn_warm_start.steps": 0, **extra}
  for key, value in overrides.items():
    set_key(config, key, value)
  if task == "vqa":
    config.model.num_answers = len(pipeline.answer_vocab(config.data))
  if task == "retrieval":
    config.data.retrieval_negatives = 3
    config.loss.hard_negatives = 2
    config.retrieval_eval.num_images = 8
    config.retrieval_eval.pair_batch_size = 16
  return config
