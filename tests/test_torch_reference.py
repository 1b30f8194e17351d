"""convert/torch_reference.py against the JAX step it mirrors: the training loss of one batch on the same
converted weights, and the optimizer's updates for the same gradients.

Tolerances come from float32 rounding (unit roundoff u = 2^-24): a sum of K products is off by about
sqrt(K) * u relative to its size, and such errors add up along the layers a value passes through."""

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flax import traverse_util  # noqa: E402

from pixelbert_jax import model_context, partitioning, train_step  # noqa: E402
from pixelbert_jax.config_files import load_config  # noqa: E402
from pixelbert_jax.convert import model_mapping as mm  # noqa: E402
from pixelbert_jax.convert import torch_reference as tr  # noqa: E402
from pixelbert_jax.models.presets import model_config  # noqa: E402
from tests import train_helpers as th  # noqa: E402

U = 2.0**-24
VOCAB = 50  # the demo's vocabulary (and VQA's answers) are read off the data; any size does here
STEPS_PER_EPOCH = 10


def _context(spec: str, overrides=(), model=None) -> model_context.StepContext:
  config = load_config(str(th.REPO / "configs" / spec), list(overrides))
  if model is not None:
    config.model = model
  config.model.vocab_size = VOCAB
  if config.task == "vqa":
    config.model.num_answers = 20
  mesh = partitioning.make_mesh(config.mesh_shape, jax.devices()[:1])
  return model_context.StepContext(config, mesh, steps_per_epoch=STEPS_PER_EPOCH, accum_steps=1)


def _batch(config, rng) -> dict:
  """Three examples at the demo's bucket: the third is padding (example_mask 0), the second has padded text.
  Each image has one 64x64 cell masked out, so exactly `num_pixels` (8 of 9) pixels are valid and pixel
  sampling keeps the same ones in both frameworks, whatever their random draws."""
  b, length, (h, w) = 3, config.data.max_text_len, model_context.largest_bucket(config)
  image_mask = np.ones((b, h, w), bool)
  for i, (row, col) in enumerate([(2, 2), (0, 1), (1, 0)]):
    image_mask[i, 64 * row : 64 * row + 64, 64 * col : 64 * col + 64] = False
  image = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8) * image_mask[..., None]
  text_mask = np.ones((b, length), np.int32)
  text_mask[1, length // 2 :] = 0
  batch = dict(
      image=image,
      image_mask=image_mask,
      input_ids=rng.integers(4, VOCAB, (b, length), dtype=np.int32) * text_mask,
      text_mask=text_mask,
      example_mask=np.array([1, 1, 0], np.float32),
  )
  if config.task == "vqa":
    batch["vqa_targets"] = (rng.random((b, config.model.num_answers)) < 0.1).astype(np.float32)
  else:
    batch.update(
        mlm_labels=rng.integers(4, VOCAB, (b, length), dtype=np.int32),
        mlm_weights=((rng.random((b, length)) < 0.3) * text_mask).astype(np.float32),
        itm_label=np.array([1, 0, 1], np.int32),
    )
  return batch


def _loss_tolerance(cfg, loss: float) -> float:
  """Along the deepest path: 3 convolutions per CNN block and the stem, the 1x1 projection, 6 products per
  BERT layer (query/key/value, scores, weighted sum, output, 2 feed-forward), the head; the widest sum is a
  3x3 convolution over the CNN's widest channels or the feed-forward's hidden width."""
  depth = 3 * sum(cfg.cnn.stage_sizes) + 2 + 6 * cfg.num_layers + 2
  widest = max(9 * mm.c5_channels(cfg.cnn), cfg.intermediate_size)
  return depth * math.sqrt(widest) * U * max(1.0, abs(loss))


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, overrides",
    [
        ("pretrain.py:demo_single", []),  # the first demo as it trains: frozen CNN, 8 of 9 pixels, ITM weight 3
        ("pretrain.py:demo_single", ["model.cnn.frozen=false"]),  # the CNN on batch statistics, with gradients
        ("vqa.py:demo", []),
    ],
)
def test_torch_loss_equals_the_jax_loss(spec, overrides):
  ctx = _context(spec, overrides)
  config = ctx.config
  state = ctx.init_state(0)
  batch = _batch(config, np.random.default_rng(0))
  step_loss = jax.jit(
      lambda params, stats, b: train_step.loss_fn(
          params,
          stats,
          b,
          {"dropout": jax.random.key(1), "sample": jax.random.key(2)},
          model=ctx.model,
          task=ctx.task,
          loss_weights=dict(config.get("loss", {})),
          update_batch_stats=config.model.cnn.norm == "bn",
      )
  )
  with partitioning.activate(ctx.mesh), jax.default_matmul_precision("highest"):
    jax_loss, (jax_metrics, _) = step_loss(state["params"], state["batch_stats"], batch)
  jax_loss = float(jax_loss)

  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  model = tr.train_mode(tr.pixelbert_from_flax(config.model, config.task, variables), config.model)
  torch_loss, torch_metrics = tr.make_loss_fn(model, config)({k: torch.from_numpy(v) for k, v in batch.items()})
  torch_loss = float(torch_loss.detach())

  tolerance = _loss_tolerance(config.model, jax_loss)
  assert abs(torch_loss - jax_loss) <= tolerance, (torch_loss, jax_loss, tolerance)
  # The counts behind the means (masked tokens of real examples, real examples) are the same numbers.
  for name, (_, count) in torch_metrics.items():
    assert float(count) == float(jax_metrics[name][1]), name


