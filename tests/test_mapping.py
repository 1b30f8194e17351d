"""The torchvision / HF <-> Flax mapping: round trips and strict errors (NumPy only, no torch)."""

import jax
import flax.linen as nn
import numpy as np
import pytest

from pixelbert_jax.convert import (
    MappingError,
    bert_from_hf,
    bert_to_hf,
    cnn_from_torchvision,
    cnn_to_torchvision,
    merge_into,
)
from pixelbert_jax.convert.mapping import bert_rules, cnn_rules
from pixelbert_jax.models.build import build_model, init_variables
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.models.presets import cnn_config


def _random_state_dict(rules, seed=0):
  rng = np.random.default_rng(seed)
  return {r.torch_name: rng.standard_normal(r.torch_shape).astype(np.float32) for r in rules}


def _flat(tree, prefix=()):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (k,)))
    return out
  return {prefix: tree}


@pytest.fixture(scope="module")
def tiny_model():
  cfg = model_config("tiny", "tiny", vocab_size=53)
  cfg.cnn.norm = "frozen_bn"
  model = build_model(cfg, "pretrain")
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init_variables(model, jax.random.key(0), "pretrain")))
  return cfg, shapes


def test_cnn_table_matches_the_flax_tree(tiny_model):
  cfg, shapes = tiny_model
  for collection in ("params", "batch_stats"):
    want = {k: v.shape for k, v in _flat(shapes[collection]["encoder"]["cnn"]).items()}
    got = {r.path: r.flax_shape for r in cnn_rules(cfg.cnn) if r.collection == collection}
    assert got == want


def test_bert_table_matches_the_flax_tree(tiny_model):
  cfg, shapes = tiny_model
  params = shapes["params"]
  want = {
      k: v.shape
      for k, v in _flat(
          {
              "encoder": {"bert": params["encoder"]["bert"]},
              "mlm_head": params["mlm_head"],
              "itm_head": params["itm_head"],
          }
      ).items()
  }
  got = {r.path: r.flax_shape for group in bert_rules(cfg).values() for r in group}
  assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("cnn,norm", [("r50", "frozen_bn"), ("x152", "bn"), ("tiny", "gn")])
def test_cnn_round_trip(cnn, norm):
  cfg = cnn_config(cnn)
  cfg.norm = norm
  sd = _random_state_dict(cnn_rules(cfg))
  sd_with_extras = dict(sd, **{"fc.weight": np.zeros((10, 7), np.float32)})
  if norm != "gn":
    sd_with_extras["bn1.num_batches_tracked"] = np.array(7, np.int64)
  variables = cnn_from_torchvision(sd_with_extras, cfg)
  assert bool(variables["batch_stats"]) == (norm != "gn")
  back = cnn_to_torchvision(variables, cfg)
  tracked = {k for k in back if k.endswith("num_batches_tracked")}
  assert {k for k in back if k not in tracked} == set(sd)
  assert len(tracked) == (0 if norm == "gn" else sum(k.endswith("running_mean") for k in sd))
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v)


def test_conv_layout_is_hwio():
  cfg = cnn_config("tiny")
  sd = _random_state_dict(cnn_rules(cfg))
  kernel = cnn_from_torchvision(sd, cfg)["params"]["conv1"]["kernel"]
  assert kernel.shape == (7, 7, 3, cfg.stem_width)
  np.testing.assert_array_equal(kernel[2, 5, 1, 4], sd["conv1.weight"][4, 1, 2, 5])


