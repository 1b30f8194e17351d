"""config_checks: every value of every config variant checked before anything runs, one line per problem.

The fast tests call `problems()` in-process (no JAX, no data): the issue's values, the relations between
keys, and a fuzz of every leaf key of every variant with hostile values. The slow ones run a handful of
refusals end-to-end through `python -m pixelbert_jax.main` and train the accepted hostile values.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from pixelbert_jax import config_checks as cc
from pixelbert_jax.config_files import load_sibling
from pixelbert_jax.data import synthetic
from tests import train_helpers as th

VARIANTS = {
    "pretrain": ("demo", "demo_single", "demo_hard", "r50", "x152"),
    "vqa": ("demo", "demo_single", "r50", "x152"),
    "nlvr2": ("demo", "demo_single", "r50", "x152"),
    "retrieval": ("demo", "demo_single", "r50", "x152", "r50_coco", "x152_coco"),
}
VOCAB = __file__  # an existing file: the paper variants need a vocab_path to pass


def _variants() -> dict[str, dict]:
  """'task:variant' -> the config as a plain dict (the paper variants with a vocab_path set)."""
  out = {}
  for task, names in VARIANTS.items():
    module = load_sibling(str(th.REPO / "configs" / "pretrain.py"), task)
    for name in names:
      config = module.get_config(name).to_dict()
      if config["data"]["name"] != "synthetic":
        config["data"]["vocab_path"] = VOCAB
      out[f"{task}:{name}"] = config
  return out


CONFIGS = _variants()


def _with(config: dict, path: tuple, value) -> dict:
  """A copy of `config` with the leaf (or the sequence element) at `path` replaced; the rest shared."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  if isinstance(config, (list, tuple)):
    items = list(config)
    items[head] = _with(config[head], rest, value)
    return type(config)(items)
  return {**config, head: _with(config[head], rest, value)}


def _demo(**overrides) -> dict:
  config = CONFIGS["pretrain:demo_single"]
  for key, value in overrides.items():
    config = _with(config, tuple(key.split(".")), value)
  return config


def test_every_leaf_of_every_variant_has_a_rule():
  missing = {(name, key) for name, c in CONFIGS.items() for key, _ in cc.walk(c) if cc.rule_for(key) is None}
  assert not missing, f"add these keys to config_checks.RULES: {sorted(missing)}"


def test_every_variant_passes():
  for name, config in CONFIGS.items():
    assert cc.problems(config) == [], name
    assert cc.device_problems(config, 8, 1) == [], name


def test_constants_match_the_model():
  from pixelbert_jax import partitioning
  from pixelbert_jax.models.pixel_bert import CELL

  assert cc.STRIDE == CELL and cc.MESH_AXES == partitioning.MESH_AXES


