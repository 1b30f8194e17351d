"""Checkpoint shape checks and partial restore (the pieces resume and fine-tuning rely on)."""

import numpy as np
import pytest

from pixelbert_jax import checkpoint as ckpt


def _tree(hidden=4):
  return {
      "encoder": {
          "bert": {"dense": {"kernel": np.ones((hidden, hidden)), "bias": np.zeros(hidden)}},
          "cnn": {"conv1": {"kernel": np.ones((3, 3, 3, 8))}},
      },
      "itm_head": {"kernel": np.ones((hidden, 2))},
  }


def test_compare_shapes_names_every_mismatch():
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    ckpt.compare_shapes(_tree(4), _tree(6), what="ckpt X")
  msg = str(e.value)
  assert "ckpt X" in msg and "encoder/bert/dense/kernel: config expects (4, 4), checkpoint has (6, 6)" in msg
  assert "itm_head/kernel" in msg and "encoder/cnn" not in msg


def test_compare_shapes_missing_and_extra():
  a, b = _tree(), _tree()
  del b["itm_head"]
  b["vqa_head"] = {"kernel": np.ones((4, 3))}
  with pytest.raises(
      ckpt.CheckpointMismatchError, match="itm_head/kernel: missing.*\n.*vqa_head/kernel: in the checkpoint"
  ):
    ckpt.compare_shapes(a, b, what="c")
  ckpt.compare_shapes(a, b, what="c", allow_missing=True, allow_extra=True)


def test_merge_pretrained_keeps_new_heads_fresh():
  fresh = _tree()
  fresh["vqa_head"] = {"kernel": np.zeros((4, 5))}
  pre = {k: v for k, v in _tree().items()}
  pre = {
      "encoder": {
          "bert": {"dense": {"kernel": np.full((4, 4), 7.0), "bias": np.full(4, 7.0)}},
          "cnn": {"conv1": {"kernel": np.full((3, 3, 3, 8), 7.0)}},
      },
      "itm_head": {"kernel": np.full((4, 2), 7.0)},
      "mlm_head": {"bias": np.ones(9)},
  }
  merged, loaded, kept = ckpt.merge_pretrained(fresh, pre, source="P")
  assert (merged["encoder"]["bert"]["dense"]["kernel"] == 7).all()
  assert (merged["itm_head"]["kernel"] == 7).all()
  assert (merged["vqa_head"]["kernel"] == 0).all() and kept == ["vqa_head/kernel"]
  assert "mlm_head" not in merged and len(loaded) == 4


def test_merge_pretrained_rejects_a_backbone_of_another_size():
  with pytest.raises(ckpt.CheckpointMismatchError, match="(?s)backbone.*encoder/bert/dense/kernel"):
    ckpt.merge_pretrained(_tree(4), _tree(8), source="P")


def test_resolve_checkpoint_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.resolve_checkpoint_dir(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    ckpt.resolve_checkpoint_dir(tmp_path)
  (tmp_path / "checkpoints" / "20" / "params").mkdir(parents=True)
  (tmp_path / "checkpoints" / "100" / "params").mkdir(parents=True)
  assert ckpt.resolve_checkpoint_dir(tmp_path) == (tmp_path / "checkpoints", 100)
  assert ckpt.resolve_checkpoint_dir(tmp_path / "checkpoints" / "20") == (tmp_path / "checkpoints", 20)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_refuses_inf_and_nan(bad):
  """The check before every save and after every restore: inf is as bad as NaN (an `~isnan` check lets a
  diverged run save and resume), integer leaves are not looked at, and the bad leaf is named."""
  good = {"params": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}, "step": np.int32(7)}
  assert bool(ckpt._all_finite(good)) and ckpt.nonfinite_leaves(good) == []
  w = good["params"]["w"].copy()
  w[1, 2] = bad
  tree = {**good, "params": {**good["params"], "w": w}}
  assert not bool(ckpt._all_finite(tree))
  assert ckpt.nonfinite_leaves(tree) == ["params/w"]