def _random_grads(params, rng, scale, frozen_cnn: bool):
  """Gradients shaped as `params`, of global norm `scale`; the CNN's are zero when it is frozen, as the
  Flax model's stop_gradient makes them."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  grads = {
      k: np.zeros_like(v) if frozen_cnn and k[:2] == ("encoder", "cnn") else rng.standard_normal(v.shape, np.float32)
      for k, v in flat.items()
  }
  norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
  return traverse_util.unflatten_dict({k: (g * (scale / norm)).astype(np.float32) for k, g in grads.items()})


@pytest.mark.slow
@pytest.mark.parametrize("cnn_optimizer, frozen_cnn", [("sgd", False), ("adamw", True)])
def test_torch_optimizer_follows_optax(cnn_optimizer, frozen_cnn):
  """Six steps of the same gradients through optim.py's optax chain and the PyTorch optimizer: warm-up
  (the first step's learning rate is 0), a decay boundary at step 3, gradients clipped at some steps."""
  model = model_config("tiny", "tiny", VOCAB)
  model.cnn.norm, model.cnn.frozen = "bn", frozen_cnn
  overrides = [
      f"optim.cnn.optimizer={cnn_optimizer}",
      "optim.warmup_steps=2",
      "optim.decay_epochs=(0.3,)",
      "optim.grad_clip_norm=1.0",
  ]
  ctx = _context("pretrain.py:demo_single", overrides, model=model)
  config, state = ctx.config, ctx.init_state(0)
  params, opt_state = state["params"], state["opt_state"]
  torch_model = tr.train_mode(
      tr.pixelbert_from_flax(config.model, "pretrain", {"params": params, "batch_stats": state["batch_stats"]}),
      config.model,
  )
  optimizer = tr.Optimizer(torch_model, config, steps_per_epoch=STEPS_PER_EPOCH)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = ctx.tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda p: 0.0, params)  # per tensor: sum over steps of its largest change
  scales = (0.5, 2.0, 0.8, 3.0, 1.5, 0.3)  # global norms around the clipping norm 1.0
  for scale in scales:
    grads = _random_grads(params, rng, scale, frozen_cnn)
    new_params, opt_state = update(params, opt_state, grads)
    moved = jax.tree.map(lambda m, a, b: m + float(np.max(np.abs(a - b))), moved, new_params, params)
    params = new_params
    exported = mm.export_state_dict({"params": grads, "batch_stats": state["batch_stats"]}, config.model, "pretrain")
    for name, p in torch_model.named_parameters():
      if p.requires_grad:
        p.grad = torch.from_numpy(exported[name])
    optimizer.step()

  want = mm.export_state_dict({"params": params, "batch_stats": state["batch_stats"]}, config.model, "pretrain")
  moved = mm.export_state_dict(
      {
          "params": jax.tree.map(lambda m, p: np.full(np.shape(p), m, np.float32), moved, params),
          "batch_stats": state["batch_stats"],
      },
      config.model,
      "pretrain",
  )
  n = sum(np.size(p) for p in jax.tree.leaves(params))
  got = dict(torch_model.named_parameters())
  for name, value in want.items():
    if name not in got:
      continue
    # Each step, both sides round the new parameter (up to u |p| each, so 2 u |p| apart), and its update,
    # whose clipping factor divides by a global norm summed over n squares (relative error up to sqrt(n) u)
    # and whose Adam / SGD arithmetic adds a few u.
    tolerance = 2 * len(scales) * U * float(np.max(np.abs(value))) + (8 + math.sqrt(n)) * U * float(moved[name].max())
    diff = float(np.max(np.abs(got[name].detach().numpy() - value)))
    assert diff <= tolerance, (name, diff, tolerance)
  # The steps moved every parameter PyTorch trains, and none of those it does not (a frozen CNN).
  assert all((float(moved[name].max()) > 0) == p.requires_grad for name, p in got.items())
