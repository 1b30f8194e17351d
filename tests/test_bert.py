"""BERT encoder and MLM head vs HF transformers (PyTorch) with the same weights, via the mapping."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pixelbert_jax.convert import bert_from_hf
from pixelbert_jax.models.build import build_model
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.convert.model_mapping import hf_bert_config
from pixelbert_jax.models.bert import BertModel

jax.config.update("jax_default_matmul_precision", "highest")


def _randomized(hf_model, seed):
  """HF initialises LayerNorms to 1/0 and biases to 0: perturb everything so no mapping slip hides."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return hf_model.eval()


def _inputs(cfg, batch, length, seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.vocab_size, (batch, length)).astype(np.int32)
  lengths = rng.integers(2, length + 1, batch)
  lengths[0] = length  # one row without padding
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return ids, mask


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("size,length", [("tiny", 12), ("base", 10)])
def test_encoder_matches_hf_bert_model(size, length):
  cfg = model_config(size, "tiny", vocab_size=97)
  torch.manual_seed(0)
  hf = _randomized(transformers.BertModel(hf_bert_config(cfg)), seed=1)
  params = bert_from_hf(_state_dict(hf), cfg)["encoder"]["bert"]
  ids, mask = _inputs(cfg, 3, length, seed=2)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  seq, pooled = BertModel(build_model(cfg, "pretrain").cfg).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask), deterministic=True
  )
  real = mask.astype(bool)
  diff = np.abs(np.asarray(seq) - ref.last_hidden_state.numpy())[real].max()
  pooled_diff = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  print(f"{size}: max|diff| last hidden (real positions) {diff:.2e}, pooled {pooled_diff:.2e}")
  assert diff <= 1e-5 and pooled_diff <= 1e-5


def test_mlm_logits_match_hf_bert_for_masked_lm():
  cfg = model_config("tiny", "tiny", vocab_size=97)
  torch.manual_seed(3)
  hf = _randomized(transformers.BertForMaskedLM(hf_bert_config(cfg)), seed=4)
  params = bert_from_hf(_state_dict(hf), cfg)
  assert set(params) == {"encoder", "mlm_head"}  # BertForMaskedLM has no pooler
  ids, mask = _inputs(cfg, 3, 12, seed=5)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  model = build_model(cfg, "pretrain")
  # The pre-training model's own text path: fuse with zero pixels, then the tied MLM head.
  d = cfg.hidden_size
  params["encoder"]["bert"]["pooler"] = {
      "dense": {"kernel": np.zeros((d, d), np.float32), "bias": np.zeros((d,), np.float32)}
  }
  seq, _ = model.apply(
      {"params": params},
      jnp.asarray(ids),
      jnp.asarray(mask),
      jnp.zeros((ids.shape[0], 0, d)),
      jnp.zeros((ids.shape[0], 0), bool),
      method="fuse",
  )
  logits = model.apply({"params": params}, seq, method="mlm_logits")
  real = mask.astype(bool)
  diff = np.abs(np.asarray(logits) - ref.logits.numpy())[real].max()
  print(f"MLM logits max|diff| (real positions) {diff:.2e}")
  assert diff <= 1e-5


def test_padded_text_tokens_do_not_change_real_positions():
  cfg = model_config("tiny", "tiny", vocab_size=97)
  hf = _randomized(transformers.BertModel(hf_bert_config(cfg)), seed=6)
  params = bert_from_hf(_state_dict(hf), cfg)["encoder"]["bert"]
  ids, mask = _inputs(cfg, 4, 12, seed=7)
  ids2 = np.where(mask.astype(bool), ids, (ids * 7 + 3) % cfg.vocab_size)
  assert (ids2 != ids).any()
  bert = BertModel(build_model(cfg, "pretrain").cfg)
  a, _ = bert.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  b, _ = bert.apply({"params": params}, jnp.asarray(ids2), jnp.asarray(mask))
  real = mask.astype(bool)
  assert np.abs(np.asarray(a) - np.asarray(b))[real].max() <= 1e-6


def _loss_and_grads(cfg, params, ids, mask):
  """(loss, grads, jaxpr text) with dropout on, the same dropout key every time."""
  bert = BertModel(build_model(cfg, "pretrain").cfg)

  def loss(p):
    seq, pooled = bert.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(9)})
    # Fixed random projections: every output element matters, no sign-cancelling sums of squares.
    r_seq = jax.random.normal(jax.random.key(11), seq.shape)
    r_pooled = jax.random.normal(jax.random.key(12), pooled.shape)
    return jnp.sum(seq * r_seq) + jnp.sum(pooled * r_pooled)

  return jax.jit(jax.value_and_grad(loss))(params) + (str(jax.make_jaxpr(loss)(params)),)