@pytest.mark.parametrize(
    "key,value,expected",
    [  # the issue's values that passed the checks: one line each, naming the key, the value and the range
        ("seed", -1, "config.seed=-1 must be >= 0 (an integer up to 2147483647)"),
        ("data.mlm_prob", 1.5, "config.data.mlm_prob=1.5 must be > 0 and <= 1"),
        ("optim.grad_accum_steps", 0, "config.optim.grad_accum_steps=0 must be -1 (the fewest that fit, resolved"),
        ("model.num_layers", 0, "config.model.num_layers=0 must be > 0 (an integer up to 1024)"),
        ("data.max_text_len", 1, "config.data.max_text_len=1 must be >= 3 ([CLS], a word, [SEP]"),
        ("data.max_text_len", 11, "config.data.max_text_len=11 must be >= 12: the synthetic world's longest pretrain"),
        ("data.buckets", ((100, 100),), "config.data.buckets=((100, 100),) must be a non-empty list of (H, W) with"),
        ("data.name", "nosuchdata", "config.data.name='nosuchdata' must be a known dataset: unknown dataset"),
        ("batch_size", 60, "config.batch_size=60 must be divisible by config.optim.grad_accum_steps=8"),
        ("optim.transformer.lr", math.nan, "config.optim.transformer.lr=nan must be >= 0 and <= 10"),
        ("model.hidden_size", 130, "config.model.hidden_size=130 must be divisible by config.model.num_heads=4"),
        ("data.synthetic.image_size", 240, "config.data.synthetic.image_size=240 must be 192 with config.cnn_warm"),
        ("data.synthetic.min_objects", 2, "config.data.synthetic.min_objects=2 must be <= config.data.synthetic.max"),
        ("optim.cnn.optimizer", "adam", "config.optim.cnn.optimizer='adam' must be one of 'sgd', 'adamw'"),
        ("data.synthetic.caption_kinds", ("shows", "shows"), "config.data.synthetic.caption_kinds=('shows', 'shows')"),
    ],
)
def test_issue_values_are_one_line_naming_key_value_and_range(key, value, expected):
  config = _demo(**{key: value}, **({"optim.grad_accum_steps": 8} if key == "batch_size" else {}))
  found = cc.problems(config)
  assert len(found) == 1 and found[0].startswith(expected), found


def test_a_profile_that_would_start_after_the_last_step_is_refused_only_when_on():
  found = cc.problems(_demo(profile_steps=3, profile_start_step=1001))
  assert found == ["config.profile_start_step=1001 must be <= config.total_steps=1000 (the profile would never start)"]
  assert cc.problems(_demo(profile_steps=0, profile_start_step=1001)) == []  # off: the start is unused
  assert cc.problems(_demo(profile_steps=3, profile_start_step=1001, total_steps=-1)) == []  # from the data


def test_unknown_dataset_is_named_before_its_vocabulary():
  """'nosuchdata' needs no vocab complaint: the name is the cause (it said 'needs a BERT vocab')."""
  assert cc.problems(_demo(**{"data.name": "nosuchdata", "data.vocab_path": ""})) == [
      cc.problems(_demo(**{"data.name": "nosuchdata"}))[0]
  ]
  found = cc.problems(_demo(**{"data.name": "coco_karpathy", "cnn_warm_start.steps": 0}))
  assert found == [
      "config.data.vocab_path='' must be a BERT vocab.txt for dataset 'coco_karpathy' (only the synthetic "
      "world brings its own)"
  ]


def test_warm_start_needs_the_synthetic_world_and_devices_dividing_its_batch():
  """The warm start's batch was refused 15 s into the run, after checkpoints/, config.json and metrics.jsonl
  were written (its check lived in warm_start.train_cnn): main now runs device_problems first."""
  demo = CONFIGS["pretrain:demo_single"]
  assert cc.warm_start_runs(demo) and not cc.warm_start_runs(_demo(init_from="/x"))
  found = cc.device_problems(_demo(**{"cnn_warm_start.batch_size": 3}), 2, 1)
  assert len(found) == 1 and found[0].startswith("config.cnn_warm_start.batch_size=3 must be divisible by the data")
  assert cc.device_problems(_demo(**{"cnn_warm_start.batch_size": 3, "init_from": "/x"}), 2, 1) == []
  found = cc.problems(_demo(**{"data.name": "jsonl", "data.vocab_path": VOCAB}))
  assert found == [
      "config.cnn_warm_start.steps=200 needs the synthetic world's cell labels, but config.data.name='jsonl': "
      "set config.cnn_warm_start.steps=0"
  ]
  found = cc.problems(_demo(**{"cnn_warm_start.batch_size": 40, "data.synthetic.num_train": 39}))
  assert found == [
      "config.cnn_warm_start.batch_size=40 must be <= config.data.synthetic.num_train=39 (one batch "
      "of distinct images)"
  ]
  # The warm start runs as the demo's init hook: another hook (or none) would leave cnn_warm_start unread.
  found = cc.problems(_demo(init_hook=""))
  assert found == [
      f"config.init_hook='' must be {cc.WARM_START_HOOK!r} with config.cnn_warm_start.steps > 0 (the hook "
      "that runs the warm start; or set config.cnn_warm_start.steps=0)"
  ]
  assert cc.problems(_demo(**{"init_hook": "", "cnn_warm_start.steps": 0})) == []
  assert cc.problems(_demo(init_hook="not a name"))[0].startswith(
      "config.init_hook='not a name' must be '' or 'package.module:function'"
  )


