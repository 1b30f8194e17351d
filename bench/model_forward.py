"""Forward and forward+backward time of the Pixel-BERT pre-training model on whatever device JAX finds.

  python -m bench.model_forward                      # demo and base at CPU-friendly sizes
  python -m bench.model_forward --base_image 800x1344 --batch 8 --dtype bfloat16   # on an accelerator

Parameters are random (the timing does not depend on their values); compile time is reported apart.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixelbert_jax.models.build import build_model, dummy_inputs
from pixelbert_jax.models.presets import model_config

SETTINGS = {"demo": ("demo", "demo"), "base": ("base", "r50"), "base-x152": ("base", "x152")}


def random_variables(model, inputs, seed=0):
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), **inputs, train=False)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.ones(s.shape, s.dtype)  # batch-norm variances must be positive
    return jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32))

  return jax.tree_util.tree_map_with_path(fill, shapes)


def time_fn(fn, args, iters):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def bench(name, image_hw, batch, text_len, dtype, iters):
  size, cnn = SETTINGS[name]
  cfg = model_config(size, cnn, vocab_size=30522)
  cfg.dtype = dtype
  model = build_model(cfg, "pretrain")
  inputs = dummy_inputs("pretrain", batch, image_hw, text_len)
  inputs["input_ids"] = jnp.ones_like(inputs["input_ids"])
  variables = random_variables(model, inputs)
  rngs = {"dropout": jax.random.key(1), "sample": jax.random.key(2)}
  n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))

  @jax.jit
  def forward(v, x):
    out = model.apply(v, **x, train=False)
    return out["mlm_logits"], out["itm_logits"]

  @jax.jit
  def forward_backward(v, x):
    def loss(params):
      out = model.apply({**v, "params": params}, **x, train=True, rngs=rngs)
      return jax.nn.logsumexp(out["mlm_logits"], -1).mean() + jax.nn.logsumexp(out["itm_logits"], -1).mean()

    return jax.grad(loss)(v["params"])

  rows = []
  for label, fn in (("forward", forward), ("fwd+bwd", forward_backward)):
    compile_s, step_s = time_fn(fn, (variables, inputs), iters)
    rows.append(
        (
            name,
            f"{n_params / 1e6:.1f}M",
            f"{image_hw[0]}x{image_hw[1]}",
            batch,
            dtype,
            label,
            f"{compile_s:.1f}",
            f"{step_s * 1e3:.1f}",
            f"{batch / step_s:.2f}",
        )
    )
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="demo,base", help="comma list of " + ",".join(SETTINGS))
  p.add_argument("--demo_image", default="192x192")
  p.add_argument("--base_image", default="256x384", help="800x1344 is the paper's R50 size")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--text_len", type=int, default=16)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind} (x{jax.device_count()}), jax {jax.__version__}")
  header = ("model", "params", "image", "batch", "dtype", "pass", "compile s", "step ms", "examples/s")
  rows = []
  for name in args.models.split(","):
    hw = args.demo_image if name == "demo" else args.base_image
    rows += bench(name, tuple(int(v) for v in hw.split("x")), args.batch, args.text_len, args.dtype, args.iters)
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  for r in [header] + rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
  main()