@pytest.mark.slow
def test_remat_gives_same_outputs_and_grads():
  cfg = model_config("tiny", "tiny", vocab_size=97)
  ids, mask = (jnp.asarray(a) for a in _inputs(cfg, 2, 10, seed=8))
  params = nn.meta.unbox(BertModel(build_model(cfg, "pretrain").cfg).init(jax.random.key(0), ids, mask))["params"]
  plain = _loss_and_grads(cfg, params, ids, mask)
  cfg.remat = True
  remat = _loss_and_grads(cfg, params, ids, mask)
  assert "remat" in remat[2] and "remat" not in plain[2]  # the checkpoint primitive really is there
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
  # Recomputation reorders float32 sums: compare each gradient against its own scale, plus a floor
  # for leaves whose true gradient is 0 (key biases cancel in the softmax).
  leaves = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1]))]
  overall = max(np.abs(b).max() for _, b in leaves)
  for a, b in leaves:
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-7 * overall


def test_bfloat16_compute_keeps_float32_params():
  cfg = model_config("tiny", "tiny", vocab_size=97)
  cfg.dtype = "bfloat16"
  ids, mask = (jnp.asarray(a) for a in _inputs(cfg, 2, 10, seed=10))
  bert = BertModel(build_model(cfg, "pretrain").cfg)
  variables = nn.meta.unbox(bert.init(jax.random.key(0), ids, mask))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  seq, _ = bert.apply(variables, ids, mask)
  assert seq.dtype == jnp.bfloat16 and bool(jnp.isfinite(seq.astype(jnp.float32)).all())


def test_dot_product_attention_matches_einsum():
  cfg = model_config("tiny", "tiny", vocab_size=97)
  ids, mask = (jnp.asarray(a) for a in _inputs(cfg, 3, 12, seed=13))
  bert = BertModel(build_model(cfg, "pretrain").cfg)
  variables = nn.meta.unbox(bert.init(jax.random.key(0), ids, mask))
  ref, _ = bert.apply(variables, ids, mask)
  cfg.attention_impl = "dot_product"
  fused = BertModel(build_model(cfg, "pretrain").cfg)
  out, _ = fused.apply(variables, ids, mask)
  real = np.asarray(mask).astype(bool)
  assert np.abs(np.asarray(out) - np.asarray(ref))[real].max() <= 1e-5
  # Training with attention dropout would silently drop the dropout: refused instead.
  with pytest.raises(ValueError, match="attention_dropout"):
    fused.apply(variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
  cfg.attention_dropout = 0.0
  BertModel(build_model(cfg, "pretrain").cfg).apply(
      variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)}
  )
  cfg.attention_impl = "flash"
  with pytest.raises(ValueError, match="attention_impl"):
    BertModel(build_model(cfg, "pretrain").cfg).apply(variables, ids, mask)


def test_cudnn_attention_refused_off_gpu_and_called_as_cudnn_requires(monkeypatch):
  """No GPU here: check the refusals, and that the call made for cuDNN meets its documented contract
  (16-bit q/k/v [B,T,N,H] with H % 8 == 0; a mask whose last two dims are (T, S)), run through XLA."""
  from pixelbert_jax.models import bert as bert_lib

  cfg = model_config("tiny", "tiny", vocab_size=97)
  ids, mask = (jnp.asarray(a) for a in _inputs(cfg, 3, 12, seed=14))
  variables = nn.meta.unbox(BertModel(build_model(cfg, "pretrain").cfg).init(jax.random.key(0), ids, mask))
  cfg.dtype = "bfloat16"
  ref, _ = BertModel(build_model(cfg, "pretrain").cfg).apply(variables, ids, mask)
  cfg.attention_impl = "cudnn"
  cudnn = BertModel(build_model(cfg, "pretrain").cfg)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a CUDA GPU.*'cpu'"):
      cudnn.apply(variables, ids, mask)
  with pytest.raises(ValueError, match="bfloat16 or float16, but model.dtype is float32"):
    bert_lib.check_cudnn_attention(jnp.float32, backend="gpu")

  calls = []
  xla_attention = jax.nn.dot_product_attention

  def recording(q, k, v, mask=None, implementation=None):
    calls.append((q.shape, q.dtype, mask.shape, mask.dtype, implementation))
    return xla_attention(q, k, v, mask=mask, implementation="xla")

  monkeypatch.setattr(bert_lib, "check_cudnn_attention", lambda dtype: None)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  out, _ = cudnn.apply(variables, ids, mask)
  assert len(calls) == cfg.num_layers
  (b, t, n, h), dtype, mask_shape, mask_dtype, implementation = calls[0]
  assert implementation == "cudnn" and dtype == jnp.bfloat16 and h % 8 == 0
  assert mask_shape == (b, 1, t, t) and mask_dtype == jnp.bool_
  real = np.asarray(mask).astype(bool)
  diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))[real]
  # Measured 0.002 (one bf16 ulp); attending to the padding too would be off by 0.023 on these inputs.
  assert diff.max() <= 0.008, diff.max()
