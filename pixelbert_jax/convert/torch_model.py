"""Pixel-BERT in PyTorch: torchvision's ResNet + transformers' BertModel + the visual embedder and heads.

Computes what the Flax model computes in eval mode with all pixels (no sampling): ImageNet
normalisation with padding set to exactly 0, C5 of a torchvision Bottleneck ResNet/ResNeXt, 1x1 conv,
2x2 max-pool, + semantic vector (+ optional 2D positions), `[CLS] text [SEP] pixels` through HF BERT's
encoder with padding masked out, then the task heads. Frozen or trainable batch norm becomes
`BatchNorm2d` (eval: running statistics), group norm `GroupNorm`.

    model = load_pixelbert("OUT")            # OUT written by `python -m pixelbert_jax.convert to-torch`
    out = model(image=uint8_nhwc, image_mask=bool_nhw, input_ids=ids, text_mask=mask)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import ml_collections
import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import Bottleneck, ResNet

from pixelbert_jax import task_table
from pixelbert_jax.convert.model_mapping import c5_channels, hf_bert_config
from pixelbert_jax.convert.safetensors_io import read_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CELL = 64


def _norm_layer(cnn_cfg):
  eps = cnn_cfg.get("norm_eps", 1e-5)
  if cnn_cfg.norm in ("frozen_bn", "bn"):
    # Frozen BN is BN in eval mode: the running statistics and the affine are constants.
    return lambda c: nn.BatchNorm2d(c, eps=eps, momentum=cnn_cfg.get("bn_momentum", 0.1))
  if cnn_cfg.norm == "gn":
    return lambda c: nn.GroupNorm(cnn_cfg.gn_groups, c, eps=eps)
  raise ValueError(f"unknown cnn.norm {cnn_cfg.norm!r}")


def build_resnet(cnn_cfg) -> ResNet:
  """torchvision's ResNet with Bottleneck blocks and `fc = Identity()`.

  torchvision fixes the stem at 64 channels and the stage planes at 64/128/256/512; when the config's
  `stem_width` / `base_planes` differ, the stem and the four stages are rebuilt with torchvision's own
  `_make_layer`, so every module (and state dict name) is still torchvision's.
  """
  if len(cnn_cfg.stage_sizes) != 4:
    raise ValueError(f"torchvision's ResNet has 4 stages; cnn.stage_sizes={list(cnn_cfg.stage_sizes)}")
  norm = _norm_layer(cnn_cfg)
  net = ResNet(
      Bottleneck,
      list(cnn_cfg.stage_sizes),
      groups=cnn_cfg.groups,
      width_per_group=cnn_cfg.width_per_group,
      norm_layer=norm,
  )
  if cnn_cfg.stem_width != 64 or cnn_cfg.base_planes != 64:
    net.inplanes, net.dilation = cnn_cfg.stem_width, 1
    net.conv1 = nn.Conv2d(3, cnn_cfg.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = norm(cnn_cfg.stem_width)
    for i, blocks in enumerate(cnn_cfg.stage_sizes):
      layer = net._make_layer(Bottleneck, cnn_cfg.base_planes * 2**i, blocks, stride=1 if i == 0 else 2)
      setattr(net, f"layer{i + 1}", layer)
  net.fc = nn.Identity()
  return net


def resnet_c5(net: ResNet, x: torch.Tensor) -> torch.Tensor:
  """NCHW float -> the stride-32 map after `layer4` (torchvision's forward without avgpool/fc)."""
  x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
  return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class VisualEmbedder(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    d = cfg.hidden_size
    self.proj = nn.Conv2d(c5_channels(cfg.cnn), d, kernel_size=1)
    self.semantic = nn.Parameter(torch.zeros(d))
    self.pos_embed_2d, self.max_grid = bool(cfg.pos_embed_2d), cfg.max_grid
    if self.pos_embed_2d:
      self.row_embed = nn.Parameter(torch.zeros(cfg.max_grid, d))
      self.col_embed = nn.Parameter(torch.zeros(cfg.max_grid, d))

  def forward(self, c5: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(self.proj(c5), 2, 2).permute(0, 2, 3, 1)  # -> [B,gh,gw,D], row-major below
    b, gh, gw, d = x.shape
    x = x + self.semantic
    if self.pos_embed_2d:
      if gh > self.max_grid or gw > self.max_grid:
        raise ValueError(f"pixel grid {gh}x{gw} exceeds max_grid {self.max_grid}")
      x = x + self.row_embed[:gh, None] + self.col_embed[None, :gw]
    return x.reshape(b, gh * gw, d)


class PixelBertEncoder(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.cnn = build_resnet(cfg.cnn)
    self.visual = VisualEmbedder(cfg)
    self.bert = transformers.BertModel(hf_bert_config(cfg), add_pooling_layer=True)
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32), persistent=False)
    self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32), persistent=False)

  def encode_image(self, image: torch.Tensor, image_mask: torch.Tensor):
    """uint8 [B,H,W,3], bool [B,H,W] -> (pixels [B,P,D], pixel_mask bool [B,P])."""
    mask = image_mask.bool()
    x = (image.float() / 255.0 - self.mean) / self.std
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype))
    c5 = resnet_c5(self.cnn, x.permute(0, 3, 1, 2))
    pixels = self.visual(c5)
    gh, gw = c5.shape[2] // 2, c5.shape[3] // 2
    pixel_mask = mask[:, ::CELL, ::CELL][:, :gh, :gw].reshape(mask.shape[0], gh * gw)
    return pixels, pixel_mask

  def fuse(self, input_ids, text_mask, pixels, pixel_mask):
    """-> (sequence [B,L+P,D], pooled [B,D])."""
    from transformers.masking_utils import create_bidirectional_mask

    text = self.bert.embeddings(input_ids=input_ids.long())
    x = torch.cat([text, pixels.to(text.dtype)], dim=1)
    mask = torch.cat([text_mask.bool(), pixel_mask.bool()], dim=1)
    attn = create_bidirectional_mask(config=self.bert.config, inputs_embeds=x, attention_mask=mask)
    seq = self.bert.encoder(x, attention_mask=attn).last_hidden_state
    return seq, self.bert.pooler(seq)

  def forward(self, image, image_mask, input_ids, text_mask):
    pixels, pixel_mask = self.encode_image(image, image_mask)
    seq, pooled = self.fuse(input_ids, text_mask, pixels, pixel_mask)
    return dict(sequence=seq, pooled=pooled, pixel_mask=pixel_mask)


