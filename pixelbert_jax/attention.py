"""Where each word looks, as numbers: Pixel-BERT's text->pixel attention read out of a checkpoint.

The model reads `[CLS] text [SEP] pixels`; the pixels are the (H/64)x(W/64) grid of feature pixels of the
resized image, row-major, all of them (inference never samples). A word's map is the attention its tokens
(wordpieces of one word, averaged) pay to the pixel tokens: by default the mean over the heads of the last
layer; a layer (0-based, negative counts from the end) and a head pick others, and the rollout multiplies
the head-averaged attention of the layers up to that layer, each mixed half-half with the residual's
identity (Abnar & Zuidema 2020). Maps are float32 whatever the model's dtype.

`AttentionMaps(WORKDIR)` holds the checkpoint's model built to return its attention (built once, reused by
every call); `.maps(image_path, text, ...)` gives the arrays visualize.py draws. Any task's checkpoint
works: only the shared encoder runs (an NLVR2 model sees the one image given, as its first).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from pixelbert_jax import model_context
from pixelbert_jax.models.pixel_bert import CELL
from pixelbert_jax.predict import PredictError, Predictor

# ---------------------------------------------------------------------------------------------------------------
# Attention from the model


# The model config values that make the attention readable: einsum attention (the fused kinds never form the
# probability matrix, and cuDNN's runs only on a GPU) and no remat. Neither changes a parameter.
READABLE = dict(attention_impl="einsum", remat=False)


def readable_model_config(model_cfg) -> ml_collections.ConfigDict:
  """A copy of a model config with READABLE set: the same parameters, attention that can be read."""
  cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  cfg.update(READABLE)
  return cfg


class AttentionRunner:
  """Runs a model context's shared encoder (every task has it; NLVR2 with one image) and returns what every
  layer's attention module sowed. The context's model must be readable (READABLE, readable_model_config)."""

  def __init__(self, context: model_context.ModelContext):
    cfg = context.config.model
    if cfg.get("attention_impl", "einsum") != "einsum" or cfg.get("remat", False):
      raise ValueError(
          f"model.attention_impl={cfg.get('attention_impl')!r}, model.remat={cfg.get('remat')!r}: the attention "
          "can be read only with 'einsum' and no remat (build the context from attention.readable_model_config)"
      )
    self.context = context
    self.model = context.model
    self.num_layers, self.num_heads = int(cfg.num_layers), int(cfg.num_heads)
    self._run = jax.jit(self._probs)

  def _probs(self, variables, image, image_mask, input_ids, text_mask):
    def encoder(module, *args):
      return module.encoder(*args, train=False)["pixel_mask"]

    pixel_mask, state = self.model.apply(
        variables, image, image_mask, input_ids, text_mask, method=encoder, mutable=["intermediates"]
    )
    return stack_attention(state["intermediates"]), pixel_mask

  def __call__(self, variables, image, image_mask, input_ids, text_mask) -> tuple[np.ndarray, np.ndarray]:
    """-> (float32 [B, layers, heads, T, T], bool [B, P]); T = input_ids' length + P."""
    probs, pixel_mask = self._run(variables, image, image_mask, input_ids, text_mask)
    return np.asarray(probs, np.float32), np.asarray(pixel_mask, bool)


def stack_attention(intermediates: dict) -> jax.Array:
  """The `attention_probs` every BertSelfAttention sowed -> float32 [B, layers, heads, T, T], layers in order.

  Each layer ran once (the encoder alone), so each sown tuple holds one array."""
  found = {}
  for path, value in traverse_util.flatten_dict(intermediates).items():
    if path[-1] != "attention_probs":
      continue
    layer = [int(m.group(1)) for p in path if (m := re.fullmatch(r"layer_(\d+)", p))]
    if len(layer) != 1 or len(value) != 1:
      raise ValueError(f"unexpected sown attention at {'/'.join(path)} ({len(value)} values)")
    found[layer[0]] = value[0]
  if sorted(found) != list(range(len(found))) or not found:
    raise ValueError(f"attention probabilities of layers {sorted(found)} sown; expected 0..n-1 (einsum attention?)")
  return jnp.stack([found[i] for i in range(len(found))], axis=1).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Attention matrices -> word maps (numpy, float32)


