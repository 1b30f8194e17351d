"""Orbax checkpoint -> PyTorch files, then verified against the Flax model before it counts as done.

OUT/cnn.safetensors            torchvision ResNet/ResNeXt names (load into a torchvision ResNet, fc=Identity)
OUT/text_encoder/              HF folder: config.json + model.safetensors (BertModel; with the MLM head
                               BertForPreTraining names, so BertForMaskedLM loads it too)
OUT/pixelbert.safetensors      the whole model (torch_model.py names) + OUT/pixelbert_config.json
OUT/README.md                  how to load each piece

Every file is streamed tensor by tensor from the restored Flax tree: the host holds the checkpoint once,
plus one converted tensor at a time; verification reads the written files back as memory maps.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import paths, task_table
from pixelbert_jax.convert import model_mapping as mm
from pixelbert_jax.convert.mapping import bert_rules, cnn_rules
from pixelbert_jax.convert.safetensors_io import write_safetensors
from pixelbert_jax.models.build import build_model, init_variables

FORMAT_VERSION = 1


def model_shapes(cfg, task: str) -> dict:
  """{'params', 'batch_stats'} of ShapeDtypeStructs for the model `cfg` builds (nothing allocated)."""
  model = build_model(cfg, task)
  shapes = jax.eval_shape(lambda: nn.unbox(init_variables(model, jax.random.key(0), task)))
  return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def load_checkpoint(path: str, step: int | None = None, expect_model: dict | None = None):
  """-> (variables, cfg, task, step, meta). Refuses a checkpoint whose parameters are not the ones its
  own `meta` (or `expect_model`, when given) describes, naming the checkpoint and the tensors."""
  variables, meta, step = ckpt_lib.load_model_variables(path, step)
  where = f"Orbax checkpoint {path} (step {step})"
  if "task" not in meta or "model" not in meta:
    raise ValueError(f"{where}: meta has no task/model (keys {sorted(meta)}); not a pixelbert_jax checkpoint")
  cfg = ml_collections.ConfigDict(meta["model"])
  if expect_model is not None:
    diff = _config_diff(dict(expect_model), meta["model"])
    if diff:
      raise ckpt_lib.CheckpointMismatchError(f"{where} was trained with another model config: {'; '.join(diff[:5])}")
  ckpt_lib.compare_shapes(model_shapes(cfg, meta["task"]), variables, what=where)
  return variables, cfg, meta["task"], step, meta


def _config_diff(want: dict, got: dict, prefix: str = "") -> list:
  out = []
  for k in sorted(set(want) | set(got)):
    a, b = want.get(k, "<absent>"), got.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f"{prefix}{k}.")
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
      out.append(f"model.{prefix}{k}: expected {a!r}, checkpoint has {b!r}")
  return out


def _write_rules(path: str, variables: dict, rules: list, what: str) -> int:
  mm.check_export(variables, rules, what)
  by_name = {r.torch_name: r for r in rules}
  tracked = mm.tracked_names(rules)
  specs = [(r.torch_name, r.torch_shape, np.float32) for r in rules] + [(n, (), np.int64) for n in tracked]

  def produce(name):
    return np.zeros((), np.int64) if name not in by_name else mm.export_tensor(variables, by_name[name])

  return write_safetensors(path, specs, produce, metadata={"format": "pt"})


def write_cnn(out: str, variables: dict, cfg) -> str:
  path = os.path.join(out, "cnn.safetensors")
  cnn = {c: t["encoder"]["cnn"] for c, t in variables.items() if t and "encoder" in t}
  _write_rules(path, cnn, cnn_rules(cfg.cnn), "Flax CNN -> torchvision")
  return path


def write_text_encoder(out: str, variables: dict, cfg, task: str) -> str:
  """HF folder. A model with BERT's own heads (task_table.py `bert_heads`: pre-training) keeps its MLM (and
  ITM) head under BertForPreTraining names; the decoder is tied to the word embeddings and, as in HF's own
  files, not stored twice."""
  folder = os.path.join(out, "text_encoder")
  os.makedirs(folder, exist_ok=True)
  with_heads = task_table.spec(task).bert_heads
  groups = bert_rules(cfg, "bert." if with_heads else "")
  rules = groups["core"] + groups["pooler"] + (groups["mlm_head"] + groups["itm_head"] if with_heads else [])
  _write_rules(os.path.join(folder, "model.safetensors"), variables, rules, "Flax -> HF BERT")
  arch = "BertForPreTraining" if with_heads else "BertModel"
  mm.hf_bert_config(cfg, architectures=[arch]).save_pretrained(folder)
  return folder


def write_pixelbert(out: str, variables: dict, cfg, task: str, meta: dict) -> str:
  path = os.path.join(out, "pixelbert.safetensors")
  _write_rules(path, variables, mm.model_rules(cfg, task), f"Flax -> PyTorch Pixel-BERT ({task})")
  with open(os.path.join(out, "pixelbert_config.json"), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, "task": task, "model": cfg.to_dict(), **meta}, f, indent=2)
  return path


README = """# Pixel-BERT ({task}) exported from {source} (step {step})

Written by `python -m pixelbert_jax.convert to-torch`. {verified}