class MlmHead(nn.Module):
  """HF `cls.predictions` with the decoder tied to the word embeddings (passed in at call time)."""

  def __init__(self, cfg):
    super().__init__()
    self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
    self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

  def forward(self, seq, word_embeddings):
    h = self.LayerNorm(F.gelu(self.dense(seq)))
    return F.linear(h, word_embeddings) + self.bias


class LinearHead(nn.Module):

  def __init__(self, d_in, n_out):
    super().__init__()
    self.dense = nn.Linear(d_in, n_out)

  def forward(self, x):
    return self.dense(x)


class MlpHead(nn.Module):

  def __init__(self, cfg, d_in, n_out):
    super().__init__()
    hidden = cfg.head_hidden_multiplier * cfg.hidden_size
    self.dense_0 = nn.Linear(d_in, hidden)
    self.LayerNorm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
    self.dense_1 = nn.Linear(hidden, n_out)

  def forward(self, x):
    return self.dense_1(self.LayerNorm(F.gelu(self.dense_0(x))))


@dataclasses.dataclass(frozen=True)
class TorchHeads:
  """A task's heads on the PyTorch side (task_table.py names one per task as `torch_heads`).

  `modules(cfg)` -> {attribute: module}: the heads, set on `PixelBert` under the names their state dict
  entries carry (as `model_mapping`'s head rules name them); `outputs(model, enc, inputs)` -> the task's
  outputs from the encoder's (`enc`) and the model's keyword inputs."""

  modules: Callable[[Any], dict[str, nn.Module]]
  outputs: Callable[["PixelBert", dict, dict], dict]


def _pretrain_outputs(model, enc, inputs):
  text = enc["sequence"][:, : inputs["input_ids"].shape[1]]
  mlm = model.mlm_head(text, model.encoder.bert.embeddings.word_embeddings.weight)
  return dict(mlm_logits=mlm, itm_logits=model.itm_head(enc["pooled"]))


