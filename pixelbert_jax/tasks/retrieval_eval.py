"""Retrieval evaluation that does not take a day: cached pixels, batched pair scoring, optional first stage.

1. Every image goes through the CNN once; its pixel tokens are cached (padded to the largest grid, masked).
2. An optional first stage ranks all pairs by a cheap similarity from the same model: the cosine between
   the mean of an image's pixel tokens and the mean of a caption's word embeddings (both are inputs of the
   same transformer, in the same space). For each image its top-k captions and for each caption its top-k
   images are then scored by the full model; `first_stage_k: 0` scores every pair (full ranking).
3. Pairs are scored in fixed-size batches by one jitted function gathering cached pixels on device.
Pairs the first stage dropped rank after every scored pair, in first-stage order. Ties keep index order.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixelbert_jax import xla_options
from pixelbert_jax.models import build
from pixelbert_jax.tasks import eval_loop


def encode_images(
    model, variables, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], batch_size: int = 32
) -> tuple[jax.Array, jax.Array]:
  """Per-image uint8 [H,W,3] and bool [H,W] -> pixels [N,P,D], mask [N,P] (P = the largest grid)."""
  if len(images) != len(masks) or not len(images):
    raise ValueError(f"need as many images as masks (>0), got {len(images)} and {len(masks)}")
  fn = jax.jit(
      lambda v, im, m: model.apply(v, im, m, method=model.encode_image), compiler_options=xla_options.compiler_options()
  )
  by_shape: dict[tuple, list[int]] = {}
  for i, im in enumerate(images):
    by_shape.setdefault(tuple(im.shape), []).append(i)
  chunks = {}
  for shape, idx in by_shape.items():
    for s in range(0, len(idx), batch_size):
      part = idx[s : s + batch_size]
      pad = part + [part[-1]] * (batch_size - len(part))  # one static batch shape per bucket
      # To the host once per batch: indexing a multi-device result eagerly would dispatch one small
      # cross-device program per image, each a collective that an overloaded CPU host can time out.
      px, pm = jax.device_get(fn(variables, np.stack([images[i] for i in pad]), np.stack([masks[i] for i in pad])))
      for j, i in enumerate(part):
        chunks[i] = (px[j], pm[j])
  p_max = max(px.shape[0] for px, _ in chunks.values())
  pixels = np.stack([np.pad(chunks[i][0], ((0, p_max - chunks[i][0].shape[0]), (0, 0))) for i in range(len(images))])
  pmask = np.stack([np.pad(chunks[i][1], (0, p_max - chunks[i][1].shape[0])) for i in range(len(images))])
  return jnp.asarray(pixels), jnp.asarray(pmask)


def cheap_similarity(model, variables, pixels, pixel_mask, input_ids, text_mask) -> np.ndarray:
  """[N_img, N_cap] cosine of mean pixel token and mean word embedding (the first stage)."""

  def text_means(v, ids, m):
    emb = model.apply(v, ids, True, method=lambda mod, i, d: mod.encoder.bert.embed_text(i, d))
    w = m.astype(jnp.float32)[..., None]
    return jnp.sum(emb * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)

  t = jax.jit(text_means)(variables, input_ids, text_mask)
  w = pixel_mask.astype(jnp.float32)[..., None]
  p = jnp.sum(pixels.astype(jnp.float32) * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
  return np.asarray(unit(p) @ unit(t).T)


def candidate_pairs(similarity: np.ndarray, k: int) -> np.ndarray:
  """[M,2] (image, caption) pairs: each image's top-k captions and each caption's top-k images."""
  n_img, n_cap = similarity.shape
  if k <= 0 or (k >= n_img and k >= n_cap):
    return np.stack(np.meshgrid(np.arange(n_img), np.arange(n_cap), indexing="ij"), -1).reshape(-1, 2)
  tr = np.argsort(-similarity, axis=1, kind="stable")[:, : min(k, n_cap)]
  ir = np.argsort(-similarity, axis=0, kind="stable")[: min(k, n_img), :]
  pairs = np.concatenate(
      [
          np.stack([np.repeat(np.arange(n_img), tr.shape[1]), tr.reshape(-1)], -1),
          np.stack([ir.T.reshape(-1), np.repeat(np.arange(n_cap), ir.shape[0])], -1),
      ]
  )
  return np.unique(pairs, axis=0)


def score_pairs(
    model, variables, pixels, pixel_mask, input_ids, text_mask, pairs: np.ndarray, batch_size: int
) -> tuple[np.ndarray, float]:
  """Full-model scores of `pairs` [M,2] -> (scores [M], pairs per second)."""
  length = max(1, int(np.max(np.sum(np.asarray(text_mask), axis=1))))  # every caption fits: trim padding
  ids, tmask = jnp.asarray(np.asarray(input_ids)[:, :length]), jnp.asarray(np.asarray(text_mask)[:, :length])

  @functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
  def fn(v, px, pm, all_ids, all_tmask, img, cap):
    return model.apply(v, all_ids[cap], all_tmask[cap], px[img], pm[img], method=model.score_pixels)

  out = []
  start = time.perf_counter()
  for s in range(0, len(pairs), batch_size):
    part = pairs[s : s + batch_size]
    n = len(part)
    if n < batch_size:
      part = np.concatenate([part, np.repeat(part[-1:], batch_size - n, 0)])
    out.append(np.asarray(fn(variables, pixels, pixel_mask, ids, tmask, part[:, 0], part[:, 1]))[:n])
  elapsed = time.perf_counter() - start
  return np.concatenate(out) if out else np.zeros(0, np.float32), len(pairs) / max(elapsed, 1e-9)


def score_matrix(
    n_img: int, n_cap: int, pairs: np.ndarray, scores: np.ndarray, similarity: np.ndarray | None
) -> np.ndarray:
  """Scored pairs keep their score; the rest sit below all of them, ordered by first-stage similarity."""
  full = np.full((n_img, n_cap), -np.inf, np.float64)
  if len(pairs) < n_img * n_cap:
    floor = float(np.min(scores)) - 10.0 if len(scores) else 0.0
    full[:] = floor - 2.0 + (similarity if similarity is not None else 0.0)  # cosine in [-1, 1]
  full[pairs[:, 0], pairs[:, 1]] = scores
  return full


def ranks(scores: np.ndarray, caption_image: Sequence[int]) -> dict[str, np.ndarray]:
  """0-based rank of the first right answer: per image among captions (TR), per caption among images (IR)."""
  scores = np.asarray(scores)
  cap_img = np.asarray(caption_image)
  n_img, n_cap = scores.shape
  if cap_img.shape != (n_cap,) or cap_img.min() < 0 or cap_img.max() >= n_img:
    raise ValueError(f"caption_image must give an image in [0, {n_img}) for each of {n_cap} captions")
  order_tr = np.argsort(-scores, axis=1, kind="stable")  # [img, rank] -> caption
  tr = np.array([np.flatnonzero(cap_img[order_tr[i]] == i)[0] if np.any(cap_img == i) else n_cap for i in range(n_img)])
  order_ir = np.argsort(-scores, axis=0, kind="stable")  # [rank, cap] -> image
  ir = np.array([int(np.flatnonzero(order_ir[:, c] == cap_img[c])[0]) for c in range(n_cap)])
  return {"tr": tr, "ir": ir, "tr_top": order_tr[:, :10], "ir_top": order_ir[:10].T}


def recalls(rank: dict[str, np.ndarray], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  out = {}
  for d in ("tr", "ir"):
    for k in ks:
      out[f"{d}_r{k}"] = float(np.mean(rank[d] < k))
  out["r_mean"] = float(np.mean(list(out.values())))
  return out


def rank_and_recall(
    model,
    variables,
    images,
    image_masks,
    input_ids,
    text_mask,
    caption_image,
    *,
    first_stage_k: int,
    pair_batch_size: int,
    image_batch_size: int = 32,
) -> tuple[dict, dict]:
  """The whole evaluation on in-memory data -> (metrics, ranks)."""
  pixels, pmask = encode_images(model, variables, images, image_masks, image_batch_size)
  n_img, n_cap = len(images), len(input_ids)
  sim = (
      cheap_similarity(model, variables, pixels, pmask, jnp.asarray(input_ids), jnp.asarray(text_mask))
      if first_stage_k > 0
      else None
  )
  pairs = candidate_pairs(sim, first_stage_k) if sim is not None else candidate_pairs(np.zeros((n_img, n_cap)), 0)
  scores, pairs_per_s = score_pairs(model, variables, pixels, pmask, input_ids, text_mask, pairs, pair_batch_size)
  rank = ranks(score_matrix(n_img, n_cap, pairs, scores, sim), caption_image)
  metrics = recalls(rank)
  metrics.update({"pairs_scored": float(len(pairs)), "pairs_per_s": pairs_per_s})
  logging.info("retrieval: scored %d of %d pairs at %.0f pairs/s", len(pairs), n_img * n_cap, pairs_per_s)
  print(f"retrieval eval: {len(pairs)} pairs of {n_img}x{n_cap} scored at {pairs_per_s:.0f} pairs/s", flush=True)
  return metrics, rank


def ranks_json(rank: dict, image_ids: Sequence, caption_image: Sequence[int]) -> dict:
  return {
      "text_retrieval": [
          {"image": str(image_ids[i]), "rank": int(rank["tr"][i]), "top_captions": [int(c) for c in rank["tr_top"][i]]}
          for i in range(len(rank["tr"]))
      ],
      "image_retrieval": [
          {
              "caption": c,
              "image": str(image_ids[int(caption_image[c])]),
              "rank": int(rank["ir"][c]),
              "top_images": [str(image_ids[int(i)]) for i in rank["ir_top"][c]],
          }
          for c in range(len(rank["ir"]))
      ],
  }


def evaluate(context, data, state, workdir) -> dict[str, float]:
  cfg = context.config
  split = cfg.data.eval_split
  gallery = data.retrieval_gallery(split)
  images, masks, ids, tmask, cap_img, image_ids = _take(gallery, int(cfg.retrieval_eval.num_images))
  variables = build.variables(state["params"], state["batch_stats"])
  with eval_loop.mesh_context(context):
    metrics, rank = rank_and_recall(
        context.model,
        variables,
        images,
        masks,
        ids,
        tmask,
        cap_img,
        first_stage_k=int(cfg.retrieval_eval.first_stage_k),
        pair_batch_size=int(cfg.retrieval_eval.pair_batch_size),
    )
  metrics["num_images"] = float(len(images))
  path = eval_loop.result_path(workdir, "retrieval", split, eval_loop.step_of(state), "json")
  eval_loop.write_json(path, ranks_json(rank, image_ids, cap_img))
  return {f"eval/{k}": v for k, v in metrics.items()}


def _take(data, num_images: int):
  """The first `num_images` images (0 = all) of a retrieval gallery (`TaskData.retrieval_gallery`) and their
  captions."""
  images, masks = list(data["image"]), list(data["image_mask"])
  cap_img = np.asarray(data["caption_image"])
  image_ids = list(data.get("image_id", range(len(images))))
  if 0 < num_images < len(images):
    keep = cap_img < num_images
    images, masks, image_ids = images[:num_images], masks[:num_images], image_ids[:num_images]
    return (
        images,
        masks,
        np.asarray(data["input_ids"])[keep],
        np.asarray(data["text_mask"])[keep],
        cap_img[keep],
        image_ids,
    )
  return images, masks, np.asarray(data["input_ids"]), np.asarray(data["text_mask"]), cap_img, image_ids