| file | what | load with |
|---|---|---|
| `cnn.safetensors` | the CNN (torchvision ResNet/ResNeXt names, no `fc`) | `net = torchvision.models.resnet.ResNet(Bottleneck, {stages}, groups={groups}, width_per_group={wpg}); net.fc = torch.nn.Identity(); net.load_state_dict(safetensors.torch.load_file("cnn.safetensors"))`{stem_note} |
| `text_encoder/` | the text/fusion transformer | `transformers.BertModel.from_pretrained("text_encoder")`{mlm_note} |
| `pixelbert.safetensors` + `pixelbert_config.json` | the whole model: CNN, visual embedder, BERT, heads | `pixelbert_jax.convert.torch_model.load_pixelbert(".")` |

The whole model takes `image` uint8 [B,H,W,3] (not normalised), `image_mask` bool [B,H,W] (padding
bottom/right), `input_ids` and `text_mask` [B,L], as the Flax model does, and runs in eval mode with all
pixels. The CNN's norm is `{norm}`{norm_note}.
"""


def write_readme(out: str, cfg, task: str, source: str, step: int, report) -> None:
  c = cfg.cnn
  custom = c.stem_width != 64 or c.base_planes != 64
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(
        README.format(
            task=task,
            source=source,
            step=step,
            stages=list(c.stage_sizes),
            groups=c.groups,
            wpg=c.width_per_group,
            verified=(
                report.summary() + "."
                if report is not None
                else "**NOT VERIFIED** (`--no-verify`): outputs were never compared with the Flax model."
            ),
            stem_note=(
                f" — this CNN has stem width {c.stem_width} and base planes {c.base_planes}, not "
                "torchvision's 64/64: use `pixelbert_jax.convert.torch_model.build_resnet`"
                if custom
                else ""
            ),
            mlm_note=(
                "; `BertForMaskedLM` / `BertForPreTraining` load the MLM (and ITM) head from it too"
                if task_table.spec(task).bert_heads
                else ""
            ),
            norm=c.norm,
            norm_note=(
                ": `BatchNorm2d` with the running statistics (call `.eval()`)" if c.norm != "gn" else ": `GroupNorm`"
            ),
        )
    )


def check_pieces(out: str, torch_model) -> list:
  """The separate files load strictly into torchvision / transformers and hold the whole model's tensors."""
  import torch
  import transformers
  from safetensors.torch import load_file

  from pixelbert_jax.convert.torch_model import build_resnet

  problems = []
  cfg = ml_collections.ConfigDict(json.load(open(os.path.join(out, "pixelbert_config.json")))["model"])
  net = build_resnet(cfg.cnn)
  net.load_state_dict(load_file(os.path.join(out, "cnn.safetensors")), strict=True)
  transformers.logging.set_verbosity_error()  # the cls.* keys BertModel skips are expected, not news
  bert, info = transformers.BertModel.from_pretrained(os.path.join(out, "text_encoder"), output_loading_info=True)
  if info["missing_keys"] or info["mismatched_keys"]:
    problems.append(f"text_encoder: missing {info['missing_keys'][:3]}, mismatched {info['mismatched_keys'][:3]}")
  for name, piece, whole in (
      ("cnn.safetensors", net, torch_model.encoder.cnn),
      ("text_encoder", bert, torch_model.encoder.bert),
  ):
    ref = whole.state_dict()
    for k, v in piece.state_dict().items():
      if k in ref and not torch.equal(v, ref[k]):
        problems.append(f"{name}: {k} differs from pixelbert.safetensors")
  return problems


def check_out(out: str, overwrite: bool) -> None:
  """OUT must be a new or empty folder, unless `overwrite`: an export written over another would mix the two
  (a README of one beside the weights of the other, if the second run fails half-way)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out} is a file, not a folder")
  entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if entries and not overwrite:
    raise ValueError(
        f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]}): choose a new folder, or pass "
        "--overwrite to write this export's files over it"
    )


def to_torch(
    checkpoint: str,
    out: str,
    step: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
    log=print,
    overwrite: bool = False,
):
  """Writes OUT (a new or empty folder unless `overwrite`) and (unless verify=False) checks it; returns the
  verification Report or None."""
  checkpoint, out = paths.resolve(checkpoint), paths.resolve(out)  # '~' and relative paths (paths.py)
  check_out(out, overwrite)
  variables, cfg, task, step, meta = load_checkpoint(checkpoint, step)
  os.makedirs(out, exist_ok=True)
  info = {
      "source": os.path.abspath(checkpoint),
      "step": int(step),
      "vocab_size": int(cfg.vocab_size),
      "data": meta.get("data", ""),
  }
  write_cnn(out, variables, cfg)
  write_text_encoder(out, variables, cfg, task)
  write_pixelbert(out, variables, cfg, task, info)
  report = None
  if verify:
    from pixelbert_jax.convert import verify as verify_lib
    from pixelbert_jax.convert.torch_model import load_pixelbert

    torch_model = load_pixelbert(out)
    report = verify_lib.verify(cfg, task, variables, torch_model, tolerance=tolerance)
    problems = check_pieces(out, torch_model)
    if problems:
      raise verify_lib.VerificationError("; ".join(problems[:5]))
    log(report.summary())
    for line in report.lines():
      log(line)
  write_readme(out, cfg, task, checkpoint, step, report)
  return report
