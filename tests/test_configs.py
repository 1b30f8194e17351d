"""The paper configs build, and their parameter counts are what we say they are."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from pixelbert_jax import config_checks
from pixelbert_jax.models.build import build_model, dummy_inputs
from tests import train_helpers as th


def _count(config):
  model = build_model(config.model, config.task)
  shapes = jax.eval_shape(
      lambda k: model.init({"params": k}, **dummy_inputs(config.task), train=False), jax.random.PRNGKey(0)
  )
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  size = lambda pred: sum(
      int(np.prod(v.value.shape if hasattr(v, "value") else v.shape)) for k, v in flat.items() if pred(k)
  )
  return {
      "total": size(lambda k: True),
      "cnn": size(lambda k: k.startswith("encoder/cnn/")),
      "word_embeddings": size(lambda k: "word_embeddings" in k),
      "heads": size(lambda k: not k.startswith("encoder/")),
  }


@pytest.mark.slow
def test_paper_configs_parameter_counts():
  """What we count, against the real peers: the CNN equals torchvision's ResNet-50 trunk (no fc), the
  transformer equals HF's BERT-base `BertModel` (incl. pooler), plus the visual embedder and heads.

  Published (ViLT's table): ~95M (R50) and ~144M (X152). Without BERT's 23.4M word embeddings we get
  111.7M and 146.1M: X152 within 2%, R50 17% above. The published pair cannot come from one counting
  rule on this architecture: 144M - 95M = 49M, but the X152 and R50 trunks differ by 34.4M.
  """
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  import transformers

  r50, x152 = (_count(th.load_config("pretrain", v)) for v in ("r50", "x152"))
  tv = torchvision.models.resnet50()
  tv_trunk = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
  bert = sum(p.numel() for p in transformers.BertModel(transformers.BertConfig()).parameters())
  assert r50["cnn"] == tv_trunk
  visual_and_heads = r50["total"] - r50["cnn"] - bert
  assert 0 < visual_and_heads < 3e6  # 1x1 conv 2048->768, semantic vector, MLM transform, ITM
  assert x152["total"] - x152["cnn"] == r50["total"] - r50["cnn"]
  for name, c, published in (("r50", r50, 95), ("x152", x152, 144)):
    print(
        f"{name}: total {c['total'] / 1e6:.1f}M (cnn {c['cnn'] / 1e6:.1f}M, BERT-base {bert / 1e6:.1f}M), "
        f"without word embeddings {(c['total'] - c['word_embeddings']) / 1e6:.1f}M; published ~{published}M"
    )
  assert abs((x152["total"] - x152["word_embeddings"]) / 1e6 - 144) / 144 < 0.05


def test_paper_recipe_values():
  c = th.load_config("pretrain", "r50")
  assert (c.optim.cnn.lr, c.optim.cnn.weight_decay, c.optim.cnn.momentum) == (1e-2, 5e-4, 0.9)
  assert (c.optim.transformer.lr, c.optim.transformer.weight_decay) == (1e-4, 1e-2)
  assert c.batch_size == 4096 and c.num_epochs == 40 and tuple(c.optim.decay_epochs) == (25, 35)
  assert (c.data.image_short_side, c.data.image_long_side) == (800, 1333)
  assert (c.data.mlm_prob, c.data.itm_neg_prob) == (0.15, 0.5)
  x = th.load_config("pretrain", "x152")
  assert (x.data.image_short_side, x.data.image_long_side) == (600, 1000)
  assert (x.model.cnn.groups, x.model.cnn.width_per_group, tuple(x.model.cnn.stage_sizes)) == (32, 4, (3, 8, 36, 3))
  # what the paper does not have: a 2D position embedding on the pixels, the frozen CNN's cached features
  for variant in (c, x):
    assert not variant.model.pos_embed_2d and not variant.cache_cnn_features


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="'r51'"):
    th.load_config("pretrain", "r51")
  for bad in ("demo_coco", "demo_hard"):  # retrieval has no demo_hard fine-tune
    with pytest.raises(ValueError, match=f"'{bad}'"):
      th.load_config("retrieval", bad)


def test_demo_variants():
  """`demo` is the world of 2-3 objects and the recipe that binds in CPU minutes, `demo_single` the one-object
  world that grounds; `demo_hard` keeps the first world."""
  demo, hard = th.load_config("pretrain", "demo"), th.load_config("pretrain", "demo_hard")
  single = th.load_config("pretrain", "demo_single")
  assert (demo.data.synthetic.min_objects, demo.data.synthetic.max_objects) == (2, 3)
  assert tuple(demo.data.synthetic.caption_kinds) == ("there_is",)  # no caption answers by elimination
  assert demo.cache_cnn_features and demo.model.pos_embed_2d and demo.data.mlm_prob == 0.5
  assert (single.data.synthetic.min_objects, single.data.synthetic.max_objects) == (1, 1)
  assert not single.cache_cnn_features and not single.model.pos_embed_2d and single.data.mlm_prob == 0.3
  assert single.total_steps == 1000 and single.optim.decay_epochs == (10.75,)  # the first demo's recipe
  assert (hard.data.synthetic.min_objects, hard.data.synthetic.max_objects) == (1, 3)
  assert (hard.data.synthetic.radius_small, hard.data.synthetic.radius_large) == (0.2, 0.38)
  assert demo.model.cnn.frozen and demo.cnn_warm_start.steps > 0
  assert not hard.model.cnn.frozen and hard.cnn_warm_start.steps == 0
  # the warm start is the synthetic world's init hook, which the trainer knows only by this name
  assert demo.init_hook == hard.init_hook == config_checks.WARM_START_HOOK
  # the paper's recipes keep a trained CNN and no warm start
  for v in ("r50", "x152"):
    c = th.load_config("pretrain", v)
    assert not c.model.cnn.frozen and c.cnn_warm_start.steps == 0 and c.data.mlm_prob == 0.15
    assert c.init_hook == ""


def test_the_warm_start_hook_name_resolves():
  from pixelbert_jax import init_hooks
  from pixelbert_jax.demo import warm_start

  assert init_hooks.resolve(config_checks.WARM_START_HOOK) is warm_start.warm_start_cnn
  assert init_hooks.resolve("") is None
  with pytest.raises(config_checks.ConfigError, match=r"^config.init_hook='pixelbert_jax.nowhere:f' must name an"):
    init_hooks.resolve("pixelbert_jax.nowhere:f")
  with pytest.raises(config_checks.ConfigError, match=r"must name a function: pixelbert_jax.demo.warm_start has no"):
    init_hooks.resolve("pixelbert_jax.demo.warm_start:nothing")


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
@pytest.mark.parametrize("demo", ["demo", "demo_single"])
def test_demo_finetunes_differ_from_scratch_by_the_pretraining_only(task, demo):
  """A demo fine-tune without init_from starts from the pre-training's CNN warm start (same steps, same seed,
  same world, so the same CNN), frozen as in pre-training; with init_from the whole encoder is loaded. The
  paper recipes train from the pre-trained encoder and get no warm start."""
  pre, c = th.load_config("pretrain", demo), th.load_config(task, demo)
  assert c.model.to_dict() == {**pre.model.to_dict(), **({"num_answers": c.model.num_answers} if task == "vqa" else {})}
  assert c.cnn_warm_start.to_dict() == pre.cnn_warm_start.to_dict() and c.seed == pre.seed
  assert c.init_hook == pre.init_hook
  assert c.data.synthetic.to_dict() == pre.data.synthetic.to_dict()
  for v in ("r50", "x152"):
    assert th.load_config(task, v).cnn_warm_start.steps == 0


VARIANTS = {
    "pretrain": ("demo", "demo_single", "demo_hard", "r50", "x152"),
    "vqa": ("demo", "demo_single", "r50", "x152"),
    "nlvr2": ("demo", "demo_single", "r50", "x152"),
    "retrieval": ("demo", "demo_single", "r50", "x152", "r50_coco", "x152_coco"),
}
HEAVY = ("jax", "flax", "optax", "grain", "tensorflow_datasets", "tensorflow", "transformers", "torch")

_LOAD_ALL = """
import json, sys
from pixelbert_jax.config_files import load_sibling
variants = json.loads(sys.argv[1])
sizes = {}
for name, names in variants.items():
  module = load_sibling(f"{sys.argv[2]}/configs/{name}.py", name)
  for v in names:
    c = module.get_config(v)
    sizes[f"{name}:{v}"] = [c.data.data_dir, c.model.vocab_size, c.model.num_answers]
