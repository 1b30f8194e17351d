"""Flax <-> PyTorch Pixel-BERT: bit-identical round trips, output parity, and the separate pieces in real
torchvision / transformers models."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from pixelbert_jax import task_table
from pixelbert_jax.convert import model_mapping as mm
from pixelbert_jax.convert import to_torch, torch_model, verify
from pixelbert_jax.models.build import build_model, init_variables
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.models.resnet import resnet_from_config

TASKS = tuple(task_table.TASKS)  # every row of the table: a new task is checked without being named here


def _random_variables(cfg, task, seed=0):
  """Init, then every tensor perturbed (LayerNorms/biases are 1/0 at init and would hide a slip);
  batch-norm statistics random (means around 0, variances in [0.5, 1.5])."""
  model = build_model(cfg, task)
  v = jax.tree.map(np.asarray, nn.meta.unbox(init_variables(model, jax.random.key(seed), task, image_size=(64, 64))))
  rng = np.random.default_rng(seed)
  v = jax.tree.map(lambda a: (a + rng.normal(0, 0.02, a.shape)).astype(np.float32), v)
  if v.get("batch_stats"):
    stat = lambda path, a: (
        rng.normal(0, 0.1, a.shape) if path[-1].key == "mean" else rng.uniform(0.5, 1.5, a.shape)
    ).astype(np.float32)
    v["batch_stats"] = jax.tree_util.tree_map_with_path(stat, v["batch_stats"])
  return v


def _cfg(size, cnn, norm, task):
  cfg = model_config(size, cnn, vocab_size=97)
  cfg.cnn.norm = norm
  cfg.pos_embed_2d = task == "vqa"  # the optional 2D positions take one task's path through the mapping
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_round_trip_flax_torch_flax_is_bit_identical(task):
  cfg = _cfg("tiny", "tiny", "bn", task)
  v = _random_variables(cfg, task)
  tmodel = torch_model.pixelbert_from_state_dict(cfg, task, mm.export_state_dict(v, cfg, task))
  back = mm.model_from_torch({k: t.numpy() for k, t in tmodel.state_dict().items()}, cfg, task)
  flat_v, flat_b = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (v, back))
  assert flat_v.keys() == flat_b.keys()
  for k in flat_v:
    assert flat_b[k].dtype == flat_v[k].dtype and np.array_equal(flat_b[k], flat_v[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_tiny_parity_all_outputs(task, norm):
  cfg = _cfg("tiny", "tiny", norm, task)
  v = _random_variables(cfg, task, seed=1)
  tmodel = torch_model.pixelbert_from_state_dict(cfg, task, mm.export_state_dict(v, cfg, task))
  report = verify.verify(cfg, task, v, tmodel)  # raises over 1e-4
  print(task, norm, report.summary())
  assert report.ok and {"sequence", "pooled", "pixel_mask"} <= set(report.diffs)


@pytest.mark.slow
def test_demo_parity():
  cfg = _cfg("demo", "demo", "bn", "pretrain")
  v = _random_variables(cfg, "pretrain", seed=2)
  tmodel = torch_model.pixelbert_from_state_dict(cfg, "pretrain", mm.export_state_dict(v, cfg, "pretrain"))
  report = verify.verify(cfg, "pretrain", v, tmodel)
  print(report.summary())
  assert report.diffs["mlm_logits"] <= 1e-4 and report.diffs["itm_logits"] <= 1e-4


@pytest.mark.slow
def test_group_norm_parity_unpadded():
  # GN over heavily padded maps is float32-sensitive on both sides (see docs/readme_convert.md);
  # unpadded images check the GN mapping itself at the usual tolerance.
  cfg = _cfg("tiny", "tiny", "gn", "pretrain")
  v = _random_variables(cfg, "pretrain", seed=3)
  tmodel = torch_model.pixelbert_from_state_dict(cfg, "pretrain", mm.export_state_dict(v, cfg, "pretrain"))
  batch = verify.random_batch(cfg, "pretrain", seed=3, pad=False)
  report = verify.compare(
      verify.flax_outputs(cfg, "pretrain", v, batch),
      verify.torch_outputs(tmodel, batch),
      image_size=(192, 256),
      text_len=16,
  )
  print(report.summary())
  assert report.ok, report.lines()


@pytest.mark.slow
def test_verification_catches_a_wrong_tensor():
  cfg = _cfg("tiny", "tiny", "bn", "pretrain")
  v = _random_variables(cfg, "pretrain", seed=4)
  sd = mm.export_state_dict(v, cfg, "pretrain")
  sd["itm_head.dense.bias"] = sd["itm_head.dense.bias"] + 3e-4  # just over the tolerance
  tmodel = torch_model.pixelbert_from_state_dict(cfg, "pretrain", sd)
  with pytest.raises(verify.VerificationError, match="itm_logits .*FAIL"):
    verify.verify(cfg, "pretrain", v, tmodel)


@pytest.mark.slow
def test_pieces_load_into_real_resnet50_and_bert_model(tmp_path):
  cfg = model_config("tiny", "r50", vocab_size=97)  # a resnet50-shaped CNN under a tiny BERT
  v = _random_variables(cfg, "pretrain", seed=5)
  to_torch.write_cnn(str(tmp_path), v, cfg)
  to_torch.write_text_encoder(str(tmp_path), v, cfg, "pretrain")
  from safetensors.torch import load_file

  net = torchvision.models.resnet50()
  net.fc = torch.nn.Identity()
  net.load_state_dict(load_file(tmp_path / "cnn.safetensors"), strict=True)
  x = np.random.default_rng(0).standard_normal((1, 128, 96, 3)).astype(np.float32)
  with torch.no_grad():
    c5_t = torch_model.resnet_c5(net.eval(), torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    c5_f = resnet_from_config(cfg.cnn).apply({c: t["encoder"]["cnn"] for c, t in v.items()}, x, False)
  rel = np.abs(np.asarray(c5_f) - c5_t.numpy()).max() / np.abs(c5_t.numpy()).max()
  print(f"resnet50 C5: max|diff| / max|ref| = {rel:.2e}")
  assert rel <= 1e-5

  hf = transformers.BertModel.from_pretrained(tmp_path / "text_encoder").eval()
  mlm = transformers.BertForMaskedLM.from_pretrained(tmp_path / "text_encoder").eval()
  ids = np.random.default_rng(1).integers(1, 97, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  batch = dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  with torch.no_grad():
    ref, ref_logits = hf(**batch), mlm(**batch).logits.numpy()
  from pixelbert_jax.models.bert import BertModel

  fcfg = build_model(cfg, "pretrain").cfg
  with jax.default_matmul_precision("highest"):
    seq, pooled = BertModel(fcfg).apply({"params": v["params"]["encoder"]["bert"]}, ids, mask, True)
    logits = build_model(cfg, "pretrain").apply({"params": v["params"]}, seq, method="mlm_logits")
  real = mask.astype(bool)
  d_seq = np.abs(np.asarray(seq) - ref.last_hidden_state.numpy())[real].max()
  d_pool = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  d_mlm = np.abs(np.asarray(logits) - ref_logits)[real].max()
  print(f"BertModel hidden {d_seq:.2e}, pooled {d_pool:.2e}; BertForMaskedLM logits {d_mlm:.2e}")
  assert max(d_seq, d_pool, d_mlm) <= 1e-4
