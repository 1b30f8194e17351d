"""How fast the demo model learns to read grounded words off the pixels, with the densest supervision.

A tuning aid for the demo (README "What the demo reaches today"), not a benchmark of speed: every caption
of a batch has exactly one colour/shape word masked (the grounded-word probe's question, asked at train
time), everything else intact, all pairs matched, Adam with a 50-step warm-up. It prints the running probe
accuracy, so a setting that cannot ground even here will not ground in pre-training either.

  python bench/grounding_speed.py --steps 200 --lr 3e-4 --cnn_lr 1e-3
  python bench/grounding_speed.py --objects 1          # single-object scenes only (no binding needed)

Images are rendered in memory from the synthetic world (no dataset build); chance is 1/8 (the text tells
colour from shape).
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

from pixelbert_jax import optim
from pixelbert_jax.data import pipeline, synthetic, text
from pixelbert_jax.models import build_model, dummy_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
  spec = importlib.util.spec_from_file_location("pretrain_config", ROOT / "configs" / "pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("demo")


def scenes(n: int, objects: int, size: int):
  """n rendered train images (uint8 [n,S,S,3]) and their 5 captions each, optionally of `objects` objects."""
  images, captions, i = [], [], 0
  while len(images) < n:
    objs = synthetic.make_scene(0, "train", i, size)
    if not objects or len(objs) == objects:
      images.append(synthetic.render(0, "train", i, objs, size))
      captions.append(synthetic.captions(0, "train", i, objs, 5))
    i += 1
  return np.stack(images), captions


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


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-4, help="transformer and heads")
  ap.add_argument("--cnn_lr", type=float, default=1e-3)
  ap.add_argument("--dropout", type=float, default=0.0)
  ap.add_argument("--pos_embed_2d", action="store_true")
  ap.add_argument("--objects", type=int, default=0, help="only scenes of this many objects (0: all)")
  ap.add_argument("--images", type=int, default=2048)
  args = ap.parse_args()

  cfg = demo_config()
  cfg.model.hidden_dropout = cfg.model.attention_dropout = args.dropout
  cfg.model.pos_embed_2d = args.pos_embed_2d
  size, max_len = cfg.data.synthetic.image_size, cfg.data.max_text_len
  tok = pipeline.tokenizer(cfg.data)
  images, captions = scenes(args.images, args.objects, size)
  model = build_model(cfg.model, "pretrain")
  variables = nn.meta.unbox(model.init(jax.random.key(0), **dummy_inputs("pretrain", 2, (size, size), max_len),
                                       train=False))
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.multi_transform({"cnn": optax.adam(optax.linear_schedule(0.0, args.cnn_lr, 50)),
                              "transformer": optax.adam(optax.linear_schedule(0.0, args.lr, 50))},
                             optim.param_labels(params, freeze_cnn=False))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, image, ids, mask, labels, weights, key):
    def loss_fn(p):
      out, new = model.apply({"params": p, "batch_stats": batch_stats}, image, jnp.ones(image.shape[:3], bool),
                             ids, mask, train=True, rngs={"dropout": key, "sample": key}, mutable=["batch_stats"])
      logits = out["mlm_logits"]
      loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights) / jnp.sum(weights)
      acc = jnp.sum((logits.argmax(-1) == labels) * weights) / jnp.sum(weights)
      return loss, (new["batch_stats"], acc)
    (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, acc

  rng, accs, t0 = np.random.default_rng(0), [], time.time()
  for s in range(args.steps):
    idx = rng.integers(0, len(images), args.batch)
    ids, mask, labels, weights = probe_batch(rng, captions, idx, tok, max_len)
    params, batch_stats, opt_state, loss, acc = step(params, batch_stats, opt_state, jnp.asarray(images[idx]),
                                                     ids, mask, labels, weights, jax.random.key(s))
    accs.append(float(acc))
    if (s + 1) % 25 == 0:
      print(f"step {s + 1:5d}  loss {float(loss):.3f}  probe acc (last 25) {np.mean(accs[-25:]):.3f}  "
            f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
