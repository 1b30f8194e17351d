"""Declarative name mapping between torchvision / HF BERT state dicts and the Flax parameter trees.

Each `Rule` names one PyTorch tensor, the Flax collection and path it lives at, and how its layout
changes (`conv`: OIHW <-> HWIO, `linear`: (out, in) <-> (in, out), `copy`). The same table drives both
directions, works on dicts of NumPy arrays (no torch import) and rejects, in one error listing them all,
every missing, unexpected, misshapen or non-float tensor.
"""

import dataclasses
from typing import Any, Iterable

import numpy as np

TO_FLAX = {"conv": lambda a: a.transpose(2, 3, 1, 0), "linear": lambda a: a.T, "copy": lambda a: a}
TO_TORCH = {"conv": lambda a: a.transpose(3, 2, 0, 1), "linear": lambda a: a.T, "copy": lambda a: a}
EXPANSION = 4


class MappingError(ValueError):
  """Raised with every problem of one conversion listed, one per line."""


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_name: str
  collection: str  # "params" | "batch_stats"
  path: tuple  # Flax path inside the collection
  kind: str  # "conv" | "linear" | "copy"
  torch_shape: tuple

  @property
  def flax_shape(self) -> tuple:
    return TO_FLAX[self.kind](np.empty(self.torch_shape, np.uint8)).shape


# --------------------------------------------------------------------------------------------- tables
def _norm_rules(torch_prefix: str, path: tuple, channels: int, norm: str) -> list:
  rules = [
      Rule(f"{torch_prefix}.weight", "params", path + ("scale",), "copy", (channels,)),
      Rule(f"{torch_prefix}.bias", "params", path + ("bias",), "copy", (channels,)),
  ]
  if norm in ("frozen_bn", "bn"):
    rules += [
        Rule(f"{torch_prefix}.running_mean", "batch_stats", path + ("mean",), "copy", (channels,)),
        Rule(f"{torch_prefix}.running_var", "batch_stats", path + ("var",), "copy", (channels,)),
    ]
  return rules


def _conv_rule(name: str, path: tuple, out_c: int, in_c: int, k: int) -> Rule:
  return Rule(f"{name}.weight", "params", path + ("kernel",), "conv", (out_c, in_c, k, k))


