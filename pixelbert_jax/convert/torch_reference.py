"""A training step of `torch_model.PixelBert` that computes what the JAX step computes, for comparisons.

The forward pass in training mode (pixel sampling, dropout, batch statistics as the config says), the
pre-training loss of tasks/pretrain.py (MLM + ITM) and the VQA loss of tasks/vqa.py, and the optimizer of
optim.py: SGD + momentum with coupled weight decay (or AdamW) for the CNN, AdamW for the rest, weight decay on
matrices and kernels only, the warm-up and step-decay schedules, clipping by the global gradient norm.
`bench/train_step.py` times this step against the JAX one, and the tests hold it to the JAX step on the same
converted weights.

The optimizer has one definition: its parameter groups are optim.py's own labels and decay mask, evaluated
on the Flax parameter tree and carried to PyTorch names by model_mapping's rules, and its learning rates are
optim.py's schedules evaluated once per step number. What stays PyTorch's is the update arithmetic of
torch.optim.SGD and AdamW, which equals optax's (sgd with a momentum trace, adamw with decoupled decay).

    model = train_mode(pixelbert_from_flax(config.model, config.task, variables), config.model)
    loss_fn, optimizer = make_loss_fn(model, config), Optimizer(model, config, steps_per_epoch=100)
    loss, metrics = loss_fn(batch)  # batch: torch tensors named as the JAX batch
    loss.backward()
    grad_norm = optimizer.step()
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import torch
from flax import traverse_util
from torch.nn import functional as F

from pixelbert_jax import optim
from pixelbert_jax.convert import model_mapping
from pixelbert_jax.convert.torch_model import PixelBert, pixelbert_from_state_dict

TASKS = ("pretrain", "vqa")


def pixelbert_from_flax(cfg: ml_collections.ConfigDict, task: str, variables: dict) -> PixelBert:
  """The PyTorch model with the weights of Flax `variables` ({'params', 'batch_stats'}), in eval mode."""
  return pixelbert_from_state_dict(cfg, task, model_mapping.export_state_dict(variables, cfg, task))


def train_mode(model: PixelBert, cfg: ml_collections.ConfigDict) -> PixelBert:
  """Puts `model` in the Flax model's training mode for `cfg` (config.model): dropout on; batch norm `bn` on
  batch statistics; `frozen_bn` on its running statistics with a constant affine; a frozen CNN
  (`cnn.frozen`) on running statistics with no gradient at all (Flax stops the gradient at its output);
  `remat`: each BERT layer recomputed in the backward pass, as nn.remat does."""
  model.train()
  cnn = model.encoder.cnn
  if cfg.cnn.get("frozen", False):
    cnn.eval()
    cnn.requires_grad_(False)
  elif cfg.cnn.norm == "frozen_bn":
    for m in cnn.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
        m.requires_grad_(False)
  if cfg.remat:
    model.encoder.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  return model


def sample_pixels(pixels: torch.Tensor, pixel_mask: torch.Tensor, k: int, generator=None):
  """models/pixel_bert.py `sample_pixels`: k distinct pixels per image, uniformly among the valid ones, kept in
  grid order; k >= P returns the input. The draw is PyTorch's, so only which pixels are valid is shared."""
  if k >= pixel_mask.shape[1]:
    return pixels, pixel_mask
  noise = torch.rand(pixel_mask.shape, device=pixels.device, generator=generator)
  scores = noise.masked_fill(~pixel_mask.bool(), float("-inf"))
  idx = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
  return torch.gather(pixels, 1, idx[..., None].expand(-1, -1, pixels.shape[-1])), torch.gather(pixel_mask, 1, idx)