def rollout(probs: np.ndarray, upto: int) -> np.ndarray:
  """Attention rollout through layers 0..upto: float32 [..., layers, heads, T, T] -> [..., T, T].

  Each layer's head mean is mixed half-half with the identity (the residual) and renormalised, then the
  layers are multiplied, last on the left: row i says how much token i's final state draws on each input."""
  a = probs[..., : upto + 1, :, :, :].mean(axis=-3, dtype=np.float32)  # [..., l, T, T]
  t = a.shape[-1]
  a = 0.5 * a + 0.5 * np.eye(t, dtype=np.float32)
  a = a / a.sum(axis=-1, keepdims=True)
  out = a[..., 0, :, :]
  for layer in range(1, a.shape[-3]):
    out = np.matmul(a[..., layer, :, :], out)
  return out.astype(np.float32)


def check_mode(num_layers: int, num_heads: int, layer: int, head: int | None, use_rollout: bool) -> int:
  """Validates layer/head against the model; returns the layer as a non-negative index."""
  if not -num_layers <= layer < num_layers:
    raise PredictError(
        f"layer {layer} out of range: the model has {num_layers} layers (0..{num_layers - 1}, " f"or -1 for the last)"
    )
  if head is not None:
    if use_rollout:
      raise PredictError("rollout averages the heads: give --head or --rollout, not both")
    if not 0 <= head < num_heads:
      raise PredictError(f"head {head} out of range: the model has {num_heads} heads (0..{num_heads - 1})")
  return layer % num_layers


def attention_matrix(
    probs: np.ndarray,
    layer: int,
    head: int | None = None,
    use_rollout: bool = False,
) -> np.ndarray:
  """float32 [..., layers, heads, T, T] -> [..., T, T]: one head, the head mean of one layer, or the rollout
  up to that layer."""
  if use_rollout:
    return rollout(probs, layer % probs.shape[-4])
  chosen = probs[..., layer, :, :, :]
  return chosen[..., head, :, :] if head is not None else chosen.mean(axis=-3, dtype=np.float32)


def word_spans(tokenizer, text: str, max_len: int) -> list[tuple[str, list[int]]]:
  """The words of `text` as the model sees them: (word as written, its token positions in `[CLS] text [SEP]`).

  Wordpieces (`##...`) join the word they continue; punctuation is its own word (BERT's pre-tokenizer);
  words cut off by max_len are left out."""
  enc = tokenizer(text, max_length=max_len, truncation=True, return_offsets_mapping=True)
  positions: dict[int, list[int]] = {}
  for t, w in enumerate(enc.word_ids()):
    if w is not None:
      positions.setdefault(w, []).append(t)
  offsets = enc["offset_mapping"]
  return [(text[offsets[ts[0]][0] : offsets[ts[-1]][1]], ts) for _, ts in sorted(positions.items())]


def word_to_pixels(matrix: np.ndarray, positions: Sequence[int], pixel_offset: int) -> np.ndarray:
  """float32 [T, T] -> [P]: the attention the word's tokens (rows, averaged) pay to the pixel tokens."""
  rows = matrix[np.asarray(positions)]
  return rows.mean(axis=0, dtype=np.float32)[pixel_offset:]


def valid_size(mask: np.ndarray) -> tuple[int, int]:
  """bool [H, W] mask of an image in its bucket -> the image's (h, w) inside it (top-left, resize_and_pad)."""
  return int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum())


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint's word maps


