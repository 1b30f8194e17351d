"""BERT (post-LayerNorm) mirroring HF transformers' module tree, with logical axis names everywhere.

The tree is `embeddings/{word,position,token_type}_embeddings, embeddings/LayerNorm`,
`encoder/layer_{i}/attention/self/{query,key,value}`, `.../attention/output/{dense,LayerNorm}`,
`.../intermediate/dense`, `.../output/{dense,LayerNorm}`, `pooler/dense`: one mapping rule per HF tensor.
`cfg` is the (frozen) model config from `presets.model_config`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SEQ_AXES = ("activation_batch", "activation_length", "activation_embed")


def compute_dtype(cfg) -> Any:
  names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if cfg.dtype not in names:
    raise ValueError(f"model dtype {cfg.dtype!r} not one of {sorted(names)}")
  return names[cfg.dtype]


def dense(cfg, features: int, axes: tuple, name: str) -> nn.Dense:
  """nn.Dense with HF's normal(initializer_range) init, float32 params, logical names (in, out)."""
  return nn.Dense(
      features,
      dtype=compute_dtype(cfg),
      param_dtype=jnp.float32,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
  )


def layer_norm(cfg, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps,
      dtype=compute_dtype(cfg),
      param_dtype=jnp.float32,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
  )


def attention_bias(mask: jax.Array) -> jax.Array:
  """bool [B,T] key mask -> additive float32 bias [B,1,1,T]; softmax runs in float32 in every dtype."""
  neg = jnp.finfo(jnp.float32).min
  return jnp.where(mask.astype(bool), 0.0, neg).astype(jnp.float32)[:, None, None, :]


# model.attention_impl -> jax.nn.dot_product_attention's `implementation`. None is XLA's own attention
# (jax picks XLA for None; it does not choose cuDNN by itself): "dot_product" measured no faster than
# einsum on an H200 (bench/HISTORY.md item 9). "cudnn" is cuDNN's fused flash attention.
FUSED_ATTENTION = {"dot_product": None, "cudnn": "cudnn"}


def check_cudnn_attention(dtype, backend: str | None = None) -> None:
  """cuDNN's fused attention exists only on CUDA GPUs and in 16-bit floats: say so, naming the key."""
  backend = backend or jax.default_backend()
  if backend != "gpu":
    raise ValueError(
        f"model.attention_impl='cudnn' needs a CUDA GPU, but JAX's backend is {backend!r}; "
        f"use 'einsum' or 'dot_product'"
    )
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(
        f"model.attention_impl='cudnn' runs in bfloat16 or float16, but model.dtype is " f"{jnp.dtype(dtype).name}"
    )


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout (text tokens only)."""

  cfg: Any

  def setup(self):
    cfg = self.cfg
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)
    embed = lambda n, axes, name: nn.Embed(
        n, cfg.hidden_size, dtype=compute_dtype(cfg), param_dtype=jnp.float32, embedding_init=init(axes), name=name
    )
    self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")
    self.position_embeddings = embed(cfg.max_position_embeddings, ("position", "embed"), "position_embeddings")
    self.token_type_embeddings = embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")
    self.LayerNorm = layer_norm(cfg, "LayerNorm")
    self.dropout = nn.Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
    length = input_ids.shape[1]
    if length > self.cfg.max_position_embeddings:
      raise ValueError(f"text length {length} > max_position_embeddings " f"{self.cfg.max_position_embeddings}")
    x = (
        self.word_embeddings(input_ids)
        + self.position_embeddings(jnp.arange(length))[None]
        + self.token_type_embeddings(jnp.zeros_like(input_ids))
    )
    x = self.dropout(self.LayerNorm(x), deterministic=deterministic)
    return nn.with_logical_constraint(x, SEQ_AXES)

  def attend(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> logits over the vocabulary with the (tied) word embedding matrix."""
    return self.word_embeddings.attend(x)


