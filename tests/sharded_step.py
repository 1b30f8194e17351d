"""Run as a script with 8 forced CPU devices: one train step per mesh layout, results saved for comparison.

XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharded_step DATA_DIR OUT.npz
"""

import math
import sys

import jax
import numpy as np
from flax import traverse_util

from pixelbert_jax import partitioning
from pixelbert_jax.data import pipeline
from pixelbert_jax.train import Trainer
from tests import train_helpers as th

LAYOUTS = {"single": (1, 1, 1), "data4_tensor2": (4, 1, 2), "data2_fsdp4": (2, 4, 1)}


def main(data_dir: str, out: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  config = th.tiny_config(data_dir, total_steps=1)
  batch = next(
      pipeline.make_iterator(config.data, "pretrain", "train", batch_size=config.batch_size, seed=0, train=True)
  )
  results = {}
  for name, shape in LAYOUTS.items():
    mesh = partitioning.make_mesh(shape, jax.devices()[: math.prod(shape)])
    trainer = Trainer(config, mesh)
    state = trainer.init_state(config.seed)
    with partitioning.activate(mesh):
      state, metrics = trainer.train_step(state, partitioning.global_batch(batch, mesh))
    sharded = [
        k
        for k, s in traverse_util.flatten_dict(trainer.state_shardings["params"], sep="/").items()
        if not s.is_fully_replicated
    ]
    results[f"{name}:loss"] = np.asarray(metrics["loss"][0])
    results[f"{name}:num_sharded_params"] = np.asarray(len(sharded))
    for k, v in traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/").items():
      results[f"{name}:{k}"] = np.asarray(v)
  np.savez(out, **results)


if __name__ == "__main__":
  main(*sys.argv[1:])