def train_outputs(model: PixelBert, cfg: ml_collections.ConfigDict, task: str, batch: dict) -> dict:
  """The task head's logits in training mode: pre-training samples pixels (cfg.pixel_sampling), fine-tuning
  keeps them all, as the Flax heads do."""
  if task not in TASKS:
    raise ValueError(f"the PyTorch reference step covers the tasks {TASKS}, not {task!r}")
  enc = model.encoder
  pixels, pixel_mask = enc.encode_image(batch["image"], batch["image_mask"])
  if task == "pretrain" and cfg.pixel_sampling.enabled:
    pixels, pixel_mask = sample_pixels(pixels, pixel_mask, cfg.pixel_sampling.num_pixels)
  seq, pooled = enc.fuse(batch["input_ids"], batch["text_mask"], pixels, pixel_mask)
  if task == "vqa":
    return {"vqa_logits": model.vqa_head(pooled)}
  text = seq[:, : batch["input_ids"].shape[1]]
  return {
      "mlm_logits": model.mlm_head(text, enc.bert.embeddings.word_embeddings.weight),
      "itm_logits": model.itm_head(pooled),
  }


def _masked_mean(values: torch.Tensor, weights: torch.Tensor):
  """tasks/reduce.py: (sum(values * weights) / max(count, 1), count)."""
  count = weights.sum()
  return (values * weights).sum() / count.clamp_min(1.0), count


def pretrain_loss(outputs: dict, batch: dict, *, mlm_weight: float = 1.0, itm_weight: float = 1.0):
  """tasks/pretrain.py `loss_and_metrics` (without the grounded-word metric): (loss, metrics as (sum, count))."""
  mlm_logits, itm_logits = outputs["mlm_logits"].float(), outputs["itm_logits"].float()
  example_mask = batch["example_mask"].float()
  mlm_w = batch["mlm_weights"].float() * example_mask[:, None]
  labels = batch["mlm_labels"].long()
  mlm_xent = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(mlm_w)
  mlm_loss, mlm_n = _masked_mean(mlm_xent, mlm_w)
  itm_labels = batch["itm_label"].long()
  itm_loss, itm_n = _masked_mean(F.cross_entropy(itm_logits, itm_labels, reduction="none"), example_mask)
  loss = mlm_weight * mlm_loss + itm_weight * itm_loss
  one = torch.ones((), device=loss.device)
  return loss, {
      "loss": (loss, one),
      "mlm_loss": (mlm_loss, one),
      "itm_loss": (itm_loss, one),
      "mlm_acc": (((mlm_logits.argmax(-1) == labels).float() * mlm_w).sum(), mlm_n),
      "itm_acc": (((itm_logits.argmax(-1) == itm_labels).float() * example_mask).sum(), itm_n),
  }


def vqa_loss(outputs: dict, batch: dict, **unused_weights):
  """tasks/vqa.py `loss_and_metrics`: BCE summed over the answers, averaged over the real examples."""
  logits, targets = outputs["vqa_logits"].float(), batch["vqa_targets"].float()
  mask = batch["example_mask"].float()
  bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
  loss, n = _masked_mean(bce, mask)
  score = torch.gather(targets, 1, logits.argmax(-1, keepdim=True))[:, 0]
  return loss, {"loss": (loss, torch.ones((), device=loss.device)), "vqa_score": ((score * mask).sum(), n)}


LOSSES = {"pretrain": pretrain_loss, "vqa": vqa_loss}


def make_loss_fn(model: PixelBert, config: ml_collections.ConfigDict, *, autocast: bool = False):
  """batch -> (loss, metrics) of `config.task` with the config's loss weights. `autocast`: the forward pass
  in bfloat16 (torch.autocast), float32 parameters and losses, as the JAX model's `dtype=bfloat16`."""
  task, cfg, weights = config.task, config.model, dict(config.get("loss", {}))
  if task not in LOSSES:
    raise ValueError(f"the PyTorch reference step covers the tasks {TASKS}, not {task!r}")

  def loss_fn(batch):
    with torch.autocast(batch["image"].device.type, dtype=torch.bfloat16, enabled=autocast):
      outputs = train_outputs(model, cfg, task, batch)
    return LOSSES[task](outputs, batch, **weights)

  return loss_fn


