"""Flax vs PyTorch on the same random padded batch: the check every conversion runs before it succeeds.

Both models run in float32, eval mode, all pixels (the Flax side at `highest` matmul precision and with
`dtype=float32`, `remat=False` whatever the training config said: parameters are float32 either way).
Every output is compared (logits, fused sequence, pooled vector, pixel masks); the largest absolute
differences are reported per output and anything over the tolerance fails the conversion.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from pixelbert_jax import task_table

DEFAULT_TOLERANCE = 1e-4


class VerificationError(RuntimeError):
  """The PyTorch model does not compute what the Flax model computes."""


@dataclasses.dataclass
class Report:
  diffs: dict  # output name -> max abs diff
  tolerance: float
  image_size: tuple
  text_len: int

  @property
  def ok(self) -> bool:
    return all(d <= self.tolerance for d in self.diffs.values())

  def lines(self) -> list:
    worst = sorted(self.diffs.items(), key=lambda kv: -kv[1])
    return [f"  {name:<16} max|flax - torch| = {d:.3e} {'OK' if d <= self.tolerance else 'FAIL'}" for name, d in worst]

  def summary(self) -> str:
    name, d = max(self.diffs.items(), key=lambda kv: kv[1])
    verdict = "agree" if self.ok else "DISAGREE"
    return (
        f"Flax and PyTorch {verdict} on a padded random batch ({self.image_size[0]}x{self.image_size[1]}, "
        f"text {self.text_len}): largest difference {d:.3e} on {name} (tolerance {self.tolerance:.0e})"
    )


def float32_config(cfg) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  cfg.dtype, cfg.remat = "float32", False
  return cfg


def random_batch(
    cfg, task: str, seed: int = 0, image_size=(192, 256), batch: int = 2, text_len: int = 16, pad: bool = True
) -> dict:
  """Random uint8 images where row 1 is padded (real content only top-left), random ids, padded text."""
  h, w = image_size
  if h % 64 or w % 64 or h < 128 or w < 128:
    raise ValueError(f"verification image size {h}x{w}: both sides must be multiples of 64, >= 128")
  rng = np.random.default_rng(seed)
  text_len = min(text_len, cfg.max_position_embeddings)
  out = {}
  for key in task_table.spec(task).images:
    image = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    mask = np.ones((batch, h, w), bool)
    if pad:  # rows 1.. padded off a cell boundary, so cells are split both ways
      mask[1:, h // 2 + 17 :, :] = False
      mask[1:, :, w - 64 - 5 :] = False
    image[~mask] = 0
    out[key], out[f"{key}_mask"] = image, mask
  ids = rng.integers(1, cfg.vocab_size, (batch, text_len)).astype(np.int32)
  text_mask = np.ones((batch, text_len), np.int32)
  text_mask[1:, text_len // 2 :] = 0
  ids[text_mask == 0] = 0
  out.update(input_ids=ids, text_mask=text_mask)
  return out


def _encoder_and_task(module, task, **inputs):
  """The task's outputs plus the encoder's `sequence` / `pooled` of each image (`sequence1` / `pooled1` for
  `image1`), as the PyTorch model returns them."""
  out = dict(module(**inputs, train=False))
  text = {k: inputs[k] for k in ("input_ids", "text_mask")}
  for key in task_table.spec(task).images:
    enc = module.encoder(image=inputs[key], image_mask=inputs[f"{key}_mask"], **text, train=False)
    suffix = key[len("image") :]
    out.update({f"sequence{suffix}": enc["sequence"], f"pooled{suffix}": enc["pooled"]})
  return out


def flax_outputs(cfg, task: str, variables: dict, batch: dict) -> dict:
  from pixelbert_jax.models.build import build_model

  model = build_model(float32_config(cfg), task)
  variables = {k: v for k, v in variables.items() if v or k == "params"}
  with jax.default_matmul_precision("highest"):
    fn = jax.jit(lambda v, b: model.apply(v, **b, method=lambda m, **kw: _encoder_and_task(m, task, **kw)))
    out = fn(variables, batch)
  return {k: np.asarray(v) for k, v in out.items()}


def torch_outputs(torch_model, batch: dict) -> dict:
  import torch

  with torch.no_grad():
    out = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
  return {k: v.numpy() for k, v in out.items()}


def compare(flax_out: dict, torch_out: dict, tolerance: float = DEFAULT_TOLERANCE, **info) -> Report:
  missing = sorted(set(flax_out) ^ set(torch_out))
  if missing:
    raise VerificationError(f"outputs only one side produced: {missing}")
  diffs = {}
  for name in sorted(flax_out):
    a, b = flax_out[name], torch_out[name]
    if a.shape != b.shape:
      raise VerificationError(f"{name}: Flax shape {a.shape}, PyTorch shape {b.shape}")
    if a.dtype == bool or b.dtype == bool:
      diffs[name] = float(np.sum(a.astype(bool) != b.astype(bool)))
    else:
      diffs[name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
      if not np.isfinite(diffs[name]):
        diffs[name] = float("inf")
  return Report(diffs, tolerance, **info)


def verify(
    cfg,
    task: str,
    variables: dict,
    torch_model,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    image_size=(192, 256),
    text_len: int = 16,
) -> Report:
  """Runs both models on one random padded batch; raises VerificationError (with the per-output table)
  unless every output agrees within `tolerance`."""
  batch = random_batch(cfg, task, seed, image_size, text_len=text_len)
  report = compare(
      flax_outputs(cfg, task, variables, batch),
      torch_outputs(torch_model, batch),
      tolerance,
      image_size=tuple(image_size),
      text_len=batch["input_ids"].shape[1],
  )
  if not report.ok:
    raise VerificationError(report.summary() + "\n" + "\n".join(report.lines()))
  return report


def verify_imported_pieces(
    cfg, variables: dict, cnn_state_dict: dict, bert_dir: str, *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0
) -> dict:
  """from-torch's check: the imported CNN's C5 map against torchvision's ResNet built from the same state
  dict (max|diff| / max(1, max|C5|)), and the imported BERT's hidden states against
  `BertModel.from_pretrained(bert_dir)` (max|diff|)."""
  import torch
  import transformers

  from pixelbert_jax.convert.torch_model import build_resnet, resnet_c5
  from pixelbert_jax.models.bert import BertModel
  from pixelbert_jax.models.resnet import resnet_from_config

  rng = np.random.default_rng(seed)
  net = build_resnet(cfg.cnn)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in cnn_state_dict.items() if not k.startswith("fc.")}
  missing, unexpected = net.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing or unexpected:
    raise VerificationError(f"torchvision ResNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
  x = rng.standard_normal((2, 128, 160, 3)).astype(np.float32)
  with torch.no_grad():
    c5_t = resnet_c5(net.eval(), torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  cnn_vars = {c: t["encoder"]["cnn"] for c, t in variables.items() if t}
  ids = rng.integers(1, cfg.vocab_size, (2, min(16, cfg.max_position_embeddings))).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, ids.shape[1] // 2 :] = 0
  transformers.logging.set_verbosity_error()  # the cls.* keys BertModel skips are expected
  hf = transformers.BertModel.from_pretrained(bert_dir).eval()
  with torch.no_grad():
    seq_t = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  f32 = float32_config(cfg)
  with jax.default_matmul_precision("highest"):
    c5_f = resnet_from_config(f32.cnn).apply(cnn_vars, x, False)
    seq_f, _ = BertModel(ml_collections.FrozenConfigDict(f32)).apply(
        {"params": variables["params"]["encoder"]["bert"]}, ids, mask, True
    )
  # C5 of an untrained or ImageNet trunk can be in the hundreds: its check is relative to its scale.
  diffs = {
      "cnn C5 (relative)": float(np.abs(np.asarray(c5_f) - c5_t).max() / max(1.0, np.abs(c5_t).max())),
      "bert hidden states": float(np.abs(np.asarray(seq_f) - seq_t.last_hidden_state.numpy()).max()),
  }
  bad = {k: d for k, d in diffs.items() if not d <= tolerance}
  if bad:
    raise VerificationError(
        "imported weights do not reproduce the PyTorch models: "
        + ", ".join(f"{k} max|diff| {d:.3e} > {tolerance:.0e}" for k, d in bad.items())
    )
  return diffs