@pytest.mark.parametrize(
    "overrides,devices,processes,expected",
    [
        ({"batch_size": 7}, 2, 1, "config.batch_size=7 must be divisible by the data-parallel mesh size 2"),
        ({"eval_batch_size": 6}, 4, 1, "config.eval_batch_size=6 must be divisible by the data-parallel mesh size 4"),
        (
            {"batch_size": 64, "eval_batch_size": 6, "cnn_warm_start.batch_size": 6},
            2,
            3,
            "config.batch_size=64 must be divisible by the data-parallel mesh size 2 (mesh",
        ),
        ({"mesh_shape": (3, 1, 1)}, 2, 1, "config.mesh_shape=(3, 1, 1) must use a number of devices that divides"),
        ({"mesh_shape": (1, 1, 1)}, 2, 1, "config.mesh_shape=(1, 1, 1) must use all 2 devices"),
        (
            {"batch_size": 12, "optim.grad_accum_steps": 4},
            2,
            1,
            "config.batch_size=12 must split into 4 micro-batches of 3, each divisible by the data-parallel mesh",
        ),
    ],
)
def test_device_problems(overrides, devices, processes, expected):
  found = cc.device_problems(_demo(**{"eval_batch_size": 64, **overrides}), devices, processes)
  assert len(found) == 1 and found[0].startswith(expected), found


def test_device_problems_pass_where_the_batch_divides():
  assert cc.device_problems(_demo(**{"batch_size": 12, "optim.grad_accum_steps": 2}), 2, 1) == []
  assert cc.device_problems(_demo(**{"mesh_shape": (1, 2, 1)}), 2, 1) == []
  assert cc.device_problems(_demo(**{"batch_size": 64, "eval_batch_size": 64, "mesh_shape": (2, 1, 2)}), 4, 1) == []


def _world_texts(schema: str, max_objects: int, n: int = 300) -> list[str]:
  spec = synthetic.SceneSpec(min_objects=1, max_objects=max_objects)
  texts = []
  for i in range(n):
    objs = synthetic.make_scene(0, "train", i, 192, spec)
    if schema == "captions":
      texts += [t for t, _ in synthetic.captions(0, "train", i, objs, 5)]
    elif schema == "vqa":
      texts += [q["question"] for q in synthetic.questions(0, "train", i, objs, 5)]
    else:
      other = synthetic.make_scene(0, "train", i + n, 192, spec)
      texts.append(synthetic.nlvr2_statement(0, "train", i, objs, other)[0])
  return texts


@pytest.mark.parametrize("schema", ["captions", "vqa", "nlvr2"])
@pytest.mark.parametrize("max_objects", [1, 2, 3])
def test_longest_text_is_what_the_world_writes(schema, max_objects, tmp_path):
  """The bound max_text_len is checked against is attained by generated texts, and none exceeds it; every
  word is one token, so the tokens are the words plus [CLS] and [SEP]."""
  from pixelbert_jax.data import text

  texts = _world_texts(schema, max_objects)
  longest = max(texts, key=lambda t: len(t.split()))
  assert len(longest.split()) == synthetic.longest_text_words(schema, max_objects), longest
  tok = text.load_tokenizer(text.write_world_vocab(str(tmp_path), synthetic.world_words()))
  assert len(tok(longest)["input_ids"]) == len(longest.split()) + cc.TEXT_SPECIALS


