"""Task heads and the four task models (pretrain, vqa, nlvr2, retrieval) built on PixelBertEncoder.

Every task model has the parameter tree `encoder/{cnn,visual,bert}` plus its heads, so fine-tuning
restores `encoder` from pre-training as is. All logits come back in float32 whatever the compute dtype.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelbert_jax.models.bert import dense, layer_norm
from pixelbert_jax.models.pixel_bert import PixelBertEncoder


class MlmHead(nn.Module):
  """HF `cls.predictions`: transform (dense, GELU, LayerNorm), decoder tied to the word embeddings, bias."""

  cfg: Any

  @nn.compact
  def __call__(self, seq: jax.Array, attend: Callable[[jax.Array], jax.Array]) -> jax.Array:
    h = dense(self.cfg, self.cfg.hidden_size, ("embed", None), "dense")(seq)
    h = layer_norm(self.cfg, "LayerNorm")(nn.gelu(h, approximate=False))
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (self.cfg.vocab_size,), jnp.float32
    )
    return attend(h).astype(jnp.float32) + bias


class LinearHead(nn.Module):
  """One Dense on the pooled vector (ITM: HF `cls.seq_relationship`; retrieval: a single score)."""

  cfg: Any
  num_outputs: int

  @nn.compact
  def __call__(self, pooled):
    return dense(self.cfg, self.num_outputs, ("embed", "classes"), "dense")(pooled).astype(jnp.float32)


class MlpHead(nn.Module):
  """Dense(multiplier * hidden) -> GELU -> LayerNorm -> Dense(num_outputs) (VQA, NLVR2)."""

  cfg: Any
  num_outputs: int

  @nn.compact
  def __call__(self, x):
    h = dense(self.cfg, self.cfg.head_hidden_multiplier * self.cfg.hidden_size, ("embed", "mlp"), "dense_0")(x)
    h = layer_norm(self.cfg, "LayerNorm")(nn.gelu(h, approximate=False))
    return dense(self.cfg, self.num_outputs, ("mlp", "classes"), "dense_1")(h).astype(jnp.float32)


class _TaskModel(nn.Module):
  """Shared by all task models: the encoder and its cacheable halves for retrieval.

  Only pre-training samples pixels; fine-tuning and inference use all of them (the paper).
  """

  cfg: Any

  def _encoder(self):
    return PixelBertEncoder(self.cfg, name="encoder")

  def encode_image(self, image, image_mask, train: bool = False):
    """-> (pixels [B,P,D], pixel_mask [B,P]), never sampled: cacheable image features."""
    return self.encoder.encode_image(image, image_mask, train)

  def cnn_features(self, image, image_mask):
    """-> (C5 [B,h,w,C], pixel_mask [B,P]) in inference mode: a frozen CNN's features (feature_cache.py)."""
    return self.encoder.cnn_features(image, image_mask)

  def fuse(self, input_ids, text_mask, pixels, pixel_mask, train: bool = False):
    """-> (sequence [B,L+P,D], pooled [B,D])."""
    return self.encoder.fuse(input_ids, text_mask, pixels, pixel_mask, train)


class PixelBertPretrain(_TaskModel):
  """MLM + ITM. -> dict(mlm_logits [B,L,V], itm_logits [B,2], pixel_mask [B,P or K])."""

  def setup(self):
    self.encoder = self._encoder()
    self.mlm_head = MlmHead(self.cfg)
    self.itm_head = LinearHead(self.cfg, 2)

  def __call__(self, image, image_mask, input_ids, text_mask, train: bool = False, c5=None, pixel_mask=None):
    """`c5`, `pixel_mask`: a frozen CNN's cached features in place of the image (feature_cache.py)."""
    enc = self.encoder(image, image_mask, input_ids, text_mask, train, c5=c5, pixel_mask=pixel_mask)
    text = enc["sequence"][:, : input_ids.shape[1]]
    return dict(mlm_logits=self.mlm_logits(text), itm_logits=self.itm_head(enc["pooled"]), pixel_mask=enc["pixel_mask"])

  def mlm_logits(self, text_sequence):
    """[B,L,D] text part of the fused sequence -> float32 [B,L,V]."""
    return self.mlm_head(text_sequence, self.encoder.attend)


class PixelBertVqa(_TaskModel):
  """-> dict(vqa_logits [B, num_answers], pixel_mask)."""

  def setup(self):
    self.encoder = self._encoder()
    self.vqa_head = MlpHead(self.cfg, self.cfg.num_answers)

  def __call__(self, image, image_mask, input_ids, text_mask, train: bool = False):
    enc = self.encoder(image, image_mask, input_ids, text_mask, train, allow_sampling=False)
    return dict(vqa_logits=self.vqa_head(enc["pooled"]), pixel_mask=enc["pixel_mask"])


class PixelBertNlvr2(_TaskModel):
  """Each image with the sentence is one pass; the two pooled vectors are concatenated.

  -> dict(nlvr2_logits [B,2], pixel_mask, pixel_mask1).
  """

  def setup(self):
    self.encoder = self._encoder()
    self.nlvr2_head = MlpHead(self.cfg, 2)

  def __call__(self, image, image_mask, input_ids, text_mask, image1, image1_mask, train: bool = False):
    a = self.encoder(image, image_mask, input_ids, text_mask, train, allow_sampling=False)
    b = self.encoder(image1, image1_mask, input_ids, text_mask, train, allow_sampling=False)
    pooled = jnp.concatenate([a["pooled"], b["pooled"]], axis=-1)
    return dict(nlvr2_logits=self.nlvr2_head(pooled), pixel_mask=a["pixel_mask"], pixel_mask1=b["pixel_mask"])


class PixelBertRetrieval(_TaskModel):
  """-> dict(retrieval_logits [B], pixel_mask). `score_pixels` scores cached image features."""

  def setup(self):
    self.encoder = self._encoder()
    self.retrieval_head = LinearHead(self.cfg, 1)

  def __call__(self, image, image_mask, input_ids, text_mask, train: bool = False):
    enc = self.encoder(image, image_mask, input_ids, text_mask, train, allow_sampling=False)
    return dict(retrieval_logits=self.retrieval_head(enc["pooled"])[:, 0], pixel_mask=enc["pixel_mask"])

  def score_pixels(self, input_ids, text_mask, pixels, pixel_mask, train: bool = False):
    """Scores [B] for text against pixels from `encode_image` (no CNN pass)."""
    _, pooled = self.fuse(input_ids, text_mask, pixels, pixel_mask, train)
    return self.retrieval_head(pooled)[:, 0]