def test_cnn_errors_list_every_problem():
  cfg = cnn_config("tiny")
  sd = _random_state_dict(cnn_rules(cfg))
  del sd["layer2.0.conv1.weight"]
  sd["layer3.0.conv2.weight"] = np.zeros((1, 2, 3, 3), np.float32)
  sd["layer9.0.conv1.weight"] = np.zeros((3,), np.float32)
  sd["bn1.weight"] = sd["bn1.weight"].astype(np.int32)
  with pytest.raises(MappingError) as err:
    cnn_from_torchvision(sd, cfg)
  msg = str(err.value)
  assert "4 problem(s)" in msg
  assert "missing layer2.0.conv1.weight" in msg
  assert "misshapen layer3.0.conv2.weight: expected" in msg and "got (1, 2, 3, 3)" in msg
  assert "unexpected layer9.0.conv1.weight" in msg
  assert "bn1.weight: dtype int32" in msg


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_bert_round_trip(prefix):
  cfg = model_config("tiny", "tiny", vocab_size=53)
  groups = bert_rules(cfg, prefix)
  sd = _random_state_dict(groups["core"] + groups["pooler"])
  if prefix:
    sd.update(_random_state_dict(groups["mlm_head"] + groups["itm_head"], seed=1))
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
  sd[f"{prefix}embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
  params = bert_from_hf(sd, cfg)
  assert set(params) == ({"encoder", "mlm_head", "itm_head"} if prefix else {"encoder"})
  back = bert_to_hf(params, cfg, with_mlm_head=bool(prefix))
  expected = {k for k in sd if not k.endswith("position_ids")}
  assert set(back) == expected
  for k in expected:
    np.testing.assert_array_equal(back[k], sd[k])


def test_bert_errors():
  cfg = model_config("tiny", "tiny", vocab_size=53)
  groups = bert_rules(cfg, "bert.")
  sd = _random_state_dict(groups["core"] + groups["mlm_head"])
  sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"] + 1
  del sd["cls.predictions.transform.LayerNorm.bias"]  # a partial head is an error
  sd["bert.encoder.layer.0.output.dense.weight"] = sd["bert.encoder.layer.0.output.dense.weight"].T
  sd["bert.encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(MappingError) as err:
    bert_from_hf(sd, cfg)
  msg = str(err.value)
  assert "missing cls.predictions.transform.LayerNorm.bias" in msg
  assert "cls.predictions.decoder.weight: must be tied" in msg
  assert "misshapen bert.encoder.layer.0.output.dense.weight: expected (32, 64), got (64, 32)" in msg
  assert "unexpected bert.encoder.layer.7.output.dense.weight" in msg


def test_export_errors_name_the_flax_path():
  cfg = model_config("tiny", "tiny", vocab_size=53)
  sd = _random_state_dict(bert_rules(cfg)["core"] + bert_rules(cfg)["pooler"])
  params = bert_from_hf(sd, cfg)
  del params["encoder"]["bert"]["pooler"]
  with pytest.raises(MappingError, match="missing params/encoder/bert/pooler/dense/kernel"):
    bert_to_hf(params, cfg, with_mlm_head=False)
  with pytest.raises(MappingError, match="mlm_head"):
    bert_to_hf(bert_from_hf(sd, cfg), cfg, with_mlm_head=True)


def test_merge_into_replaces_and_rejects(tiny_model):
  cfg, _ = tiny_model
  model = build_model(cfg, "pretrain")
  # Boxed zeros of the right shapes: the merge only looks at structure, and a real init is slow on CPU.
  variables = jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_variables(model, jax.random.key(0), "pretrain"))
  )
  converted = cnn_from_torchvision(_random_state_dict(cnn_rules(cfg.cnn)), cfg.cnn)
  merged = merge_into(variables, converted, ("encoder", "cnn"))
  got = nn.meta.unbox(merged)["params"]["encoder"]["cnn"]["conv1"]["kernel"]
  np.testing.assert_array_equal(got, converted["params"]["conv1"]["kernel"])
  assert isinstance(merged["params"]["encoder"]["cnn"]["conv1"]["kernel"], nn.LogicallyPartitioned)
  bad = {"params": {"conv1": {"kernel": np.zeros((1, 1, 1, 1), np.float32)}, "nope": {"x": 0}}}
  with pytest.raises(MappingError, match="2 problem"):
    merge_into(variables, bad, ("encoder", "cnn"))