def cnn_rules(cnn_cfg) -> list:
  """Rules for the ResNet trunk, Flax paths relative to the `cnn` subtree (see models/resnet.py)."""
  norm = cnn_cfg.norm
  rules = [_conv_rule("conv1", ("conv1",), cnn_cfg.stem_width, 3, 7)]
  rules += _norm_rules("bn1", ("bn1",), cnn_cfg.stem_width, norm)
  in_c = cnn_cfg.stem_width
  for s, blocks in enumerate(cnn_cfg.stage_sizes):
    planes = cnn_cfg.base_planes * 2**s
    width = int(planes * (cnn_cfg.width_per_group / 64.0)) * cnn_cfg.groups
    out_c = planes * EXPANSION
    for b in range(blocks):
      t, p = f"layer{s + 1}.{b}", (f"layer{s + 1}", str(b))
      rules.append(_conv_rule(f"{t}.conv1", p + ("conv1",), width, in_c, 1))
      rules += _norm_rules(f"{t}.bn1", p + ("bn1",), width, norm)
      rules.append(_conv_rule(f"{t}.conv2", p + ("conv2",), width, width // cnn_cfg.groups, 3))
      rules += _norm_rules(f"{t}.bn2", p + ("bn2",), width, norm)
      rules.append(_conv_rule(f"{t}.conv3", p + ("conv3",), out_c, width, 1))
      rules += _norm_rules(f"{t}.bn3", p + ("bn3",), out_c, norm)
      if b == 0 and (s > 0 or in_c != out_c):
        rules.append(_conv_rule(f"{t}.downsample.0", p + ("downsample", "0"), out_c, in_c, 1))
        rules += _norm_rules(f"{t}.downsample.1", p + ("downsample", "1"), out_c, norm)
      in_c = out_c
  return rules


def _dense(name: str, path: tuple, n_in: int, n_out: int) -> list:
  return [
      Rule(f"{name}.weight", "params", path + ("kernel",), "linear", (n_out, n_in)),
      Rule(f"{name}.bias", "params", path + ("bias",), "copy", (n_out,)),
  ]


def _layer_norm(name: str, path: tuple, d: int) -> list:
  return [
      Rule(f"{name}.weight", "params", path + ("scale",), "copy", (d,)),
      Rule(f"{name}.bias", "params", path + ("bias",), "copy", (d,)),
  ]


def bert_rules(cfg, prefix: str = "") -> dict:
  """Rule groups `core`, `pooler`, `mlm_head`, `itm_head`; Flax paths from the task model's params root.

  `prefix` is "" for BertModel names and "bert." for BertForMaskedLM / BertForPreTraining names.
  """
  d, inter = cfg.hidden_size, cfg.intermediate_size
  root = ("encoder", "bert")
  emb = root + ("embeddings",)
  core = [
      Rule(f"{prefix}embeddings.{n}.weight", "params", emb + (n, "embedding"), "copy", (rows, d))
      for n, rows in (
          ("word_embeddings", cfg.vocab_size),
          ("position_embeddings", cfg.max_position_embeddings),
          ("token_type_embeddings", cfg.type_vocab_size),
      )
  ]
  core += _layer_norm(f"{prefix}embeddings.LayerNorm", emb + ("LayerNorm",), d)
  for i in range(cfg.num_layers):
    t, p = f"{prefix}encoder.layer.{i}", root + ("encoder", f"layer_{i}")
    for n in ("query", "key", "value"):
      core += _dense(f"{t}.attention.self.{n}", p + ("attention", "self", n), d, d)
    core += _dense(f"{t}.attention.output.dense", p + ("attention", "output", "dense"), d, d)
    core += _layer_norm(f"{t}.attention.output.LayerNorm", p + ("attention", "output", "LayerNorm"), d)
    core += _dense(f"{t}.intermediate.dense", p + ("intermediate", "dense"), d, inter)
    core += _dense(f"{t}.output.dense", p + ("output", "dense"), inter, d)
    core += _layer_norm(f"{t}.output.LayerNorm", p + ("output", "LayerNorm"), d)
  mlm = _dense("cls.predictions.transform.dense", ("mlm_head", "dense"), d, d)
  mlm += _layer_norm("cls.predictions.transform.LayerNorm", ("mlm_head", "LayerNorm"), d)
  mlm.append(Rule("cls.predictions.bias", "params", ("mlm_head", "bias"), "copy", (cfg.vocab_size,)))
  return dict(
      core=core,
      pooler=_dense(f"{prefix}pooler.dense", root + ("pooler", "dense"), d, d),
      mlm_head=mlm,
      itm_head=_dense("cls.seq_relationship", ("itm_head", "dense"), d, 2),
  )


# ------------------------------------------------------------------------------------------- engines
def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Any, path: tuple):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _as_float_array(name: str, value, errors: list):
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
    errors.append(f"{name}: dtype {arr.dtype} is not a float weight")
    return None
  return arr.astype(np.float32)


def _raise(errors: list, what: str) -> None:
  if errors:
    raise MappingError(f"{what}: {len(errors)} problem(s)\n  " + "\n  ".join(errors))


def _import(state_dict: dict, rules: Iterable[Rule], errors: list) -> dict:
  out = {}
  for r in rules:
    if r.torch_name not in state_dict:
      errors.append(f"missing {r.torch_name}: expected shape {r.torch_shape}")
      continue
    arr = _as_float_array(r.torch_name, state_dict[r.torch_name], errors)
    if arr is None:
      continue
    if arr.shape != r.torch_shape:
      errors.append(f"misshapen {r.torch_name}: expected {r.torch_shape}, got {arr.shape}")
      continue
    _set(out.setdefault(r.collection, {}), r.path, np.ascontiguousarray(TO_FLAX[r.kind](arr)))
  return out


def _export_one(variables: dict, r: Rule, errors: list, convert: bool = True):
  value = _get(variables.get(r.collection, {}), r.path)
  where = f"{r.collection}/{'/'.join(r.path)}"
  if value is None:
    errors.append(f"missing {where} (for {r.torch_name}): expected shape {r.flax_shape}")
    return None
  dtype = np.dtype(getattr(value, "dtype", np.float32))
  if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
    errors.append(f"{where}: dtype {dtype} is not a float weight")
    return None
  if tuple(np.shape(value)) != r.flax_shape:
    errors.append(f"misshapen {where} (for {r.torch_name}): expected {r.flax_shape}, got " f"{tuple(np.shape(value))}")
    return None
  if not convert:
    return True
  return np.ascontiguousarray(TO_TORCH[r.kind](np.asarray(value).astype(np.float32, copy=False)))


def _export(variables: dict, rules: Iterable[Rule], errors: list) -> dict:
  out = {}
  for r in rules:
    arr = _export_one(variables, r, errors)
    if arr is not None:
      out[r.torch_name] = arr
  return out


def _unbox(tree):
  """Plain arrays from a tree that may hold flax `Partitioned` boxes (without importing flax here)."""
  if isinstance(tree, dict) or hasattr(tree, "items") and not hasattr(tree, "shape"):
    return {k: _unbox(v) for k, v in tree.items()}
  return tree.unbox() if hasattr(tree, "unbox") else tree


# -------------------------------------------------------------------------------------------- public
def cnn_from_torchvision(state_dict: dict, cnn_cfg) -> dict:
  """torchvision ResNet/ResNeXt state dict -> {'params': cnn tree, 'batch_stats': cnn tree}.

  `fc.*` (the ImageNet classifier) and `num_batches_tracked` are accepted and ignored.
  """
  errors = []
  rules = cnn_rules(cnn_cfg)
  out = _import(state_dict, rules, errors)
  known = {r.torch_name for r in rules}
  for name in state_dict:
    if name not in known and not name.endswith(".num_batches_tracked") and name not in ("fc.weight", "fc.bias"):
      errors.append(f"unexpected {name}: shape {tuple(np.shape(state_dict[name]))}")
  _raise(errors, f"torchvision -> Flax CNN ({cnn_cfg.get('name', 'cnn')}, norm={cnn_cfg.norm})")
  out.setdefault("params", {})
  out.setdefault("batch_stats", {})
  return out


def cnn_to_torchvision(variables: dict, cnn_cfg) -> dict:
  """{'params', 'batch_stats'} (the `cnn` subtrees, or a whole task model's variables) -> state dict.

  Batch-norm layers also get `num_batches_tracked` (0) so that a torchvision ResNet whose `fc` is
  `torch.nn.Identity()` loads the result with `strict=True`.
  """
  variables = {c: _unbox(t) for c, t in variables.items()}
  if "encoder" in variables.get("params", {}):
    variables = {c: t["encoder"]["cnn"] for c, t in variables.items() if "encoder" in t}
  errors = []
  rules = cnn_rules(cnn_cfg)
  out = _export(variables, rules, errors)
  _raise(errors, "Flax CNN -> torchvision")
  for r in rules:
    if r.torch_name.endswith(".running_mean"):
      out[r.torch_name[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


_HF_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def bert_from_hf(state_dict: dict, model_cfg) -> dict:
  """HF BertModel / BertForMaskedLM / BertForPreTraining state dict -> params (task-model root).

  Returns `{'encoder': {'bert': ...}}` plus `mlm_head` (from `cls.predictions.*`) and `itm_head` (from
  `cls.seq_relationship.*`) when present. Embeddings and layers must be complete; the pooler and each head
  are all-or-nothing. The tied `cls.predictions.decoder.weight` must equal the word embeddings.
  """
  prefix = "bert." if any(k.startswith("bert.") for k in state_dict) else ""
  groups = bert_rules(model_cfg, prefix)
  errors, used = [], set()
  out = _import(state_dict, groups["core"], errors)
  used.update(r.torch_name for r in groups["core"])
  for name in ("pooler", "mlm_head", "itm_head"):
    rules = groups[name]
    present = [r.torch_name for r in rules if r.torch_name in state_dict]
    if name == "mlm_head" and "cls.predictions.bias" not in state_dict and "cls.predictions.decoder.bias" in state_dict:
      state_dict = dict(state_dict, **{"cls.predictions.bias": state_dict["cls.predictions.decoder.bias"]})
      present.append("cls.predictions.bias")
    if present:
      sub = _import(state_dict, rules, errors)
      _merge(out, sub)
      used.update(present)
  word = _get(out.get("params", {}), ("encoder", "bert", "embeddings", "word_embeddings", "embedding"))
  _check_tied(state_dict, "cls.predictions.decoder.weight", word, errors, used)
  bias = _get(out.get("params", {}), ("mlm_head", "bias"))
  _check_tied(state_dict, "cls.predictions.decoder.bias", bias, errors, used)
  for name in state_dict:
    if name in used or name.endswith(_HF_BUFFERS):
      continue
    errors.append(f"unexpected {name}: shape {tuple(np.shape(state_dict[name]))}")
  _raise(errors, f"HF BERT -> Flax ({model_cfg.num_layers} layers, hidden {model_cfg.hidden_size})")
  return out.get("params", {})


def _check_tied(state_dict, name, expected, errors, used) -> None:
  if name not in state_dict:
    return
  used.add(name)
  arr = _as_float_array(name, state_dict[name], errors)
  if arr is None or expected is None:
    return
  if arr.shape != expected.shape or not np.array_equal(arr, expected):
    errors.append(f"{name}: must be tied to (equal) its source; untied weights are not supported")


def _merge(dst: dict, src: dict) -> None:
  for k, v in src.items():
    if isinstance(v, dict):
      _merge(dst.setdefault(k, {}), v)
    else:
      dst[k] = v


def bert_to_hf(params: dict, model_cfg, with_mlm_head: bool) -> dict:
  """Task-model params -> HF names. Without the MLM head: `BertModel` names (with pooler). With it:
  `BertForPreTraining` names (`bert.` prefix, `cls.predictions.*` with the tied decoder, and
  `cls.seq_relationship.*` when the params have an `itm_head`)."""
  params = _unbox(params)
  if "params" in params and "encoder" not in params:
    params = params["params"]
  groups = bert_rules(model_cfg, "bert." if with_mlm_head else "")
  rules = groups["core"] + groups["pooler"]
  if with_mlm_head:
    rules += groups["mlm_head"]
    if "itm_head" in params:
      rules += groups["itm_head"]
  errors = []
  out = _export({"params": params}, rules, errors)
  _raise(errors, "Flax -> HF BERT")
  if with_mlm_head:
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
  return out


def merge_into(variables: dict, update: dict, where: tuple = ()) -> dict:
  """A copy of `variables` with `update` placed at `where` (e.g. ('encoder', 'cnn')) in each of its
  collections; every updated leaf must already exist with the same shape (a converted tree can only
  replace, never invent, parameters)."""
  errors = []
  out = _copy(variables)

  def visit(node, upd, path):
    for k, v in upd.items():
      if not isinstance(node, dict) or k not in node:
        errors.append(f"{'/'.join(path + (k,))}: not in the model")
      elif isinstance(v, dict):
        visit(node[k], v, path + (k,))
      else:
        old = node[k]
        box = old if hasattr(old, "replace_boxed") else None
        shape = np.shape(old.unbox() if box is not None else old)
        if shape != np.shape(v):
          errors.append(f"{'/'.join(path + (k,))}: model shape {shape}, converted {np.shape(v)}")
        else:
          node[k] = box.replace_boxed(v) if box is not None else v

  for collection, tree in update.items():
    node = _get(out.get(collection, {}), where) if where else out.get(collection)
    if node is None:
      errors.append(f"{collection}/{'/'.join(where)}: not in the model")
      continue
    visit(node, tree, (collection,) + tuple(where))
  _raise(errors, "merge converted weights")
  return out


def _copy(tree):
  if isinstance(tree, dict) or hasattr(tree, "items") and not hasattr(tree, "shape"):
    return {k: _copy(v) for k, v in tree.items()}
  return tree
