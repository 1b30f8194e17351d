"""CNN warm start: an 'ImageNet of the synthetic world' before pre-training (`config.cnn_warm_start`).

The paper starts Pixel-BERT from an ImageNet-trained CNN and BERT-base. The demo's CNN is tiny and has no
pre-trained weights, and trained from scratch through the fusion transformer it learns too slowly for a
10-minute demo. So, like the paper's initialisation, it first learns to see: for every feature pixel (one
grid cell of the world) it names the colour and the shape of the object there, or 'none', from the train
split's images and their `cell_labels`. The classifier reads the C5 map after the same 2x2 max-pool that
makes feature pixels; its head is thrown away. Pre-training then starts from this CNN (frozen in the
demo: `model.cnn.frozen`). The trainer runs it as the demo configs' `config.init_hook`
(`warm_start_cnn`, init_hooks.py): only when a run starts from scratch, since a resumed run restores the CNN
from its checkpoint and `init_from` brings its own.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pixelbert_jax import config_checks, init_hooks, partitioning, xla_options
from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data.preprocess import decode_image
from pixelbert_jax.data.sources import open_split
from pixelbert_jax.models.bert import compute_dtype
from pixelbert_jax.models.build import variables
from pixelbert_jax.models.pixel_bert import normalize_image
from pixelbert_jax.models.resnet import resnet_from_config

NUM_CLASSES = (len(world.COLOURS) + 1, len(world.SHAPES) + 1)  # + 'none' (an empty cell), the last class


class CellClassifier(nn.Module):
  """The Pixel-BERT CNN (`cnn`, same parameter tree) + a linear colour / shape head per feature pixel."""

  model_cfg: Any

  def setup(self):
    self.cnn = resnet_from_config(self.model_cfg.cnn, compute_dtype(self.model_cfg))
    self.head = nn.Dense(sum(NUM_CLASSES), dtype=jnp.float32)

  def __call__(self, image, image_mask, train: bool = False):
    """uint8 [B,H,W,3], bool [B,H,W] -> (colour logits [B,P,9], shape logits [B,P,9]), P feature pixels."""
    c5 = self.cnn(normalize_image(image, image_mask), train)
    cells = nn.max_pool(c5, (2, 2), strides=(2, 2), padding="VALID")  # the feature-pixel grid
    b, gh, gw, c = cells.shape
    logits = self.head(cells.reshape(b, gh * gw, c).astype(jnp.float32))
    return logits[..., : NUM_CLASSES[0]], logits[..., NUM_CLASSES[0] :]


def _targets(cell_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """cell_labels int [B,P,2] (-1 = empty) -> class ids with 'none' as the last class."""
  colour, shape = cell_labels[..., 0], cell_labels[..., 1]
  return (
      np.where(colour < 0, NUM_CLASSES[0] - 1, colour).astype(np.int32),
      np.where(shape < 0, NUM_CLASSES[1] - 1, shape).astype(np.int32),
  )


class _CellImages:
  """Decoded images and per-cell targets of one split of the synthetic world (captions schema)."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str, data=None):
    if data_cfg.name != "synthetic":
      raise ValueError(
          f"config.cnn_warm_start needs the synthetic world's cell labels; config.data.name is "
          f"{data_cfg.name!r} (set config.cnn_warm_start.steps=0)"
      )
    # the run's splits (data/task_data.py) when its task reads the same captions; else opened here
    captions = data is not None and data.spec.schema == "captions"
    opened = data.split(split) if captions else open_split(data_cfg, "pretrain", split)
    self.source, self.name = opened.source, opened.name
    self.size = int(data_cfg.synthetic.image_size)

  def __len__(self) -> int:
    return len(self.source)

  def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images, labels = [], []
    for i in indices:
      record = self.source[int(i)]
      if "cell_labels" not in record:
        raise ValueError(
            f"{self.name}[{i}] has no 'cell_labels': rebuild the synthetic world (delete its "
            "folder under config.data.data_dir)"
        )
      image = decode_image(record["image"], name=f"{self.name}[{i}]")
      if image.shape != (self.size, self.size, 3):
        raise ValueError(f"{self.name}[{i}]: image {image.shape}, expected ({self.size}, {self.size}, 3)")
      images.append(image)
      labels.append(np.asarray(record["cell_labels"]))
    colour, shape = _targets(np.stack(labels))
    image = np.stack(images)
    return {"image": image, "image_mask": np.ones(image.shape[:3], bool), "colour": colour, "shape": shape}