class BertSelfAttention(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, bias, deterministic):
    cfg = self.cfg
    if cfg.hidden_size % cfg.num_heads:
      raise ValueError(f"hidden_size {cfg.hidden_size} not divisible by num_heads {cfg.num_heads}")
    head_dim = cfg.hidden_size // cfg.num_heads
    kv_axes = ("activation_batch", "activation_length", "activation_kv")

    def heads(name):
      y = dense(cfg, cfg.hidden_size, ("embed", "kv"), name)(x)
      y = nn.with_logical_constraint(y, kv_axes)
      return y.reshape(y.shape[:2] + (cfg.num_heads, head_dim))

    q, k, v = heads("query"), heads("key"), heads("value")
    impl = cfg.get("attention_impl", "einsum")  # absent from configs saved before the option existed
    if impl in FUSED_ATTENTION:
      # jax.nn.dot_product_attention has no attention dropout: training with it would silently drop it.
      if not deterministic and cfg.attention_dropout > 0:
        raise ValueError(
            f"model.attention_impl={impl!r} has no attention dropout, but "
            f"model.attention_dropout={cfg.attention_dropout} in training; set it to 0 or use "
            f"attention_impl='einsum'"
        )
      mask = bias == 0.0  # [B,1,1,S]
      if impl == "cudnn":
        check_cudnn_attention(q.dtype)
        # cuDNN takes a mask only as an additive bias whose last two dims are (T, S).
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], mask.shape[-1]))
      ctx = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=FUSED_ATTENTION[impl])
      return nn.with_logical_constraint(ctx.reshape(x.shape[:2] + (cfg.hidden_size,)), kv_axes)
    if impl != "einsum":
      raise ValueError(f"model.attention_impl must be one of {['einsum', *FUSED_ATTENTION]}, got {impl!r}")
    # Heads to [B,H,T,Dh] explicitly: with (batch, head) leading, XLA's CPU backend runs the batched
    # matmuls ~4x faster than from einsum's [B,T,H,Dh] operands (bench/HISTORY.md item 15).
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1)
    # float32 [B,H,T,S] for attention maps (pixelbert_jax/attention.py); a no-op unless the caller applies
    # with mutable=['intermediates'], so training and inference compute exactly what they did before. The
    # fused implementations above never form this matrix: the visualizer builds its model with 'einsum'.
    self.sow("intermediates", "attention_probs", probs)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic).astype(v.dtype)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)
    ctx = ctx.reshape(x.shape[:2] + (cfg.hidden_size,))
    return nn.with_logical_constraint(ctx, kv_axes)


class BertOutput(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .): HF's BertSelfOutput and BertOutput."""

  cfg: Any
  in_axis: str

  @nn.compact
  def __call__(self, h, residual, deterministic):
    h = dense(self.cfg, self.cfg.hidden_size, (self.in_axis, "embed"), "dense")(h)
    h = nn.Dropout(self.cfg.hidden_dropout)(h, deterministic=deterministic)
    return layer_norm(self.cfg, "LayerNorm")(h + residual)


class BertAttention(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, bias, deterministic):
    ctx = BertSelfAttention(self.cfg, name="self")(x, bias, deterministic)
    return BertOutput(self.cfg, "kv", name="output")(ctx, x, deterministic)


class BertIntermediate(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x):
    h = dense(self.cfg, self.cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
    h = nn.gelu(h, approximate=False)  # HF "gelu" is the exact erf form
    return nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))


class BertLayer(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x, bias, deterministic):
    a = BertAttention(self.cfg, name="attention")(x, bias, deterministic)
    h = BertIntermediate(self.cfg, name="intermediate")(a)
    out = BertOutput(self.cfg, "mlp", name="output")(h, a, deterministic)
    return nn.with_logical_constraint(out, SEQ_AXES)


class BertEncoder(nn.Module):
  """`num_layers` BertLayers named `layer_{i}`; `nn.remat` per layer keeps the names unchanged."""

  cfg: Any

  @nn.compact
  def __call__(self, x, mask, deterministic):
    # argnums count the module itself as 0: (self, x, bias, deterministic).
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.cfg.remat else BertLayer
    bias = attention_bias(mask)
    for i in range(self.cfg.num_layers):
      x = layer_cls(self.cfg, name=f"layer_{i}")(x, bias, deterministic)
    return x


class BertPooler(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, seq):
    # Square matrix: only the input side carries a sharded name, so no mesh axis is used twice.
    return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, ("embed", None), "dense")(seq[:, 0]))


class BertModel(nn.Module):
  """Embeddings + encoder + pooler. Call on text alone, or use `embed_text` / `encode` / `pool` to fuse."""

  cfg: Any

  def setup(self):
    self.embeddings = BertEmbeddings(self.cfg)
    self.encoder = BertEncoder(self.cfg)
    self.pooler = BertPooler(self.cfg)

  def embed_text(self, input_ids, deterministic: bool):
    return self.embeddings(input_ids, deterministic)

  def encode(self, x, mask, deterministic: bool):
    return self.encoder(x, mask, deterministic)

  def pool(self, seq):
    return self.pooler(seq)

  def attend(self, x):
    return self.embeddings.attend(x)

  def __call__(self, input_ids, text_mask, deterministic: bool = True):
    seq = self.encode(self.embed_text(input_ids, deterministic), text_mask, deterministic)
    return seq, self.pool(seq)
