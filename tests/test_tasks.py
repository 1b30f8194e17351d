"""Task losses, metrics and evaluators on hand-built batches and score matrices (tiny models, CPU)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelbert_jax.models.build import build_model, dummy_inputs
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.tasks import nlvr2, nlvr2_eval, retrieval, retrieval_eval, vqa, vqa_eval


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_vqa_loss_is_bce_summed_over_answers_and_averaged_over_real_examples():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5)).astype(np.float32)
  targets = np.array([[1, 0.3, 0, 0, 0], [0, 0, 0.6, 0.9, 0], [1, 1, 1, 1, 1]], np.float32)
  mask = np.array([1, 1, 0], np.float32)  # the third is a padding example
  loss, m = vqa.loss_and_metrics({"vqa_logits": jnp.asarray(logits)}, {"vqa_targets": targets, "example_mask": mask})
  p = _sigmoid(logits.astype(np.float64))
  bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(1)
  assert float(loss) == pytest.approx(bce[:2].mean(), rel=1e-5)
  top = logits.argmax(1)
  s, n = m["vqa_score"]
  assert float(n) == 2 and float(s) == pytest.approx(targets[0, top[0]] + targets[1, top[1]])


def test_vqa_result_records_and_official_metrics():
  vocab = ["yes", "no", "2"]
  records = vqa_eval.result_records(np.array([11, 12], np.int64), np.array([2, 0]), vocab)
  assert records == [{"question_id": 11, "answer": "2"}, {"question_id": 12, "answer": "yes"}]
  gt = {
      11: {"answers": ["two"] * 2 + ["2"] + ["3"] * 7, "answer_type": "number"},
      12: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
  }
  m = vqa_eval.official_metrics(records, gt)
  assert m["vqa_acc"] == pytest.approx((0.9 + 1.0) / 2)
  assert m["vqa_acc/number"] == pytest.approx(0.9)
  with pytest.raises(ValueError, match="duplicate"):
    vqa_eval.result_records([1, 1], [0, 0], vocab)


def test_nlvr2_loss_accuracy_consistency_and_csv():
  logits = jnp.array([[2.0, -1.0], [0.0, 3.0], [1.0, 0.0]])
  batch = {"label": np.array([0, 0, 1]), "example_mask": np.array([1, 1, 0], np.float32)}
  loss, m = nlvr2.loss_and_metrics({"nlvr2_logits": logits}, batch)
  lse = lambda r: np.log(np.exp(r).sum())
  expected = ((lse([2, -1]) - 2) + (lse([0, 3]) - 0)) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert tuple(map(float, m["acc"])) == (1.0, 2.0)

  ids = ["dev-1-0-0", "dev-1-0-1", "dev-1-0-2", "dev-2-3-0", "dev-2-3-1"]
  res = nlvr2_eval.accuracy_and_consistency(ids, [1, 0, 1, 1, 0], [1, 0, 0, 1, 0])
  assert res["acc"] == pytest.approx(4 / 5) and res["consistency"] == pytest.approx(1 / 2)
  assert nlvr2_eval.result_csv(ids[:2], [1, 0]) == "dev-1-0-0,True\ndev-1-0-1,False\n"
  with pytest.raises(ValueError, match="dev-1-0"):
    nlvr2_eval.group_of("dev-1-0-x")


@pytest.mark.slow
def test_hard_negatives_only_they_and_the_positive_get_gradient():
  scores = jnp.array([[0.5, 3.0, -1.0, 2.0, 0.1, 1.0]])  # negatives 3.0, 2.0 are the 2 hardest
  batch = {"example_mask": np.ones(1, np.float32)}
  grad = jax.grad(lambda s: retrieval.loss_and_metrics({"retrieval_logits": s}, batch, hard_negatives=2)[0])(scores)
  kept = np.asarray(scores[0], np.float64)[[0, 1, 3]]
  p = np.exp(kept) / np.exp(kept).sum()  # the softmax runs over the positive and the 2 hardest
  expected = np.array([p[0] - 1, p[1], 0, p[2], 0, 0])
  np.testing.assert_allclose(np.asarray(grad[0]), expected, rtol=1e-5, atol=1e-7)
  loss, _ = retrieval.loss_and_metrics({"retrieval_logits": scores}, batch, hard_negatives=2)
  assert float(loss) == pytest.approx(-np.log(p[0]), rel=1e-5)


@pytest.mark.parametrize("hard_negatives", [0, 2, 5])
def test_retrieval_loss_ignores_a_shift_of_all_scores(hard_negatives):
  """A score offset shared by all captions of an image (the head's bias, a common drift) must get no
  gradient. Easy negatives kept as stop-gradient constants in the softmax broke this: the loss then
  rewarded raising every score that carries gradient, and training stalled at ln(1+N)."""
  scores = jnp.array([[0.5, 3.0, -1.0, 2.0, 0.1, 1.0], [0.0, 0.2, 0.4, -0.3, 0.1, 0.0]])
  batch = {"example_mask": np.ones(2, np.float32)}

  def loss_of_shift(c):
    return retrieval.loss_and_metrics({"retrieval_logits": scores + c}, batch, hard_negatives=hard_negatives)[0]

  # |d loss / d c| is a sum of probabilities minus one in float32: exact zero up to rounding of ~6 terms
  assert abs(float(jax.grad(loss_of_shift)(0.0))) < 1e-6


def test_recall_on_a_hand_built_score_matrix():
  # 3 images, 6 captions; captions 2k and 2k+1 belong to image k.
  cap_img = np.array([0, 0, 1, 1, 2, 2])
  s = np.array(
      [
          [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: caption 0 is first      -> TR rank 0
          [0.9, 0.0, 0.5, 0.8, 0.0, 0.0],  # image 1: captions 0 then 3 (own)  -> TR rank 1
          [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # image 2: own captions 4, 5 last   -> TR rank 4
      ]
  )
  r = retrieval_eval.ranks(s, cap_img)
  np.testing.assert_array_equal(r["tr"], [0, 1, 4])
  # IR per caption, ranking the column: c0 [.9,.9,.9] tie -> index order, image 0 first: 0;
  # c1 [.1,0,.8] -> image 0 second: 1; c2 [.8,.5,.7] -> image 1 third: 2; c3 [0,.8,.6] -> 0;
  # c4 [0,0,.5] -> 0; c5 [0,0,.4] -> 0.
  np.testing.assert_array_equal(r["ir"], [0, 1, 2, 0, 0, 0])
  rec = retrieval_eval.recalls(r, ks=(1, 2, 5))
  assert rec["tr_r1"] == pytest.approx(1 / 3) and rec["tr_r2"] == pytest.approx(2 / 3)
  assert rec["tr_r5"] == 1.0
  assert rec["ir_r1"] == pytest.approx(4 / 6) and rec["ir_r2"] == pytest.approx(5 / 6)


def test_first_stage_candidates_and_unscored_pairs_rank_last():
  sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
  pairs = retrieval_eval.candidate_pairs(sim, 1)
  assert {tuple(p) for p in pairs} == {(0, 0), (1, 1), (0, 2)}  # TR top-1: c0, c1; IR top-1: i0, i1, i0
  assert len(retrieval_eval.candidate_pairs(sim, 0)) == 6
  full = retrieval_eval.score_matrix(2, 3, pairs, np.array([-5.0, -6.0, -7.0]), sim)
  assert full[0, 1] < -7.0 and full[1, 0] < -7.0 and full[1, 2] < -7.0
  assert full[1, 2] > full[1, 0]  # unscored pairs keep the first-stage order


@pytest.fixture(scope="module")
def tiny_retrieval():
  cfg = model_config("tiny", "tiny", 30)
  cfg.cnn.frozen = True  # as configs/retrieval.py: the paper fine-tunes only the transformer
  model = build_model(cfg, "retrieval")
  init = jax.jit(lambda k: model.init({"params": k}, **dummy_inputs("retrieval", text_len=6), train=False))
  return model, nn.unbox(init(jax.random.PRNGKey(0)))


_apply = {}


def jit_apply(model, *args, **kwargs):
  """model.apply under jit (eager Flax on CPU costs seconds per call)."""
  fn = _apply.setdefault(model, jax.jit(model.apply, static_argnames=("train", "method")))
  return fn(*args, **kwargs)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 255, (n, 128, 128, 3), dtype=np.uint8), np.ones((n, 128, 128), bool)


@pytest.mark.slow
def test_score_groups_equals_pairwise_scores_and_freezes_the_cnn(tiny_retrieval):
  model, variables = tiny_retrieval
  images, masks = _images(2)
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 30, (2, 3, 6)).astype(np.int32)
  tmask = np.ones((2, 3, 6), np.int32)
  tmask[:, :, 4:] = 0
  got = jit_apply(
      model,
      variables,
      **retrieval.model_inputs({"image": images, "image_mask": masks, "input_ids": ids, "text_mask": tmask}),
  )["retrieval_logits"]
  for b in range(2):
    for g in range(3):
      ref = jit_apply(model, variables, images[b : b + 1], masks[b : b + 1], ids[b, g : g + 1], tmask[b, g : g + 1])
      np.testing.assert_allclose(got[b, g], ref["retrieval_logits"][0], rtol=1e-4, atol=1e-5)

  def loss(params):
    out = model.apply(
        {**variables, "params": params},
        **retrieval.model_inputs({"image": images, "image_mask": masks, "input_ids": ids, "text_mask": tmask}),
        train=True,
        rngs={"dropout": jax.random.PRNGKey(1)},
    )
    return retrieval.loss_and_metrics(out, {"example_mask": np.ones(2, np.float32)}, hard_negatives=1)[0]

  grads = jax.jit(jax.grad(loss))(variables["params"])
  cnn_norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(grads["encoder"]["cnn"]))
  visual_norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(grads["encoder"]["visual"]))
  assert cnn_norm == 0.0 and visual_norm > 0.0


@pytest.mark.slow
def test_cached_evaluation_full_and_first_stage(tiny_retrieval):
  model, variables = tiny_retrieval
  images, masks = _images(4, seed=2)
  rng = np.random.default_rng(3)
  ids = rng.integers(5, 30, (8, 10)).astype(np.int32)
  tmask = np.ones((8, 10), np.int32)
  tmask[:, 7:] = 0
  cap_img = np.repeat(np.arange(4), 2)
  full, rank_full = retrieval_eval.rank_and_recall(
      model, variables, list(images), list(masks), ids, tmask, cap_img, first_stage_k=0, pair_batch_size=5
  )
  assert full["pairs_scored"] == 32
  # The cached scores equal scoring each pair from raw pixels.
  direct = np.array(
      [
          [
              float(
                  jit_apply(model, variables, images[i : i + 1], masks[i : i + 1], ids[c : c + 1], tmask[c : c + 1])[
                      "retrieval_logits"
                  ][0]
              )
              for c in range(8)
          ]
          for i in range(4)
      ]
  )
  np.testing.assert_array_equal(rank_full["tr"], retrieval_eval.ranks(direct, cap_img)["tr"])
  np.testing.assert_array_equal(rank_full["ir"], retrieval_eval.ranks(direct, cap_img)["ir"])
  # A first stage keeping everything is the full ranking; a small one scores fewer pairs.
  same, rank_same = retrieval_eval.rank_and_recall(
      model, variables, list(images), list(masks), ids, tmask, cap_img, first_stage_k=8, pair_batch_size=7
  )
  np.testing.assert_array_equal(rank_same["tr"], rank_full["tr"])
  small, _ = retrieval_eval.rank_and_recall(
      model, variables, list(images), list(masks), ids, tmask, cap_img, first_stage_k=1, pair_batch_size=7
  )
  assert small["pairs_scored"] < 32 and small["pairs_per_s"] > 0


@pytest.mark.slow
def test_train_step_is_a_pure_function_of_the_state_and_the_batch():
  """train_step.train_step called directly, as the trainer and bench/ call it: one update with dropout and
  pixel sampling on, keyed by (state.rng, state.step), so the same state and batch give the same new state
  bit for bit, and a state one step on draws other keys."""
  import functools

  import optax
  from pixelbert_jax import tasks, train_step

  cfg = model_config("tiny", "tiny", 30)
  model = build_model(cfg, "pretrain")
  tx = optax.adam(1e-3)
  state = jax.jit(lambda r: nn.unbox(train_step.init_state(r, model=model, task_name="pretrain", tx=tx, text_len=6)))(
      jax.random.PRNGKey(0)
  )
  rng = np.random.default_rng(0)
  batch = dict(dummy_inputs("pretrain", batch_size=4, text_len=6))
  batch["image"] = jnp.asarray(rng.integers(0, 256, batch["image"].shape), jnp.uint8)
  batch["input_ids"] = jnp.asarray(rng.integers(4, 30, (4, 6)), jnp.int32)
  batch.update(
      mlm_labels=jnp.asarray(rng.integers(4, 30, (4, 6)), jnp.int32),
      mlm_weights=jnp.asarray([[0, 1, 0, 1, 0, 0]] * 4, jnp.float32),
      itm_label=jnp.asarray([1, 0, 1, 0], jnp.int32),
      example_mask=jnp.ones((4,), jnp.float32),
  )
  step = jax.jit(functools.partial(train_step.train_step, model=model, task=tasks.get_task("pretrain"), tx=tx))
  new, metrics = step(state, batch)
  again, _ = step(state, batch)
  assert int(new["step"]) == 1 and float(metrics["grad_norm"][0]) > 0
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(new["params"]))]
  assert all(moved), "every parameter gets an Adam update"
  _, later = step(new, batch)  # other dropout / sampling keys: another loss on the same batch
  assert float(later["loss"][0]) != float(metrics["loss"][0])
