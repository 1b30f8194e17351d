"""How fast the demo model learns to read grounded words off the pixels, with the densest supervision.

A tuning aid for the demo (README "What the demo reaches today"), not a benchmark of speed: every caption
of a batch has exactly one colour/shape word masked (the grounded-word probe's question, asked at train
time), everything else intact, all pairs matched, Adam with a linear warm-up (--warmup, 50 steps). It
prints the running probe accuracy, so a setting that cannot ground even here will not ground in
pre-training either.

  python -m bench.grounding_speed --steps 200 --lr 3e-4 --cnn_lr 1e-3
  python -m bench.grounding_speed --objects 1          # single-object scenes only (no binding needed)
  python -m bench.grounding_speed --backbone_steps 300 --cnn_lr 0   # a CNN that already names every cell
  python -m bench.grounding_speed --set model.initializer_range=0.08 --set model.pixel_sampling.enabled=false
  python -m bench.grounding_speed --backbone_steps 300 --cnn_lr 0 --cache_features --eval_images 512 \
      --images 4000 --steps 1000 --batch 128 --lr 1e-3 --warmup 200 --set model.initializer_range=0.08

Images are rendered in memory from the synthetic world (no dataset build); chance is 1/8 (the text tells
colour from shape). Accuracy is printed overall and split by masked colour / masked shape words.
"""

import argparse
import importlib.util
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from ml_collections.config_flags import config_path

from pixelbert_jax import optim
from pixelbert_jax.data import pipeline, synthetic, text
from pixelbert_jax.models.build import build_model, dummy_inputs
from pixelbert_jax.models.pixel_bert import normalize_image, sample_pixels
from pixelbert_jax.models.resnet import resnet_from_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
  spec = importlib.util.spec_from_file_location("pretrain_config", ROOT / "configs" / "pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo")
  pipeline.resolve_from_data(config)  # the world's vocabulary size
  return config


def scenes(n: int, objects: int, size: int, split: str = "train"):
  """n rendered images of `split` (uint8 [n,S,S,3]), their 5 captions each, and per-cell labels int [n,9,2]
  (colour index, shape index; 8 = empty cell), optionally only scenes of `objects` objects."""
  images, captions, cells, i = [], [], [], 0
  colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
  while len(images) < n:
    objs = synthetic.make_scene(0, split, i, size)
    if not objects or len(objs) == objects:
      images.append(synthetic.render(0, split, i, objs, size))
      captions.append(synthetic.captions(0, split, i, objs, 5))
      y = np.full((synthetic.GRID**2, 2), 8, np.int32)
      for o in objs:
        y[o.cell[0] * synthetic.GRID + o.cell[1]] = colours.index(o.colour), shapes.index(o.shape)
      cells.append(y)
    i += 1
  return np.stack(images), captions, np.stack(cells)


class CellClassifier(nn.Module):
  """The demo CNN with a linear colour/shape classifier on each 64x64 cell (C5, 2x2 max-pooled)."""

  cnn: nn.Module

  @nn.compact
  def __call__(self, image, train):
    c5 = self.cnn(normalize_image(image, jnp.ones(image.shape[:3], bool)), train)
    cells = nn.max_pool(c5, (2, 2), strides=(2, 2))
    return nn.Dense(18)(cells.reshape(cells.shape[0], -1, cells.shape[-1])).reshape(cells.shape[0], -1, 2, 9)