def _loss_and_accuracy(colour_logits, shape_logits, batch):
  loss = (
      optax.softmax_cross_entropy_with_integer_labels(colour_logits, batch["colour"]).mean()
      + optax.softmax_cross_entropy_with_integer_labels(shape_logits, batch["shape"]).mean()
  )
  # accuracy over the cells that hold an object (the empty ones are easy and would flatter it)
  occupied = (batch["colour"] < NUM_CLASSES[0] - 1).astype(jnp.float32)
  n = jnp.maximum(occupied.sum(), 1.0)
  acc = lambda logits, y: jnp.sum((jnp.argmax(logits, -1) == y) * occupied) / n
  return loss, {
      "loss": loss,
      "colour_acc": acc(colour_logits, batch["colour"]),
      "shape_acc": acc(shape_logits, batch["shape"]),
  }


WHAT = "the CNN warm start"  # the stage's name in the trainer's log lines


def _stopped(done: int, steps: int) -> init_hooks.Stopped:
  """`should_stop` said so after `done` of the warm start's `steps`: nothing of the warm start is kept."""
  return init_hooks.Stopped(WHAT, f"after {done} of its {steps} steps")


def warm_start_cnn(trainer, state: dict, should_stop: Callable[[], bool]) -> tuple[dict, dict[str, float]]:
  """The init hook (init_hooks.py): `train_cnn`, then the trained CNN in place of the state's. The held-out
  per-cell accuracy is the metrics of step 0. Nothing to do with `config.cnn_warm_start.steps` = 0."""
  cfg = trainer.config
  if cfg.get("cnn_warm_start", {}).get("steps", 0) <= 0:
    return state, {}
  params, batch_stats, held_out = train_cnn(cfg, trainer.mesh, cfg.seed, should_stop=should_stop, data=trainer.data)
  for collection, tree in (("params", params), ("batch_stats", batch_stats)):
    if tree:
      sharding = trainer.state_shardings[collection]["encoder"]["cnn"]
      state[collection]["encoder"]["cnn"] = jax.device_put(tree, sharding)
  return state, held_out