class AttentionMaps:
  """The attention of a checkpoint's model (a workdir, its checkpoints/ or a step folder; its newest step, or
  `step`): a Predictor whose model is built readable, and the runner over it, both built once, here."""

  def __init__(self, checkpoint: str, step: int | None = None):
    self.predictor = Predictor(checkpoint, step, model_overrides=READABLE)
    self.runner = AttentionRunner(self.predictor.context)

  def __call__(self, image, image_mask, input_ids, text_mask) -> tuple[np.ndarray, np.ndarray]:
    """A batch of model inputs -> (float32 [B, layers, heads, T, T], bool [B, P]) with the checkpoint's
    variables (AttentionRunner)."""
    return self.runner(self.predictor.variables, image, image_mask, input_ids, text_mask)

  def maps(
      self,
      image_path: str,
      text: str,
      words: Sequence[str] | None = None,
      layer: int = -1,
      head: int | None = None,
      use_rollout: bool = False,
  ) -> dict[str, Any]:
    """Everything visualize.py draws: the image, the attention, each chosen word's map over the pixel grid.

    -> dict(image uint8 [h,w,3], probs float32 [layers, heads, T, T], maps float32 [N, gh, gw], words [N],
    scores [N] (share of each word's attention on pixels), bucket, valid_hw, summary (JSON-ready))."""
    predictor, runner = self.predictor, self.runner
    layer_index = check_mode(runner.num_layers, runner.num_heads, layer, head, use_rollout)
    image = predictor.decode(image_path)
    ids, tmask = predictor.encode_texts([text], "text")
    n = int(tmask[0].sum())  # padding tokens change nothing (masked keys): leave them out of the matrices
    ids, tmask = ids[:, :n], tmask[:, :n]
    spans = word_spans(predictor.tokenizer, text.strip(), int(predictor.data_cfg.max_text_len))
    if words:
      wanted = list(dict.fromkeys(w.strip().lower() for w in words))
      known = {w.lower() for w, _ in spans}
      missing = [w for w in wanted if w not in known]
      if missing:
        raise PredictError(f"word(s) {missing} not in the text {text.strip()!r} (its words: {[w for w, _ in spans]})")
      spans = [s for s in spans if s[0].lower() in wanted]
    if not spans:
      raise PredictError(f"the text {text!r} has no words to draw")
    batch, mask = predictor.model_image(image)
    probs, pixel_mask = self(batch, mask, ids, tmask)
    probs, pixel_mask = probs[0], pixel_mask[0]  # [layers, heads, T, T], [P]
    gh, gw = batch.shape[1] // CELL, batch.shape[2] // CELL
    if gh * gw != pixel_mask.shape[0]:
      raise ValueError(f"pixel grid {gh}x{gw} does not match the model's {pixel_mask.shape[0]} pixels")
    matrix = attention_matrix(probs, layer_index, head, use_rollout)
    to_pixels = np.stack([word_to_pixels(matrix, pos, n) * pixel_mask for _, pos in spans])  # [N, P]
    scores = to_pixels.sum(axis=-1)
    tokens = predictor.tokenizer.convert_ids_to_tokens([int(i) for i in ids[0]])
    mode = ("rollout through layers 0.." if use_rollout else "layer ") + str(layer_index)
    mode += "" if use_rollout else (f", head {head}" if head is not None else ", mean over heads")
    summary = dict(
        task=predictor.task,
        step=int(predictor.step),
        text=text.strip(),
        tokens=tokens,
        pixel_offset=n,
        pixel_grid=[gh, gw],
        valid_pixels=int(pixel_mask.sum()),
        image_size=list(image.shape[:2]),
        layer=layer_index,
        head=head,
        rollout=bool(use_rollout),
        mode=mode,
        words=[
            dict(
                word=w,
                tokens=[tokens[p] for p in pos],
                positions=list(pos),
                pixel_attention=float(s),
                peak_pixel=[int(i) for i in np.unravel_index(int(np.argmax(a)), (gh, gw))],
            )
            for (w, pos), s, a in zip(spans, scores, to_pixels)
        ],
    )
    return dict(
        image=image,
        probs=probs,
        maps=to_pixels.reshape(-1, gh, gw).astype(np.float32),
        words=[w for w, _ in spans],
        scores=scores,
        bucket=batch.shape[1:3],
        valid_hw=valid_size(mask[0]),
        summary=summary,
    )