heavy = sorted(m for m in json.loads(sys.argv[3]) if m in sys.modules)
print(json.dumps({"sizes": sizes, "heavy": heavy}))
"""


@pytest.mark.slow
def test_every_config_variant_loads_without_io_or_heavy_imports(tmp_path):
  """Loading a config reads nothing and creates nothing (overrides such as --config.data.data_dir apply
  before any data is opened) and imports no JAX, data pipeline or deep learning framework. The default
  data_dir (TFDS_DATA_DIR) points at a folder that does not exist, and it must still not exist after."""
  import json
  import os
  import subprocess
  import sys

  absent, home = tmp_path / "absent_tfds", tmp_path / "home"
  home.mkdir()
  env = {**os.environ, "TFDS_DATA_DIR": str(absent), "HOME": str(home), "PYTHONPATH": str(th.REPO)}
  run = subprocess.run(
      [sys.executable, "-c", _LOAD_ALL, json.dumps(VARIANTS), str(th.REPO), json.dumps(HEAVY)],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert len(got["sizes"]) == sum(map(len, VARIANTS.values()))
  assert got["heavy"] == [], f"loading the configs imported {got['heavy']}"
  assert not absent.exists(), f"loading the configs created {sorted(p.name for p in absent.rglob('*'))}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and not any(home.iterdir())
  assert all(dd == str(absent) for dd, _, _ in got["sizes"].values())  # the walk did see the default data_dir
  # What only the data knows is left for the trainer: the demo's vocabulary and the demo VQA's answers.
  assert got["sizes"]["pretrain:demo"][1] == -1 and got["sizes"]["vqa:demo"][2] == -1
  assert got["sizes"]["pretrain:r50"][1:] == [30522, 3129]


def test_the_trainer_reads_the_sizes_off_the_data(tmp_path):
  """pipeline.resolve_from_data fills the configs' -1 from the data the config names; the bench's count of
  the demo vocabulary (which it makes without opening the data) agrees."""
  from bench import workloads
  from pixelbert_jax.data import pipeline

  c = th.load_config("vqa", "demo")
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.synthetic.update(num_train=24, num_val=8, num_test=8)
  pipeline.resolve_from_data(c)
  assert c.model.vocab_size == len(pipeline.tokenizer(c.data)) == workloads.demo_vocab_size()
  assert c.model.num_answers == len(pipeline.answer_vocab(c.data)) > 1
  with pytest.raises(ValueError, match="vocab_size=-1"):
    build_model(th.load_config("pretrain", "demo").model, "pretrain")