def test_max_text_len_holds_the_longest_text_of_each_task():
  for name, config in CONFIGS.items():
    if config["data"]["name"] != "synthetic":
      continue
    longest = cc.longest_text_tokens(config)
    assert cc.problems(_with(config, ("data", "max_text_len"), longest)) == [], name
    found = cc.problems(_with(config, ("data", "max_text_len"), longest - 1))
    assert len(found) == 1 and f"must be >= {longest}" in found[0], (name, found)


# ---- the fuzz: every leaf key of every variant, hostile values -------------------------------------------


def _hostile(value) -> dict:
  return {
      "0": 0,
      "-1": -1,
      "nan": math.nan,
      "inf": math.inf,
      "huge": 1e300 if isinstance(value, float) else 10**18,
      "wrong_type": 7 if isinstance(value, str) else "x",
      "empty": "",
  }


def _targets(config: dict):
  """(dotted name, path, value) of every leaf, and of the first element of every sequence leaf (and of its
  first element when that is a sequence too: a bucket's height)."""
  for key, value in cc.walk(config):
    path = tuple(key.split("."))
    yield key, path, value
    while isinstance(value, (list, tuple)) and value:
      path, value = path + (0,), value[0]
      yield ".".join(map(str, path)), path, value


# Hostile values that are accepted, each because it is a documented setting that trains; every other one
# must be refused. test_accepted_hostile_values_train trains those of the demo config.
ACCEPTED = {
    ("seed", "0"): "the configs' own seed",
    ("data.synthetic.seed", "0"): "the configs' own world",
    ("total_steps", "-1"): "use num_epochs",
    ("eval_steps", "-1"): "the whole held-out split",
    ("eval_every_steps", "0"): "evaluate only at the end",
    ("cpu_devices", "0"): "JAX's default device count",
    ("device_memory_gib", "0"): "the memory the device reports",
    ("mesh_shape.0", "-1"): "all remaining devices",
    ("model.vocab_size", "-1"): "read off the data",
    ("model.num_answers", "-1"): "read off the data (vqa only)",
    ("optim.grad_accum_steps", "-1"): "the fewest micro-batches that fit",
    ("cnn_warm_start.steps", "0"): "no warm start",
    ("profile_steps", "0"): "no profile",
    ("cnn_warm_start.lr", "0"): "a warm start that leaves the CNN as initialised",
    ("optim.cnn.lr", "0"): "a CNN that is not trained",
    ("optim.transformer.lr", "0"): "a transformer that is not trained",
    ("optim.cnn.momentum", "0"): "plain SGD",
    ("optim.cnn.weight_decay", "0"): "no weight decay",
    ("optim.transformer.weight_decay", "0"): "no weight decay",
    ("optim.transformer.b1", "0"): "Adam without momentum (RMSProp-like)",
    ("optim.transformer.b2", "0"): "Adam whose second moment is the last gradient's",
    ("optim.warmup_steps", "0"): "no warm-up",
    ("optim.decay_epochs.0", "0"): "a decay before the first step",
    ("optim.decay_factor", "0"): "a learning rate of 0 after the first decay",
    ("optim.grad_clip_norm", "0"): "no clipping",
    ("loss.mlm_weight", "0"): "ITM only (the other weight stays > 0)",
    ("loss.itm_weight", "0"): "MLM only (the other weight stays > 0)",
    ("loss.hard_negatives", "0"): "back-propagation through every negative",
    ("retrieval_eval.num_images", "0"): "evaluate on every image",
    ("retrieval_eval.first_stage_k", "0"): "the full ranking",
    ("model.hidden_dropout", "0"): "no dropout",
    ("model.attention_dropout", "0"): "no dropout",
    ("model.cnn.bn_momentum", "0"): "frozen running statistics",
    ("data.itm_neg_prob", "0"): "matched pairs only",
    ("data.max_bad_fraction", "0"): "no bad record tolerated",
    ("data.num_workers", "0"): "decode in the main process",
    ("init_from", "empty"): "no initialisation",
    ("init_from_torch", "empty"): "no initialisation",
    ("init_hook", "empty"): "no init hook (configs without the CNN warm start)",
    ("data.vocab_path", "empty"): "the synthetic world's own vocab",
    ("data.manual_dir", "empty"): "unset",
    ("data.manual_dirs.coco_karpathy", "empty"): "falls back to data.manual_dir",
    ("data.manual_dirs.visual_genome", "empty"): "falls back to data.manual_dir",
    ("data.exclude_coco_heldout", "empty"): "unset",
    ("data.builder_config", "empty"): "the builder's default",
    ("model.size", "empty"): "a name only",
    ("model.cnn.name", "empty"): "a name only",
}


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_config_fuzz_every_hostile_value_is_refused_in_one_line_or_trains(variant):
  """Every leaf of the variant (and the first element of each sequence) set to 0, -1, nan, inf, a huge
  number, the wrong type and an empty string: problems() refuses it in exactly one line that names the key,
  or the value is one of ACCEPTED (each a documented setting; the demo's are trained in a slow test)."""
  config, wrong = CONFIGS[variant], []
  for key, path, value in _targets(config):
    top = key.split(".0")[0]
    for label, hostile in _hostile(value).items():
      found = cc.problems(_with(config, path, hostile))
      if not found and (key, label) not in ACCEPTED:
        wrong.append(f"{key}={hostile!r} accepted")
      elif found and (len(found) != 1 or not found[0].startswith(f"config.{top}=")):
        wrong.append(f"{key}={hostile!r} gave {found}")
  assert not wrong, "\n".join(wrong[:50])


