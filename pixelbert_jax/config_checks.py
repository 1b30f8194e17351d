"""Checks of a training config before anything runs (main.py and train.train_and_evaluate).

A value that would fail later fails here, one line per problem naming the key, the value and the allowed
range: every numeric and enumerated key of every config variant (`RULES`, nested ones included), then the
relations between keys (text length against the synthetic world's longest text, batch against gradient
accumulation, buckets against the CNN stride, an unknown dataset before its vocabulary, the CNN warm start
against its data and its init hook, the profiled steps against the run's length). `device_problems` holds
the checks that need the device count (batch against the data-parallel devices, the mesh shape); main.py runs
them once JAX has started, still before the workdir is touched. No JAX here: main calls `problems` before JAX
starts.

One module, though long: the per-key rules, the relations and the device checks are one pass over one config
that reports each problem once. A relation skips the keys whose own rule failed (`bad`), and all three share
the one-line format (`_line`, `_at_most`) and the lookup (`_get`); in separate modules each part would reach
into the others' private helpers. About a third of it is the `RULES` table, one line per key.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Iterator, Sequence

import ml_collections

from pixelbert_jax import task_table
from pixelbert_jax.data import synthetic
from pixelbert_jax.data.config import check_name

STRIDE = 64  # pixels per feature pixel: C5 (stride 32) then the 2x2 max-pool (models/pixel_bert.py CELL)
STEPS_MAX = 2**31 - 1  # optax counts steps in int32
SIZE_MAX = 2**20  # batch sizes, widths, counts: far above any real run, far below an overflow
MESH_AXES = ("data", "fsdp", "tensor")  # partitioning.MESH_AXES (a test keeps them equal)
TEXT_SPECIALS = 2  # [CLS] and [SEP] around every text
WARM_START_IMAGE_SIZE = STRIDE * synthetic.GRID  # one feature pixel per cell of the world
INIT_HOOK_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # package.module:function (init_hooks.py)
# The init hook that reads config.cnn_warm_start: the demo's, named here so that the check needs no import.
WARM_START_HOOK = "pixelbert_jax.demo.warm_start:warm_start_cnn"


class ConfigError(ValueError):
  """One or more bad config values; `problems` holds one line per key."""

  def __init__(self, problems: Sequence[str] | str):
    problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__("\n".join(problems))
    self.problems = problems


class Rule:
  """What one key may hold: `ok(value)` and the text that completes 'config.KEY=VALUE must be ...'."""

  def __init__(self, ok: Callable[[Any], bool], text: str):
    self.ok, self.text = ok, text


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int = STEPS_MAX, *, also: dict[int, str] | None = None, text: str = "") -> Rule:
  """An int in [lo, hi], or one of the special values `also` ({value: meaning})."""
  also = also or {}
  low = "> 0" if lo == 1 else f">= {lo}"
  special = "".join(f"{v} ({meaning}) or " for v, meaning in also.items())
  return Rule(
      lambda v: _is_int(v) and (lo <= v <= hi or v in also),
      text or f"{special}{low} (an integer up to {hi})",
  )


def real(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, text: str = "") -> Rule:
  """A finite int or float in the interval lo..hi (open at the ends marked so)."""

  def ok(v):
    return _is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)  # nan fails all

  low = f"{'>' if lo_open else '>='} {lo:g}"
  high = f"{'<' if hi_open else '<='} {hi:g}"
  return Rule(ok, text or f"{low} and {high}")


def choice(*options: str) -> Rule:
  return Rule(lambda v: isinstance(v, str) and v in options, f"one of {', '.join(repr(o) for o in options)}")


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
STRING = Rule(lambda v: isinstance(v, str), "a string")
NONEMPTY = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")


def sequence(element: Rule, *, length: int | None = None, min_length: int = 0, text: str = "") -> Rule:
  def ok(v):
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
      return False
    if (length is not None and len(v) != length) or len(v) < min_length:
      return False
    return all(element.ok(x) for x in v)

  size = f"{length} entries" if length is not None else "a list" if not min_length else f"a list of >= {min_length}"
  return Rule(ok, text or f"{size}, each {element.text}")


_BUCKET = sequence(
    Rule(lambda v: _is_int(v) and 0 < v <= 64 * STRIDE and v % STRIDE == 0, ""),
    length=2,
    text=f"(H, W) with both sides multiples of the CNN's stride {STRIDE}, at most {64 * STRIDE}",
)

# Every leaf key of every config variant (tests/test_config_checks.py keeps the table complete). A key absent
# from a task's config is not checked.
RULES: dict[str, Rule] = {
    "task": choice(*task_table.TASKS),
    "seed": integer(0),
    "batch_size": integer(1, SIZE_MAX),
    "eval_batch_size": integer(1, SIZE_MAX),
    "num_epochs": real(0, 1e4, lo_open=True, text="> 0 and <= 10000"),
    "total_steps": integer(1, also={-1: "use num_epochs"}),
    "mesh_shape": sequence(
        integer(1, SIZE_MAX, also={-1: "all remaining devices"}),
        length=len(MESH_AXES),
        text=f"{len(MESH_AXES)} entries {MESH_AXES}, each -1 (all remaining devices, at most one) or > 0",
    ),
    "device_memory_gib": real(0, 1e5, text=">= 0 (0: the memory the device reports) and <= 100000"),
    "cpu_devices": integer(0, 1024, also={}, text=">= 0 (0: JAX's default) and <= 1024"),
    "log_every_steps": integer(1),
    "eval_every_steps": integer(0, text=">= 0 (0: evaluate only at the end; an integer up to 2147483647)"),
    "eval_steps": integer(1, also={-1: "the whole held-out split"}),
    "checkpoint_every_steps": integer(1),
    "keep_checkpoints": integer(1, text=">= 1 (Orbax would delete every checkpoint; an integer up to 2147483647)"),
    "profile_steps": integer(0, text=">= 0 (0: no profile; an integer up to 2147483647)"),
    "profile_start_step": integer(1),
    "cache_cnn_features": BOOL,
    "init_from": STRING,
    "init_from_torch": STRING,
    "init_hook": Rule(
        lambda v: isinstance(v, str) and (v == "" or bool(INIT_HOOK_NAME.fullmatch(v))),
        "'' or 'package.module:function'",
    ),
    "loss.mlm_weight": real(0, 1e3),
    "loss.itm_weight": real(0, 1e3),
    "loss.hard_negatives": integer(0, SIZE_MAX, text=">= 0 (0: every negative; an integer up to 1048576)"),
    "cnn_warm_start.steps": integer(0, text=">= 0 (0: no warm start; an integer up to 2147483647)"),
    "cnn_warm_start.batch_size": integer(1, SIZE_MAX),
    "cnn_warm_start.lr": real(0, 10),
    "optim.cnn.optimizer": choice("sgd", "adamw"),
    "optim.cnn.lr": real(0, 10),
    "optim.cnn.momentum": real(0, 1, hi_open=True),
    "optim.cnn.weight_decay": real(0, 1),
    "optim.transformer.lr": real(0, 10),
    "optim.transformer.b1": real(0, 1, hi_open=True),
    "optim.transformer.b2": real(0, 1, hi_open=True),
    "optim.transformer.eps": real(0, 1, lo_open=True),
    "optim.transformer.weight_decay": real(0, 1),
    "optim.warmup_steps": integer(0),
    "optim.decay_epochs": sequence(real(0, 1e4), text="a list of epochs, each >= 0 and <= 10000"),
    "optim.decay_factor": real(0, 1),
    "optim.grad_clip_norm": real(0, 1e6, text=">= 0 (0: off) and <= 1e+06"),
    "optim.grad_accum_steps": integer(1, 4096, also={-1: "the fewest that fit, resolved at start-up"}),
    "retrieval_eval.num_images": integer(0, text=">= 0 (0: all; an integer up to 2147483647)"),
    "retrieval_eval.first_stage_k": integer(0, text=">= 0 (0: full ranking; an integer up to 2147483647)"),
    "retrieval_eval.pair_batch_size": integer(1, SIZE_MAX),
    # data
    "data.name": NONEMPTY,  # the dataset itself: check_name in _relations
    "data.data_dir": NONEMPTY,
    "data.manual_dir": STRING,
    "data.exclude_coco_heldout": STRING,
    "data.train_split": NONEMPTY,
    "data.eval_split": NONEMPTY,
    "data.builder_config": STRING,
    "data.vocab_path": STRING,
    "data.image_short_side": integer(STRIDE, 64 * STRIDE),
    "data.image_long_side": integer(STRIDE, 64 * STRIDE),
    "data.buckets": sequence(_BUCKET, min_length=1, text=f"a non-empty list of {_BUCKET.text}"),
    "data.max_image_pixels": integer(1),
    "data.max_text_len": integer(3, text=">= 3 ([CLS], a word, [SEP]; an integer up to 2147483647)"),
    "data.mlm_prob": real(0, 1, lo_open=True),
    "data.itm_neg_prob": real(0, 1, hi_open=True),
    "data.vqa_min_answer_count": integer(1, SIZE_MAX),
    "data.retrieval_negatives": integer(1, 4096),
    "data.num_workers": integer(0, 1024),
    "data.prefetch": integer(1, 1024),
    "data.read_threads": integer(1, 1024),
    "data.read_buffer": integer(1, SIZE_MAX),
    "data.max_bad_fraction": real(0, 1),
    "data.grounded_metric": BOOL,
    "data.synthetic.seed": integer(0),
    "data.synthetic.image_size": Rule(
        lambda v: _is_int(v) and 48 <= v <= 4096 and v % synthetic.GRID == 0,
        f"a multiple of {synthetic.GRID} in [48, 4096]",
    ),
    "data.synthetic.num_train": integer(2, 10**6),
    "data.synthetic.num_val": integer(2, 10**6),
    "data.synthetic.num_test": integer(2, 10**6),
    "data.synthetic.captions_per_image": integer(1, 100),
    "data.synthetic.questions_per_image": integer(1, 100),
    "data.synthetic.min_objects": integer(1, min(synthetic.GRID**2, len(synthetic.COLOURS))),
    "data.synthetic.max_objects": integer(1, min(synthetic.GRID**2, len(synthetic.COLOURS))),
    "data.synthetic.caption_kinds": Rule(
        lambda v: isinstance(v, (list, tuple)) and synthetic.valid_caption_kinds(v),
        f"one or more distinct ones of {', '.join(synthetic.CAPTION_KINDS)}",
    ),
    "data.synthetic.radius_small": real(0.05, 0.5),
    "data.synthetic.radius_large": real(0.05, 0.5),
    # model
    "model.size": STRING,  # the preset's name, informational
    "model.hidden_size": integer(1, 65536),
    "model.num_layers": integer(1, 1024),
    "model.num_heads": integer(1, 1024),
    "model.intermediate_size": integer(1, 262144),
    "model.vocab_size": integer(6, 10**7, also={-1: "read off the data"}),  # 5 special tokens + a word
    "model.max_position_embeddings": integer(3, 65536),
    "model.type_vocab_size": integer(1, 1024),
    "model.hidden_dropout": real(0, 1, hi_open=True),
    "model.attention_dropout": real(0, 1, hi_open=True),
    "model.attention_impl": choice("einsum", "dot_product", "cudnn"),
    "model.layer_norm_eps": real(0, 1, lo_open=True),
    "model.initializer_range": real(0, 10, lo_open=True),
    "model.pixel_sampling.enabled": BOOL,
    "model.pixel_sampling.num_pixels": integer(1, SIZE_MAX),
    "model.pos_embed_2d": BOOL,
    "model.max_grid": integer(1, 4096),
    "model.dtype": choice("float32", "bfloat16", "float16"),
    "model.remat": BOOL,
    "model.num_answers": integer(1, 10**6, also={-1: "read off the data"}),
    "model.head_hidden_multiplier": integer(1, 64),
    "model.cnn.name": STRING,  # the preset's name, informational
    "model.cnn.stage_sizes": sequence(
        integer(1, 1024), length=4, text="4 entries (stride 32 at C5), each > 0 (an integer up to 1024)"
    ),
    "model.cnn.groups": integer(1, 1024),
    "model.cnn.width_per_group": integer(1, 65536),
    "model.cnn.stem_width": integer(1, 65536),
    "model.cnn.base_planes": integer(1, 65536),
    "model.cnn.norm": choice("frozen_bn", "bn", "gn"),
    "model.cnn.gn_groups": integer(1, 65536),
    "model.cnn.norm_eps": real(0, 1, lo_open=True),
    "model.cnn.bn_momentum": real(0, 1),
    "model.cnn.impl": choice("auto", "generic", "cpu"),
    "model.cnn.frozen": BOOL,
}
PREFIX_RULES: dict[str, Rule] = {"data.manual_dirs.": STRING}  # one key per mixture component


def walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf of a config."""
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from walk(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def rule_for(key: str) -> Rule | None:
  if key in RULES:
    return RULES[key]
  return next((r for p, r in PREFIX_RULES.items() if key.startswith(p)), None)


def _get(config: Any, key: str, default: Any = None) -> Any:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return default
    node = node[part]
  return node


def _line(key: str, value: Any, text: str) -> str:
  return f"config.{key}={value!r} must be {text}"


def _at_most(have, get, small: str, large: str, why: str = "") -> list[str]:
  """The relation `small <= large` between two keys whose values are each fine, as a one-line problem."""
  if have(small, large) and get(small) > get(large):
    return [f"config.{small}={get(small)} must be <= config.{large}={get(large)}{why}"]
  return []


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """One line per bad value, then one per broken relation between values that are each fine."""
  found, bad = [], set()
  for key, value in walk(config):
    rule = rule_for(key)
    if rule is not None and not rule.ok(value):
      found.append(_line(key, value, rule.text))
      bad.add(key)
  found += _relations(config, bad)
  return found


def _relations(config: ml_collections.ConfigDict, bad: set[str]) -> list[str]:
  found: list[str] = []
  have = lambda *keys: all(_get(config, k) is not None and k not in bad for k in keys)
  get = lambda key: _get(config, key)

  if have("batch_size", "optim.grad_accum_steps"):
    accum, batch = get("optim.grad_accum_steps"), get("batch_size")
    if accum >= 1 and batch % accum:
      found.append(
          f"config.batch_size={batch} must be divisible by config.optim.grad_accum_steps={accum} (the batch of "
          "one optimizer step is split into that many micro-batches)"
      )
  if have("loss.mlm_weight", "loss.itm_weight") and get("loss.mlm_weight") == 0 == get("loss.itm_weight"):
    found.append("config.loss.mlm_weight=0 and config.loss.itm_weight=0 leave nothing to train: make one > 0")
  if have("profile_steps", "profile_start_step", "total_steps") and get("profile_steps") > 0 < get("total_steps"):
    found += _at_most(have, get, "profile_start_step", "total_steps", " (the profile would never start)")
  if have("cache_cnn_features", "model.cnn.frozen", "task", "data.buckets") and get("cache_cnn_features"):
    # feature_cache.py: the same C5 at every step needs a frozen CNN and one image shape; pre-training reads it
    for ok, need in (
        (get("model.cnn.frozen"), "config.model.cnn.frozen=True (a CNN that trains changes its features)"),
        (get("task") == "pretrain", f"config.task='pretrain' (not {get('task')!r})"),
        (len(get("data.buckets")) == 1, f"one image bucket (config.data.buckets has {len(get('data.buckets'))})"),
    ):
      if not ok:
        found.append(f"config.cache_cnn_features=True needs {need}")
  found += _mesh_entries(config, bad)
  found += _model_relations(config, bad, have, get)
  found += _data_relations(config, bad, have, get)
  return found


def _mesh_entries(config, bad) -> list[str]:
  shape = _get(config, "mesh_shape")
  if shape is None or "mesh_shape" in bad or sum(s == -1 for s in shape) <= 1:
    return []
  return [_line("mesh_shape", shape, "at most one -1 (all remaining devices)")]


def _model_relations(config, bad, have, get) -> list[str]:
  found = []
  readers = [name for name, spec in task_table.TASKS.items() if "num_answers" in spec.data_sizes]
  if have("model.num_answers", "task") and get("model.num_answers") == -1 and get("task") not in readers:
    found.append(
        f"config.model.num_answers=-1 must be > 0 for task {get('task')!r}: only {', '.join(readers)} reads it "
        "off the data (pipeline.resolve_from_data)"
    )
  if have("model.hidden_size", "model.num_heads") and get("model.hidden_size") % get("model.num_heads"):
    found.append(
        f"config.model.hidden_size={get('model.hidden_size')} must be divisible by "
        f"config.model.num_heads={get('model.num_heads')}"
    )
  found += _at_most(have, get, "data.max_text_len", "model.max_position_embeddings", " (one position each)")
  if have("model.attention_impl", "model.attention_dropout") and get("model.attention_impl") != "einsum":
    if get("model.attention_dropout") > 0:
      found.append(
          f"config.model.attention_dropout={get('model.attention_dropout')} must be 0 with "
          f"config.model.attention_impl={get('model.attention_impl')!r} (it has no attention dropout), or "
          "use attention_impl='einsum'"
      )
  if have("model.attention_impl", "model.dtype") and get("model.attention_impl") == "cudnn":
    if get("model.dtype") == "float32":
      found.append(
          "config.model.dtype='float32' must be 'bfloat16' or 'float16' with config.model.attention_impl='cudnn'"
      )
  cnn = ("model.cnn.base_planes", "model.cnn.width_per_group", "model.cnn.groups", "model.cnn.stage_sizes")
  if have(*cnn):
    planes, wpg, groups, stages = (get(k) for k in cnn)
    widths = [int(planes * 2**i * (wpg / 64.0)) * groups for i in range(len(stages))]
    if min(widths) <= 0:
      found.append(
          f"config.model.cnn.base_planes={planes} * width_per_group={wpg} / 64 must be >= 1 (the bottleneck "
          "width of the first stage)"
      )
    elif have("model.cnn.norm", "model.cnn.gn_groups", "model.cnn.stem_width") and get("model.cnn.norm") == "gn":
      channels = sorted({get("model.cnn.stem_width"), *widths, *(planes * 2**i * 4 for i in range(len(stages)))})
      g = get("model.cnn.gn_groups")
      odd = [c for c in channels if c % g]
      if odd:
        found.append(
            f"config.model.cnn.gn_groups={g} must divide every channel count of the CNN with norm='gn'; "
            f"it does not divide {odd}"
        )
  if have("model.pos_embed_2d", "model.max_grid", "data.buckets") and get("model.pos_embed_2d"):
    side = max(max(b) for b in get("data.buckets"))
    if side // STRIDE > get("model.max_grid"):
      found.append(
          f"config.model.max_grid={get('model.max_grid')} must be >= {side // STRIDE}, the feature pixels along "
          f"the longest bucket side ({side}) of config.data.buckets"
      )
  return found


def longest_text_tokens(config: ml_collections.ConfigDict) -> int | None:
  """Tokens of the longest text the synthetic world writes for config.task, [CLS] and [SEP] included."""
  spec = task_table.TASKS.get(_get(config, "task"))
  objects = _get(config, "data.synthetic.max_objects")
  if spec is None or not _is_int(objects):
    return None
  return synthetic.longest_text_words(spec.schema, objects) + TEXT_SPECIALS


def _data_relations(config, bad, have, get) -> list[str]:
  found = []
  name = get("data.name")
  if name is None or "data.name" in bad:
    return found
  try:
    check_name(name)
  except ValueError as e:  # before any complaint that depends on the dataset (its vocabulary, its splits)
    return [f"config.data.name={name!r} must be a known dataset: {e}"]
  found += _at_most(have, get, "data.image_short_side", "data.image_long_side")
  vocab = get("data.vocab_path")
  if vocab is not None and "data.vocab_path" not in bad:
    if not vocab and name != "synthetic":
      found.append(
          f"config.data.vocab_path='' must be a BERT vocab.txt for dataset {name!r} (only the synthetic world "
          "brings its own)"
      )
    elif vocab and "://" not in vocab and not os.path.isfile(os.path.expanduser(vocab)):
      found.append(f"config.data.vocab_path={vocab!r} must be an existing vocab.txt file")
  if name == "synthetic":
    found += _synthetic_relations(config, bad, have, get)
  found += _warm_start_relations(config, bad, have, get, name)
  return found


def _synthetic_relations(config, bad, have, get) -> list[str]:
  found = []
  for key in ("data.train_split", "data.eval_split"):
    if have(key) and get(key) not in synthetic.SPLITS:
      found.append(_line(key, get(key), f"one of {', '.join(map(repr, synthetic.SPLITS))} for the synthetic world"))
  found += _at_most(have, get, "data.synthetic.min_objects", "data.synthetic.max_objects")
  found += _at_most(have, get, "data.synthetic.radius_small", "data.synthetic.radius_large")
  if have("data.max_text_len", "task", "data.synthetic.max_objects"):
    longest = longest_text_tokens(config)
    if longest is not None and get("data.max_text_len") < longest:
      found.append(
          f"config.data.max_text_len={get('data.max_text_len')} must be >= {longest}: the synthetic world's "
          f"longest {get('task')} text (with data.synthetic.max_objects={get('data.synthetic.max_objects')}) "
          f"is {longest} tokens with [CLS] and [SEP]"
      )
  if have("data.retrieval_negatives", "data.synthetic.num_train") and get("task") == "retrieval":
    if get("data.retrieval_negatives") >= get("data.synthetic.num_train"):
      found.append(
          f"config.data.retrieval_negatives={get('data.retrieval_negatives')} must be < "
          f"config.data.synthetic.num_train={get('data.synthetic.num_train')} (distinct other images)"
      )
  return found


def warm_start_runs(config: ml_collections.ConfigDict) -> bool:
  """The CNN warm start (config.init_hook, the demo's) runs on a fresh start with steps > 0 and no init_from /
  init_from_torch."""
  steps = _get(config, "cnn_warm_start.steps", 0)
  return _is_int(steps) and steps > 0 and not (_get(config, "init_from") or _get(config, "init_from_torch"))


def _warm_start_relations(config, bad, have, get, name) -> list[str]:
  if "cnn_warm_start.steps" in bad or not warm_start_runs(config):
    return []
  if name != "synthetic":
    return [
        f"config.cnn_warm_start.steps={get('cnn_warm_start.steps')} needs the synthetic world's cell labels, "
        f"but config.data.name={name!r}: set config.cnn_warm_start.steps=0"
    ]
  found = []
  if have("init_hook") and get("init_hook") != WARM_START_HOOK:
    found.append(
        f"config.init_hook={get('init_hook')!r} must be {WARM_START_HOOK!r} with config.cnn_warm_start.steps > 0 "
        "(the hook that runs the warm start; or set config.cnn_warm_start.steps=0)"
    )
  if have("data.synthetic.image_size") and get("data.synthetic.image_size") != WARM_START_IMAGE_SIZE:
    found.append(
        f"config.data.synthetic.image_size={get('data.synthetic.image_size')} must be {WARM_START_IMAGE_SIZE} "
        f"with config.cnn_warm_start.steps > 0 (one feature pixel per cell of the {synthetic.GRID}x"
        f"{synthetic.GRID} world)"
    )
  found += _at_most(
      have, get, "cnn_warm_start.batch_size", "data.synthetic.num_train", " (one batch of distinct images)"
  )
  return found


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[tuple[int, ...] | None, str]:
  """The mesh shape resolved for `num_devices` (partitioning.mesh_shape's rule), or None and the problem."""
  requested = tuple(int(s) for s in requested)
  fixed = math.prod(s for s in requested if s != -1)
  if num_devices % fixed:
    return None, (
        f"config.mesh_shape={requested} must use a number of devices that divides the {num_devices} "
        f"available; {dict(zip(MESH_AXES, requested))} needs a multiple of {fixed}"
    )
  shape = tuple(num_devices // fixed if s == -1 else s for s in requested)
  if math.prod(shape) != num_devices:
    return None, (
        f"config.mesh_shape={requested} must use all {num_devices} devices; "
        f"{dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} (put -1 on one axis)"
    )
  return shape, ""


def device_problems(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> list[str]:
  """The checks that need the device count: the mesh shape and every batch against the data-parallel
  devices (data x fsdp) and the processes. Run after `problems` found nothing."""
  requested = _get(config, "mesh_shape")
  if requested is None:
    return []
  shape, problem = mesh_shape(requested, num_devices)
  if shape is None:
    return [problem]
  dp = shape[0] * shape[1]
  found = []

  def divisible(key: str, value: int, what: str = "") -> None:
    if value % dp or value % process_count:
      found.append(
          f"config.{key}={_get(config, key)} must {what or 'be'} divisible by the data-parallel mesh size {dp} "
          f"(mesh {dict(zip(MESH_AXES, shape))} on {num_devices} devices) and the process count {process_count}"
      )

  accum = _get(config, "optim.grad_accum_steps", 1)
  batch = _get(config, "batch_size")
  if _is_int(accum) and accum > 1:
    divisible("batch_size", batch // accum, f"split into {accum} micro-batches of {batch // accum}, each")
  else:
    divisible("batch_size", batch)
  divisible("eval_batch_size", _get(config, "eval_batch_size"))
  if warm_start_runs(config):
    divisible("cnn_warm_start.batch_size", _get(config, "cnn_warm_start.batch_size"))
  if _get(config, "cache_cnn_features") and process_count > 1:
    found.append(f"config.cache_cnn_features=True runs in one process, not {process_count} (feature_cache.py)")
  return found


def validate(config: ml_collections.ConfigDict) -> None:
  found = problems(config)
  if found:
    raise ConfigError(found)


def validate_devices(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  found = device_problems(config, num_devices, process_count)
  if found:
    raise ConfigError(found)
