"""What autodiff keeps for the backward pass of one JAX training step: by part of the model, by dtype.

  python -m bench.residuals --workload pretrain-r50                       # configs/pretrain.py:r50, batch 16
  python -m bench.residuals --workload pretrain-r50 --set model.remat=false   # without the config's remat
  python -m bench.residuals --workload demo --batch 32 --set model.cnn.impl=cpu

The trainer's forward and loss (train_step.loss_fn on the config's ModelContext, with the mesh and logical
rules active) are traced under jax.vjp against abstract parameters: nothing runs and
nothing compiles, so any shape takes seconds, on a CPU as for a GPU. The residuals are the values of that
trace which the backward pass reads, each attributed to the Flax module that produced it (its name stack)
and counted once. They are JAX's plan, before XLA: XLA can drop residuals that are broadcast constants
and recompute cheap elementwise ones, so the totals bound the step's activation memory from above, while
the shapes and dtypes are exactly what the model code asks for. The parameters, which the backward also
reads, are not counted; measured peaks are train_step.py's. The workloads are train_step.py's; the CNN is
traced as GPUs and TPUs run it (`model.cnn.impl=generic`) unless `--set` says otherwise.
"""

import argparse
import collections
import functools

from bench import tables, workers, workloads

# Name-stack markers -> part of the model, first match wins (pixel_bert.py's method and module names).
PARTS = (
    ("cnn_features/cnn", "CNN"),
    ("encode_image", "pixel projection"),
    ("bert.encode", "transformer"),
    ("bert.embed_text", "text embeddings"),
)
OTHER_PART = "heads and losses"
DTYPE_COLUMNS = ("bfloat16", "float32", "bool")
# Residuals made by broadcast_in_dim (the zeros of relu's and dropout's select, say): XLA fuses broadcasts
# into their consumers instead of storing them, so they get their own column, outside the total.
BROADCAST = "broadcasts"


def part_of(name_stack: str) -> str:
  return next((part for marker, part in PARTS if marker in name_stack), OTHER_PART)


def saved_residuals(loss_fn, params, *args):
  """-> [(shape, dtype name, bytes, producing primitive, name stack)] of the values that jax.vjp of
  loss_fn(params, *args) keeps for the backward pass, each once; parameters and literals left out."""
  import jax
  import numpy as np

  closed, (_, vjp_shapes) = jax.make_jaxpr(lambda p: jax.vjp(lambda q: loss_fn(q, *args), p), return_shape=True)(params)
  jaxpr = closed.jaxpr
  n_res = len(jax.tree.leaves(vjp_shapes))
  if not 0 < n_res <= len(jaxpr.outvars):
    raise RuntimeError(
        f"jax.vjp's trace has {len(jaxpr.outvars)} outputs and {n_res} residual leaves: "
        f"this jax ({jax.__version__}) lays out the trace differently than expected"
    )
  producer = {id(v): e for e in jaxpr.eqns for v in e.outvars}
  inputs = {id(v) for v in (*jaxpr.invars, *jaxpr.constvars)}
  seen, out = set(), []
  for v in jaxpr.outvars[len(jaxpr.outvars) - n_res :]:
    if type(v).__name__ == "Literal" or id(v) in inputs or id(v) in seen:
      continue
    seen.add(id(v))
    eqn = producer.get(id(v))
    if eqn is None:
      raise RuntimeError(f"residual {v} has no producing equation in the trace")
    aval = v.aval
    nbytes = int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize
    out.append((tuple(aval.shape), aval.dtype.name, nbytes, str(eqn.primitive), str(eqn.source_info.name_stack)))
  return out


def summarize(residuals):
  """-> {part: {column: bytes}}: a column per dtype, 'other', 'total' (their sum) and the broadcasts
  outside it; a 'total' part."""
  table = collections.defaultdict(collections.Counter)
  for _, dtype, nbytes, op, ns in residuals:
    columns = [BROADCAST] if op == "broadcast_in_dim" else [dtype if dtype in DTYPE_COLUMNS else "other", "total"]
    for part in (part_of(ns), "total"):
      for column in columns:
        table[part][column] += nbytes
  return table