def test_every_accepted_hostile_value_is_accepted_somewhere():
  """ACCEPTED lists no value that is in fact refused (a stale entry would hide nothing, but mislead)."""
  never = []
  for key, label in ACCEPTED:
    hits = [
        c
        for c in CONFIGS.values()
        for k, path, value in _targets(c)
        if k == key and not cc.problems(_with(c, path, _hostile(value)[label]))
    ]
    if not hits:
      never.append((key, label))
  assert not never


# ---- end to end ------------------------------------------------------------------------------------------

END_TO_END = {  # `--config.KEY=VALUE` of the demo config -> the start of its one error line
    "seed=-1": "error: config.seed=-1 must be >= 0",
    "seed=nan": "error: --config.seed",  # an integer key: absl's parser refuses it
    "data.max_text_len=1": "error: config.data.max_text_len=1 must be >= 3",
    "data.name=nosuchdata": "error: config.data.name='nosuchdata' must be a known dataset",
    "data.mlm_prob=1.5": "error: config.data.mlm_prob=1.5 must be > 0 and <= 1",
    "optim.grad_accum_steps=0": "error: config.optim.grad_accum_steps=0 must be -1",
    "model.num_layers=0": "error: config.model.num_layers=0 must be > 0",
    "data.buckets=((100,100),)": "error: config.data.buckets=((100, 100),) must be",
    # the device-count checks, after JAX started (the demo runs on 2 CPU devices)
    "cnn_warm_start.batch_size=3": "error: config.cnn_warm_start.batch_size=3 must be divisible by the data-par",
    "batch_size=7": "error: config.batch_size=7 must be divisible by the data-parallel mesh size 2",
    "mesh_shape=(3,1,1)": "error: config.mesh_shape=(3, 1, 1) must use a number of devices that divides the 2",
}