def train_cnn(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    seed: int,
    should_stop: Callable[[], bool] = lambda: False,
    data=None,
) -> tuple[dict, dict, dict[str, float]]:
  """Trains the CNN as a per-cell classifier -> (cnn params, cnn batch_stats, held-out metrics).

  Deterministic in (config, seed). Each process reads its own rows of every global batch. `should_stop` is
  asked before every step and before the held-out evaluation (train.py's SIGTERM flag); when it answers
  True, raises init_hooks.Stopped. `data`: the run's TaskData (data/task_data.py), whose splits it reads if
  they are captions.
  """
  ws = config.cnn_warm_start
  steps, batch_size = int(ws.steps), int(ws.batch_size)
  pc, pi = jax.process_count(), jax.process_index()
  if batch_size % (partitioning.data_parallel_size(mesh) * pc):  # main.py checks it before the run starts
    raise config_checks.ConfigError(
        f"config.cnn_warm_start.batch_size={batch_size} must be divisible by the data-parallel "
        f"mesh size {partitioning.data_parallel_size(mesh)} and the process count {pc}"
    )
  train_data = _CellImages(config.data, config.data.train_split, data)
  model = CellClassifier(ml_collections.FrozenConfigDict(config.model))
  size = train_data.size
  dummy = (jnp.zeros((1, size, size, 3), jnp.uint8), jnp.ones((1, size, size), bool))
  initial = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), *dummy))  # eager init takes seconds
  grid = jax.eval_shape(model.apply, initial, *dummy)[0]
  if grid.shape[1] != world.GRID * world.GRID:
    raise ValueError(
        f"config.cnn_warm_start: the CNN makes {grid.shape[1]} feature pixels of a "
        f"{size}x{size} image, the world has {world.GRID}x{world.GRID} cells "
        f"(config.data.synthetic.image_size must be {64 * world.GRID})"
    )
  tx = optax.adam(optax.cosine_decay_schedule(float(ws.lr), steps))
  replicated = partitioning.replicated(mesh)
  state = jax.device_put(
      {
          "params": initial["params"],
          "batch_stats": initial.get("batch_stats", {}),
          "opt": tx.init(initial["params"]),
      },
      replicated,
  )
  has_stats = bool(initial.get("batch_stats"))

  @functools.partial(
      jax.jit, donate_argnums=0, compiler_options=xla_options.compiler_options(mesh.devices.flat[0].platform)
  )
  def step(state, batch):
    def loss_fn(params):
      out = model.apply(
          variables(params, state["batch_stats"]),
          batch["image"],
          batch["image_mask"],
          train=True,
          mutable=["batch_stats"] if has_stats else False,
      )
      (colour, shape), new_vars = out if has_stats else (out, {})
      loss, metrics = _loss_and_accuracy(colour, shape, batch)
      return loss, (metrics, new_vars.get("batch_stats", state["batch_stats"]))

    (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats, "opt": opt}, metrics

  rng = np.random.default_rng([seed, 0x5EED])
  local = batch_size // pc
  order, pos, t0 = rng.permutation(len(train_data)), 0, time.monotonic()
  for i in range(1, steps + 1):
    if should_stop():
      raise _stopped(i - 1, steps)
    if pos + batch_size > len(order):
      order, pos = rng.permutation(len(train_data)), 0
    rows = order[pos : pos + batch_size][pi * local : (pi + 1) * local]
    pos += batch_size
    state, metrics = step(state, partitioning.global_batch(train_data.batch(rows), mesh))
    if i % 50 == 0 or i == steps:
      m = jax.device_get(metrics)
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"cnn warm start step {i}: loss is {m['loss']}; lower config.cnn_warm_start.lr")
      logging.info(
          "cnn warm start %d/%d: loss %.3f, colour %.3f, shape %.3f (this batch), %.1f s",
          i,
          steps,
          m["loss"],
          m["colour_acc"],
          m["shape_acc"],
          time.monotonic() - t0,
      )
  if should_stop():
    raise _stopped(steps, steps)
  held_out = evaluate(model, state, config, data=data)
  logging.info(
      "cnn warm start, held-out %s cells: %s",
      config.data.eval_split,
      " ".join(f"{k}={v:.3f}" for k, v in held_out.items()),
  )
  params, stats = jax.device_get((state["params"], state["batch_stats"]))
  return params["cnn"], stats.get("cnn", {}), held_out


def evaluate(
    model: CellClassifier, state: dict, config: ml_collections.ConfigDict, max_images: int = 256, data=None
) -> dict[str, float]:
  """Per-cell colour and shape accuracy (cells with an object) on the eval split, inference-mode CNN."""
  images = _CellImages(config.data, config.data.eval_split, data)
  n = min(len(images), max_images)
  batch = images.batch(np.arange(n))
  colour, shape = jax.jit(model.apply)(
      variables(state["params"], state["batch_stats"]), batch["image"], batch["image_mask"]
  )
  _, metrics = _loss_and_accuracy(colour, shape, batch)
  return {f"warm_start/{k}": float(v) for k, v in metrics.items()}