def report(args, config, residuals) -> str:
  columns = (*DTYPE_COLUMNS, "other", "total", BROADCAST)
  table = summarize(residuals)
  counts = collections.Counter(part_of(r[4]) for r in residuals)
  counts["total"] = len(residuals)
  parts = [p for p in (*(p for _, p in PARTS), OTHER_PART, "total") if p in table]
  cfg, (h, w) = config.model, workloads.image_hw(config, args.image)
  stored = [r for r in residuals if r[3] != "broadcast_in_dim"]
  largest = sorted(stored, key=lambda r: -r[2])[: args.top]
  overrides = "".join(f" {s}" for s in args.set)
  lines = [
      f"### residuals of one training step: {args.workload} (configs/{workloads.TRAIN[args.workload].config}"
      f"{overrides}): {h}x{w}, {config.data.max_text_len} tokens, {config.task} loss, batch {config.batch_size}, "
      f"{cfg.dtype}, cnn.impl {cfg.cnn.impl}, norm {cfg.cnn.norm}, remat {cfg.remat}",
      "",
      tables.markdown_table(
          ["part", *(f"{c} GiB" for c in columns), "tensors"],
          [[p, *(tables.fmt(tables.gib(table[p][c]), ".3f") for c in columns), counts[p]] for p in parts],
      ),
  ]
  if largest:
    lines += [
        "",
        f"largest {len(largest)} (broadcasts left out):",
        "",
        tables.markdown_table(
            ["MiB", "dtype", "shape", "op", "module (name stack)"],
            [[f"{b / 2**20:.1f}", d, list(s), o, n] for s, d, b, o, n in largest],
        ),
    ]
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m bench.residuals", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workload", default="pretrain-r50", choices=sorted(workloads.TRAIN))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
  p.add_argument("--batch", type=int, default=16, help="global batch (default 16, gpu_run.sh's)")
  p.add_argument("--image", default=None, help="HxW instead of the config's largest bucket")
  p.add_argument("--top", type=int, default=15, help="how many of the largest residuals to list")
  p.add_argument("--json", default=None, help="write the table and the residual list here")
  args = p.parse_args(argv)
  if args.batch < 1:
    p.error(f"--batch must be positive, got {args.batch}")
  try:
    load_config(args)
  except (ValueError, FileNotFoundError) as e:
    p.error(str(e))
  return args


def load_config(args):
  overrides = ["model.cnn.impl=generic", *args.set]  # the GPU and TPU lowering unless --set says otherwise
  return workloads.load(workloads.TRAIN[args.workload], overrides, batch=args.batch)


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp

  from pixelbert_jax import model_context, partitioning
  from pixelbert_jax import train_step as train_step_lib

  config = load_config(args)
  ctx = model_context.ModelContext(config, partitioning.make_mesh(config.mesh_shape, jax.devices()[:1]))
  abstract = ctx.abstract_variables
  stats = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract["batch_stats"])
  batch = workloads.synthetic_batch(config, config.batch_size, workloads.image_hw(config, args.image))
  loss_fn = functools.partial(
      train_step_lib.loss_fn,
      model=ctx.model,
      task=ctx.task,
      loss_weights=dict(config.get("loss", {})),
      update_batch_stats=config.model.cnn.norm == "bn",
  )
  rngs = {"dropout": jax.random.key(0), "sample": jax.random.key(1)}
  with partitioning.activate(ctx.mesh):
    residuals = saved_residuals(lambda p, *a: loss_fn(p, *a)[0], abstract["params"], stats, batch, rngs)
  print(report(args, config, residuals))
  workers.write_json(
      args.json,
      dict(
          args=vars(args),
          table={k: dict(v) for k, v in summarize(residuals).items()},
          residuals=[dict(shape=list(s), dtype=d, bytes=b, op=o, name_stack=n) for s, d, b, o, n in residuals],
      ),
  )


if __name__ == "__main__":
  main()