def _flax_params_by_torch_name(cfg, task: str) -> dict:
  """{torch parameter name: (Flax path, Flax shape)} from model_mapping's rules (parameters only)."""
  return {
      r.torch_name: (r.path, r.flax_shape) for r in model_mapping.model_rules(cfg, task) if r.collection == "params"
  }


class Optimizer:
  """optim.make_optimizer for a PyTorch `model` of `config`. `step()` after `loss.backward()`: the global
  gradient norm (before clipping, as the JAX step logs it), clipping as optax.clip_by_global_norm, one update
  with this step's learning rates, the gradients cleared. `fused`: torch's fused CUDA kernels (the
  arithmetic is the same)."""

  def __init__(self, model: PixelBert, config: ml_collections.ConfigDict, *, steps_per_epoch: int, fused=False):
    o = config.optim
    flax_params = _flax_params_by_torch_name(config.model, config.task)
    abstract = traverse_util.unflatten_dict(
        {path: jax.ShapeDtypeStruct(shape, np.float32) for path, shape in flax_params.values()}
    )
    _, schedules = optim.make_optimizer(config, abstract, steps_per_epoch=steps_per_epoch)
    labels = traverse_util.flatten_dict(optim.param_labels(abstract, freeze_cnn=bool(config.model.cnn.frozen)))
    decays = traverse_util.flatten_dict(optim.decay_mask(abstract))
    groups = {}  # (label, decayed) -> parameters
    for name, p in model.named_parameters():
      if name not in flax_params:
        raise ValueError(f"PyTorch parameter {name} has no Flax counterpart in model_mapping's rules")
      path = flax_params[name][0]
      # 'frozen' is optax.set_to_zero; a parameter without gradient (frozen batch norm) never moves in either.
      if labels[path] != "frozen" and p.requires_grad:
        groups.setdefault((labels[path], bool(decays[path])), []).append(p)
    kwargs = {"fused": True} if fused else {}
    adam = dict(betas=(o.transformer.b1, o.transformer.b2), eps=o.transformer.eps, **kwargs)
    cnn_kind = o.cnn.get("optimizer", "sgd")
    self.optimizers, self._labels = [], []
    for label in ("cnn", "transformer"):
      wd = o[label].weight_decay
      param_groups = [
          {"params": groups[(label, decayed)], "weight_decay": wd if decayed else 0.0}
          for decayed in (True, False)
          if (label, decayed) in groups
      ]
      if not param_groups:
        continue
      if label == "cnn" and cnn_kind == "sgd":
        opt = torch.optim.SGD(param_groups, lr=o.cnn.lr, momentum=o.cnn.momentum, **kwargs)
      else:
        opt = torch.optim.AdamW(param_groups, lr=o[label].lr, **adam)
      self.optimizers.append(opt)
      self._labels.append(label)
    self.params = [p for ps in groups.values() for p in ps]
    self.clip = float(o.grad_clip_norm or 0.0)
    # The schedules are piecewise: constant after the warm-up and the last decay boundary, so a table up to
    # there, evaluated at once, gives every step's learning rate.
    decay_steps = [int(round(e * steps_per_epoch)) for e in o.decay_epochs]
    horizon = max([int(o.warmup_steps), *decay_steps]) + 2
    self._lrs = {k: np.asarray(s(np.arange(horizon)), np.float64) for k, s in schedules.items()}
    self.count = 0

  def learning_rate(self, label: str, step: int) -> float:
    table = self._lrs[label]
    return float(table[min(step, len(table) - 1)])

  def step(self) -> torch.Tensor:
    for p in self.params:
      if p.grad is None:  # optax updates a parameter whose gradient is zero (weight decay, momentum)
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in self.params]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if self.clip > 0:
      # A tensor, not a Python branch: no host synchronisation.
      torch._foreach_mul_(grads, torch.where(norm < self.clip, 1.0, self.clip / norm))
    for opt, label in zip(self.optimizers, self._labels):
      for group in opt.param_groups:
        group["lr"] = self.learning_rate(label, self.count)
      opt.step()
      opt.zero_grad(set_to_none=True)
    self.count += 1
    return norm
