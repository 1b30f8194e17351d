"""The whole Pixel-BERT model <-> `torch_model.py` names, built from mapping.py's tables, for streaming.

`model_rules(cfg, task)` lists every tensor; `check_export` validates a Flax tree against the rules
without copying anything, and `export_tensor` converts one tensor at a time, so a writer never holds
the converted state dict in full.
"""

import dataclasses
from typing import Iterable

import numpy as np

from pixelbert_jax import task_table
from pixelbert_jax.convert.mapping import (
    EXPANSION,
    MappingError,
    Rule,
    _dense,
    _export_one,
    _import,
    _layer_norm,
    _raise,
    _unbox,
    bert_rules,
    cnn_rules,
)


# ------------------------------------------------------------------- the whole model, one tensor at a time
# Names of `pixelbert_jax.convert.torch_model.PixelBert`: `encoder.cnn.` + torchvision, `encoder.bert.` +
# HF BertModel, and the Flax path for the rest (kernel/scale/embedding -> weight).
def _path_name(path: tuple) -> str:
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  return ".".join(path[:-1] + (leaf,))


def _mlp_head(cfg, name: str, d_in: int, n_out: int) -> list:
  hidden = cfg.head_hidden_multiplier * cfg.hidden_size
  return (
      _dense(f"{name}.dense_0", (name, "dense_0"), d_in, hidden)
      + _layer_norm(f"{name}.LayerNorm", (name, "LayerNorm"), hidden)
      + _dense(f"{name}.dense_1", (name, "dense_1"), hidden, n_out)
  )


def c5_channels(cnn_cfg) -> int:
  return cnn_cfg.base_planes * 2 ** (len(cnn_cfg.stage_sizes) - 1) * EXPANSION


# A task's heads (its `head_rules` in task_table.py): (model cfg, bert_rules' groups) -> rules.
def pretrain_head_rules(cfg, bert_groups: dict) -> list:
  heads = bert_groups["mlm_head"] + bert_groups["itm_head"]  # HF's heads, under their Flax paths
  return [dataclasses.replace(r, torch_name=_path_name(r.path)) for r in heads]


def vqa_head_rules(cfg, bert_groups: dict) -> list:
  return _mlp_head(cfg, "vqa_head", cfg.hidden_size, cfg.num_answers)


def nlvr2_head_rules(cfg, bert_groups: dict) -> list:
  return _mlp_head(cfg, "nlvr2_head", 2 * cfg.hidden_size, 2)


def retrieval_head_rules(cfg, bert_groups: dict) -> list:
  return _dense("retrieval_head.dense", ("retrieval_head", "dense"), cfg.hidden_size, 1)


def model_rules(cfg, task: str) -> list:
  """Every tensor of the `task` model (params and batch_stats), named as in torch_model.py."""
  if task not in task_table.TASKS:
    raise MappingError(f"unknown task {task!r}; expected one of {sorted(task_table.TASKS)}")
  d = cfg.hidden_size
  rules = [
      dataclasses.replace(r, torch_name="encoder.cnn." + r.torch_name, path=("encoder", "cnn") + r.path)
      for r in cnn_rules(cfg.cnn)
  ]
  vis = ("encoder", "visual")
  rules += [
      Rule("encoder.visual.proj.weight", "params", vis + ("proj", "kernel"), "conv", (d, c5_channels(cfg.cnn), 1, 1)),
      Rule("encoder.visual.proj.bias", "params", vis + ("proj", "bias"), "copy", (d,)),
      Rule("encoder.visual.semantic", "params", vis + ("semantic",), "copy", (d,)),
  ]
  if cfg.pos_embed_2d:
    rules += [
        Rule(f"encoder.visual.{n}", "params", vis + (n,), "copy", (cfg.max_grid, d)) for n in ("row_embed", "col_embed")
    ]
  groups = bert_rules(cfg, "")
  rules += [
      dataclasses.replace(r, torch_name="encoder.bert." + r.torch_name) for r in groups["core"] + groups["pooler"]
  ]
  return rules + task_table.resolve(task_table.spec(task).head_rules)(cfg, groups)


def tracked_names(rules: Iterable[Rule]) -> list:
  """BatchNorm `num_batches_tracked` buffers (int64 scalars) that strict PyTorch loading expects."""
  return [
      r.torch_name[: -len("running_mean")] + "num_batches_tracked"
      for r in rules
      if r.torch_name.endswith(".running_mean")
  ]


def check_export(variables: dict, rules: Iterable[Rule], what: str) -> None:
  """Raises one MappingError listing every tensor `export_tensor` would fail on; copies nothing."""
  variables = {c: _unbox(t) for c, t in variables.items()}
  errors = []
  for r in rules:
    _export_one(variables, r, errors, convert=False)
  _raise(errors, what)


def export_tensor(variables: dict, rule: Rule) -> np.ndarray:
  """One tensor in PyTorch layout, float32 (call `check_export` first)."""
  errors = []
  arr = _export_one(variables, rule, errors)
  _raise(errors, rule.torch_name)
  return arr


def export_state_dict(variables: dict, cfg, task: str) -> dict:
  """The whole torch_model.py state dict of a Flax tree in memory: NumPy float32, each tensor its own copy (a
  PyTorch model trains them in place), with the `num_batches_tracked` buffers strict loading expects."""
  rules = model_rules(cfg, task)
  check_export(variables, rules, f"Flax -> PyTorch Pixel-BERT ({task})")
  state = {r.torch_name: np.array(export_tensor(variables, r)) for r in rules}
  state.update({n: np.zeros((), np.int64) for n in tracked_names(rules)})
  return state


def model_from_torch(state_dict: dict, cfg, task: str) -> dict:
  """A torch_model.py state dict (or pixelbert.safetensors) -> {'params', 'batch_stats'}; strict."""
  rules = model_rules(cfg, task)
  errors = []
  out = _import(state_dict, rules, errors)
  known = {r.torch_name for r in rules}
  for name in state_dict:
    if name not in known and not name.endswith(".num_batches_tracked"):
      errors.append(f"unexpected {name}: shape {tuple(np.shape(state_dict[name]))}")
  _raise(errors, f"PyTorch Pixel-BERT -> Flax ({task})")
  out.setdefault("params", {})
  out.setdefault("batch_stats", {})
  return out


def hf_bert_config(cfg, **extra):
  """The `transformers.BertConfig` of the model's text/fusion transformer (no torch needed)."""
  import transformers

  return transformers.BertConfig(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size,
      hidden_act="gelu",
      hidden_dropout_prob=cfg.hidden_dropout,
      attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=cfg.type_vocab_size,
      layer_norm_eps=cfg.layer_norm_eps,
      initializer_range=cfg.initializer_range,
      **extra,
  )