@pytest.mark.parametrize("case", sorted(END_TO_END))  # under 1 s each: before the data and the model
def test_main_refuses_in_one_line_with_status_2_before_writing(case, tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "pixelbert_jax.main", "--config=configs/pretrain.py:demo"]
  command += [f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.{case}"]
  start = time.monotonic()
  proc = subprocess.run(command, cwd=th.REPO, capture_output=True, text=True, timeout=120)
  elapsed = time.monotonic() - start
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(END_TO_END[case]), proc.stderr[-3000:]
  assert not workdir.exists() and not (tmp_path / "tfds").exists(), "nothing may be written"
  assert elapsed < 15, f"{elapsed:.1f} s: the check must come before the data and the model"


# The ACCEPTED values that the demo config has, in two tiny runs (values that leave nothing to train, as
# both loss weights 0, are refused, so they are split).
TRAIN_RUNS = {
    "a": {
        "seed": 0,
        "data.synthetic.seed": 0,
        "eval_steps": -1,
        "eval_every_steps": 0,
        "cpu_devices": 0,
        "device_memory_gib": 0.0,
        "mesh_shape": (-1, 1, 1),
        "model.vocab_size": -1,
        "optim.grad_accum_steps": -1,
        "cnn_warm_start.steps": 0,
        "profile_steps": 0,
        "optim.cnn.lr": 0.0,
        "optim.cnn.momentum": 0.0,
        "optim.cnn.weight_decay": 0.0,
        "optim.transformer.b1": 0.0,
        "optim.transformer.b2": 0.0,
        "optim.warmup_steps": 0,
        "optim.decay_epochs": (0.0,),
        "optim.decay_factor": 0.0,
        "optim.grad_clip_norm": 0.0,
        "loss.itm_weight": 0.0,
        "model.hidden_dropout": 0.0,
        "model.attention_dropout": 0.0,
        "model.cnn.bn_momentum": 0.0,
        "data.itm_neg_prob": 0.0,
        "data.max_bad_fraction": 0.0,
        "data.num_workers": 0,
        "init_from": "",
        "init_from_torch": "",
        "data.vocab_path": "",
        "data.manual_dir": "",
        "data.exclude_coco_heldout": "",
        "data.builder_config": "",
        "model.size": "",
        "model.cnn.name": "",
    },
    "b": {
        "total_steps": -1,
        "num_epochs": 1 / 3,  # 48 images / batch 8 = 6 steps an epoch: 2 steps
        "cnn_warm_start.steps": 2,
        "cnn_warm_start.batch_size": 8,
        "cnn_warm_start.lr": 0.0,
        "loss.mlm_weight": 0.0,
        "optim.transformer.lr": 0.0,
        "optim.transformer.weight_decay": 0.0,
    },
}


def _label(key: str, value) -> tuple[str, str]:
  if isinstance(value, tuple):  # mesh_shape, decay_epochs: their first element
    key, value = f"{key}.0", value[0]
  return key, {0: "0", -1: "-1", "": "empty"}.get(value, repr(value))


def test_train_runs_cover_every_accepted_value_of_the_demo():
  demo = CONFIGS["pretrain:demo_single"]
  accepted = {
      (key, label)
      for key, path, value in _targets(demo)
      for label, hostile in _hostile(value).items()
      if not cc.problems(_with(demo, path, hostile))
  }
  covered = {_label(k, v) for run in TRAIN_RUNS.values() for k, v in run.items()}
  assert accepted and accepted <= covered, sorted(accepted - covered)


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(TRAIN_RUNS))
def test_accepted_hostile_values_train(run, data_dir, tmp_path):
  """The ACCEPTED values of the demo config pass and train: 2 steps, a finite loss, a checkpoint at 2."""
  from pixelbert_jax import train

  overrides = dict(TRAIN_RUNS[run])
  config = th.tiny_config(data_dir, total_steps=overrides.pop("total_steps", 2), variant="demo_single", **overrides)
  assert cc.problems(config) == []
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  rows = [r for r in th.metrics(workdir) if "train/loss" in r]
  assert rows and rows[-1]["step"] == 2 and math.isfinite(rows[-1]["train/loss"])
  assert os.path.isdir(workdir / "checkpoints" / "2")