def _nlvr2_outputs(model, enc, inputs):
  if inputs.get("image1") is None or inputs.get("image1_mask") is None:
    raise ValueError("the NLVR2 model needs image1 and image1_mask")
  enc1 = model.encoder(inputs["image1"], inputs["image1_mask"], inputs["input_ids"], inputs["text_mask"])
  return dict(
      sequence1=enc1["sequence"],
      pooled1=enc1["pooled"],
      pixel_mask1=enc1["pixel_mask"],
      nlvr2_logits=model.nlvr2_head(torch.cat([enc["pooled"], enc1["pooled"]], dim=-1)),
  )


PRETRAIN_HEADS = TorchHeads(
    modules=lambda cfg: dict(mlm_head=MlmHead(cfg), itm_head=LinearHead(cfg.hidden_size, 2)),
    outputs=_pretrain_outputs,
)
VQA_HEADS = TorchHeads(
    modules=lambda cfg: dict(vqa_head=MlpHead(cfg, cfg.hidden_size, cfg.num_answers)),
    outputs=lambda model, enc, inputs: dict(vqa_logits=model.vqa_head(enc["pooled"])),
)
NLVR2_HEADS = TorchHeads(
    modules=lambda cfg: dict(nlvr2_head=MlpHead(cfg, 2 * cfg.hidden_size, 2)), outputs=_nlvr2_outputs
)
RETRIEVAL_HEADS = TorchHeads(
    modules=lambda cfg: dict(retrieval_head=LinearHead(cfg.hidden_size, 1)),
    outputs=lambda model, enc, inputs: dict(retrieval_logits=model.retrieval_head(enc["pooled"])[:, 0]),
)


class PixelBert(nn.Module):
  """The `task` model: the encoder and the task's heads (its `torch_heads` in task_table.py). Outputs as the
  Flax model's, plus the encoder's `sequence` / `pooled` (NLVR2 also `sequence1` / `pooled1` for the second
  image)."""

  def __init__(self, cfg, task: str):
    super().__init__()
    self.task, self.text_len_limit = task, cfg.max_position_embeddings
    self.heads = task_table.resolve(task_table.spec(task).torch_heads)
    self.encoder = PixelBertEncoder(cfg)
    for name, module in self.heads.modules(cfg).items():
      self.add_module(name, module)

  def forward(self, image, image_mask, input_ids, text_mask, image1=None, image1_mask=None):
    enc = self.encoder(image, image_mask, input_ids, text_mask)
    inputs = dict(input_ids=input_ids, text_mask=text_mask, image1=image1, image1_mask=image1_mask)
    return {**enc, **self.heads.outputs(self, enc, inputs)}


def _restore_non_persistent(model: PixelBert) -> None:
  """Buffers that are not in any state dict (HF's position/token-type ids, the ImageNet constants)
  stay on the meta device after `load_state_dict(assign=True)`: rebuild them on the CPU."""
  emb = model.encoder.bert.embeddings
  n = emb.position_embeddings.num_embeddings
  emb.position_ids = torch.arange(n).expand((1, -1))
  emb.token_type_ids = torch.zeros((1, n), dtype=torch.long)
  model.encoder.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
  model.encoder.std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
  left = [k for k, b in model.named_buffers() if b.is_meta] + [k for k, p in model.named_parameters() if p.is_meta]
  if left:
    raise RuntimeError(f"tensors never loaded: {left[:5]}")


def pixelbert_from_state_dict(cfg, task: str, state_dict: dict) -> PixelBert:
  """Builds the model on the meta device (no random init, no second copy) and takes the tensors as they
  are (NumPy arrays share their memory, memory-mapped files stay mapped); strict."""
  with torch.device("meta"):
    model = PixelBert(cfg, task)
  tensors = {
      k: torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in state_dict.items()
  }
  model.load_state_dict(tensors, strict=True, assign=True)
  _restore_non_persistent(model)
  return model.eval()


def load_pixelbert(directory: str | os.PathLike) -> PixelBert:
  """The model written by `to-torch` into `directory` (pixelbert_config.json + pixelbert.safetensors)."""
  directory = os.fspath(directory)
  with open(os.path.join(directory, "pixelbert_config.json")) as f:
    meta = json.load(f)
  cfg = ml_collections.ConfigDict(meta["model"])
  return pixelbert_from_state_dict(
      cfg, meta["task"], read_safetensors(os.path.join(directory, "pixelbert.safetensors"))
  )