def pretrain_backbone(cfg, images, cells, steps: int, batch: int, log_every: int):
  """Supervised per-cell colour + shape classification of the CNN alone (Adam 1e-3): a control that hands
  the probe a backbone whose features already name every cell's object. -> (cnn params, batch_stats)."""
  clf = CellClassifier(resnet_from_config(cfg.model.cnn))
  v = clf.init(jax.random.key(1), jnp.zeros((2,) + images.shape[1:], jnp.uint8), False)
  tx = optax.adam(optax.linear_schedule(0.0, 1e-3, 50))
  params, batch_stats = v["params"], v["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, image, y):
    def loss_fn(p):
      logits, new = clf.apply({"params": p, "batch_stats": batch_stats}, image, True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      object_cell = (y[..., 0] < 8)[..., None]
      acc = jnp.sum((logits.argmax(-1) == y) * object_cell, (0, 1)) / jnp.sum(object_cell)
      return loss, (new["batch_stats"], acc)

    (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, acc

  rng, t0 = np.random.default_rng(1), time.time()
  for s in range(steps):
    idx = rng.integers(0, len(images), batch)
    params, batch_stats, opt_state, loss, acc = step(
        params, batch_stats, opt_state, jnp.asarray(images[idx]), jnp.asarray(cells[idx])
    )
    if (s + 1) % log_every == 0:
      print(
          f"backbone {s + 1:5d}  loss {float(loss):.3f}  object cells: colour {float(acc[0]):.2f} "
          f"shape {float(acc[1]):.2f}  {time.time() - t0:.0f} s",
          flush=True,
      )
  return params["cnn"], batch_stats["cnn"]


def probe_batch(rng, captions, idx, tok, max_len):
  """input_ids, text_mask, labels, weights [B,L]: one grounded word per caption replaced by [MASK]."""
  rows = []
  for i in idx:
    caption, grounded_words = captions[i][rng.integers(len(captions[i]))]
    ids, mask, grounded = text.encode(tok, caption, max_len, grounded_words)
    pos = rng.choice(np.flatnonzero(grounded > 0))
    labels, weights = np.zeros(max_len, np.int32), np.zeros(max_len, np.float32)
    labels[pos], weights[pos] = ids[pos], 1.0
    ids = ids.copy()
    ids[pos] = tok.mask_token_id
    rows.append((ids, mask, labels, weights))
  return [jnp.asarray(np.stack(col)) for col in zip(*rows)]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-4, help="transformer and heads")
  ap.add_argument("--warmup", type=int, default=50, help="linear warm-up steps of both learning rates")
  ap.add_argument("--cnn_lr", type=float, default=1e-3)
  ap.add_argument("--dropout", type=float, default=0.0)
  ap.add_argument(
      "--backbone_steps",
      type=int,
      default=0,
      help="first train the CNN alone to name each cell's colour and shape (a control)",
  )
  ap.add_argument("--backbone_batch", type=int, default=32)
  ap.add_argument(
      "--cache_features",
      action="store_true",
      help="with --cnn_lr 0: run the frozen CNN once per image (eval mode) and train only the "
      "rest, about 10x faster per step",
  )
  ap.add_argument("--objects", type=int, default=0, help="only scenes of this many objects (0: all)")
  ap.add_argument("--images", type=int, default=2048)
  ap.add_argument(
      "--eval_images",
      type=int,
      default=0,
      help="also report the probe on this many held-out (val) images at every log line",
  )
  ap.add_argument("--log_every", type=int, default=25)
  ap.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override a demo config field, e.g. --set model.num_layers=4 (repeatable)",
  )
  args = ap.parse_args(argv)
  if args.cache_features and args.cnn_lr:
    ap.error("--cache_features needs a frozen CNN: add --cnn_lr 0")

  cfg = demo_config()
  for item in args.set:
    key, _, value = item.partition("=")
    config_path.set_value(key, cfg, yaml.safe_load(value))
  cfg.model.hidden_dropout = cfg.model.attention_dropout = args.dropout
  size, max_len = cfg.data.synthetic.image_size, cfg.data.max_text_len
  tok = pipeline.tokenizer(cfg.data)
  images, captions, cells = scenes(args.images, args.objects, size)
  model = build_model(cfg.model, "pretrain")
  variables = nn.meta.unbox(
      model.init(jax.random.key(0), **dummy_inputs("pretrain", 2, (size, size), max_len), train=False)
  )
  params, batch_stats = variables["params"], variables["batch_stats"]
  if args.backbone_steps:
    params["encoder"]["cnn"], batch_stats["encoder"]["cnn"] = pretrain_backbone(
        cfg, images, cells, args.backbone_steps, args.backbone_batch, args.log_every
    )
  tx = optax.multi_transform(
      {
          "cnn": optax.adam(optax.linear_schedule(0.0, args.cnn_lr, args.warmup)),
          "transformer": optax.adam(optax.linear_schedule(0.0, args.lr, args.warmup)),
      },
      optim.param_labels(params, freeze_cnn=False),
  )
  opt_state = tx.init(params)

  frozen_cnn = jax.jit(
      lambda x: model.apply(
          {"params": params, "batch_stats": batch_stats},
          x,
          method=lambda m, x: m.encoder.cnn(normalize_image(x, jnp.ones(x.shape[:3], bool)), False),
      )
  )

  def c5_of(images):  # the frozen CNN in eval mode, in chunks: float32 [N,h,w,C]
    return np.concatenate([np.asarray(frozen_cnn(jnp.asarray(images[i : i + 64]))) for i in range(0, len(images), 64)])

  def mlm_logits(p, bs, x, ids, mask, key, train):
    """x: images, or C5 features with --cache_features. -> (logits [B,L,V], new batch_stats)."""
    if args.cache_features:

      def fused(m):
        pixels = m.encoder.visual(x)
        pixel_mask = jnp.ones(pixels.shape[:2], bool)
        if train and cfg.model.pixel_sampling.enabled:
          pixels, pixel_mask = sample_pixels(key, pixels, pixel_mask, cfg.model.pixel_sampling.num_pixels)
        return m.mlm_logits(m.encoder.fuse(ids, mask, pixels, pixel_mask, train)[0][:, : ids.shape[1]])

      return model.apply({"params": p}, method=fused, rngs={"dropout": key}), bs
    variables, image_mask = {"params": p, "batch_stats": bs}, jnp.ones(x.shape[:3], bool)
    if not train:
      return model.apply(variables, x, image_mask, ids, mask)["mlm_logits"], bs
    out, new = model.apply(
        variables, x, image_mask, ids, mask, train=True, rngs={"dropout": key, "sample": key}, mutable=["batch_stats"]
    )
    return out["mlm_logits"], new["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, x, ids, mask, labels, weights, key):
    def loss_fn(p):
      logits, new_stats = mlm_logits(p, batch_stats, x, ids, mask, key, True)
      loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights) / jnp.sum(weights)
      hits = jnp.sum((logits.argmax(-1) == labels) * weights, -1)  # [B]: one masked word per caption
      return loss, (new_stats, hits)

    (loss, (batch_stats, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, hits

  @jax.jit
  def eval_hits(params, batch_stats, x, ids, mask, labels, weights):
    logits, _ = mlm_logits(params, batch_stats, x, ids, mask, jax.random.key(0), False)
    return jnp.sum((logits.argmax(-1) == labels) * weights)

  inputs = c5_of(images) if args.cache_features else images
  held_out = []
  if args.eval_images:
    ev_images, ev_captions, _ = scenes(args.eval_images, args.objects, size, split="val")
    ev_inputs, erng = c5_of(ev_images) if args.cache_features else ev_images, np.random.default_rng(1)
    for i in range(0, args.eval_images, 64):
      idx = np.arange(i, min(i + 64, args.eval_images))
      held_out.append((jnp.asarray(ev_inputs[idx]), *probe_batch(erng, ev_captions, idx, tok, max_len)))

  colour_ids = np.array([tok.convert_tokens_to_ids(c) for c in synthetic.COLOURS])
  rng, hits, is_colour, t0 = np.random.default_rng(0), [], [], time.time()
  for s in range(args.steps):
    idx = rng.integers(0, len(images), args.batch)
    ids, mask, labels, weights = probe_batch(rng, captions, idx, tok, max_len)
    params, batch_stats, opt_state, loss, hit = step(
        params, batch_stats, opt_state, jnp.asarray(inputs[idx]), ids, mask, labels, weights, jax.random.key(s)
    )
    hits.append(np.asarray(hit))
    is_colour.append(np.isin(np.asarray(labels).max(-1), colour_ids))
    if (s + 1) % args.log_every == 0:
      h, c = np.concatenate(hits[-args.log_every :]), np.concatenate(is_colour[-args.log_every :])
      held = (
          f"  held-out {sum(float(eval_hits(params, batch_stats, *b)) for b in held_out) / args.eval_images:.3f}"
          if held_out
          else ""
      )
      print(
          f"step {s + 1:5d}  loss {float(loss):.3f}  probe acc (last {args.log_every} steps) {h.mean():.3f}  "
          f"colour {h[c].mean() if c.any() else float('nan'):.3f} "
          f"shape {h[~c].mean() if (~c).any() else float('nan'):.3f}{held}  {time.time() - t0:.0f} s",
          flush=True,
      )


if __name__ == "__main__":
  main()
