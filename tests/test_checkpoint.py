"""Checkpoint shape checks and partial restore (the pieces resume and fine-tuning rely on), and the readers
beside a live run whose rotation deletes the step being read."""

import json
import logging
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from pixelbert_jax import checkpoint as ckpt
from pixelbert_jax import checkpoint_files


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
  assert bool(checkpoint_files._all_finite(good)) and ckpt.nonfinite_leaves(good) == []
  w = good["params"]["w"].copy()
  w[1, 2] = bad
  tree = {**good, "params": {**good["params"], "w": w}}
  assert not bool(checkpoint_files._all_finite(tree))
  assert ckpt.nonfinite_leaves(tree) == ["params/w"]


# -- a step deleted while it is read (a live run's rotation) -------------------------------------------------------


def _step(checkpoints, step: int, value: float, tmp_path):
  """A model-only checkpoint step `step` holding w = `value`, written elsewhere and moved into `checkpoints`."""
  scratch = tmp_path / f"scratch{step}"
  ckpt.save_model_variables(scratch, {"params": {"w": np.full(3, value, np.float32)}}, {"task": "pretrain"})
  return shutil.move(str(scratch / "0"), str(checkpoints / str(step)))


@pytest.fixture
def live_run(tmp_path, monkeypatch):
  """A workdir whose only step, 4, a running job (its run.lock) rotates out while it is read: Orbax's restore
  finds the folder gone, as `evaluate` did beside a run with keep_checkpoints=1. `rotations[step]` = the step
  the job saves before deleting `step`; None deletes it without saving another."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "run.lock").write_text(json.dumps({"host": "trainer-0", "pid": 4242, "started": "x"}))
  _step(workdir / "checkpoints", 4, 4.0, tmp_path)
  rotations: dict[int, int | None] = {4: 6}
  real_restore = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    if step in rotations:
      newer = rotations.pop(step)
      if newer is not None:
        _step(workdir / "checkpoints", newer, float(newer), tmp_path)
      shutil.rmtree(workdir / "checkpoints" / str(step))
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  return workdir, rotations


def test_a_step_deleted_while_read_is_retried_with_the_newest_step_left(live_run, caplog):
  workdir, _ = live_run
  with caplog.at_level(logging.WARNING):
    variables, _, step = ckpt.load_model_variables(workdir)
  assert step == 6 and (variables["params"]["w"] == 6.0).all()
  assert (
      f"Checkpoint {workdir / 'checkpoints' / '4'} was deleted while it was read, by a running job "
      f"(pid 4242 on trainer-0, {workdir / 'run.lock'}); retrying with the newest step left" in caplog.text
  )
  assert "corrupt" not in caplog.text


def test_a_step_asked_for_and_deleted_while_read_says_so(live_run):
  workdir, _ = live_run
  with pytest.raises(ckpt.UnreadableCheckpointError, match=r"checkpoints/4 was deleted while it was read, by a "):
    ckpt.load_model_variables(workdir, 4)


def test_a_job_that_deletes_every_step_before_it_is_read_is_named(live_run):
  workdir, rotations = live_run
  rotations.update({6: 8, 8: 10, 10: None})
  with pytest.raises(ckpt.UnreadableCheckpointError) as e:
    ckpt.load_model_variables(workdir)
  message = str(e.value)
  assert "step 4 was deleted while it was read, by a running job; step 6 was" in message, message
  assert "the job (pid 4242 on trainer-0" in message and "deletes steps faster than they are read" in message
  assert "\n" not in message


def test_a_corrupt_step_is_called_corrupt_not_deleted(tmp_path, caplog):
  checkpoints = tmp_path / "run" / "checkpoints"
  checkpoints.mkdir(parents=True)
  _step(checkpoints, 2, 2.0, tmp_path)
  _step(checkpoints, 4, 4.0, tmp_path)
  for f in (checkpoints / "4" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  with caplog.at_level(logging.WARNING):
    _, _, step = ckpt.load_model_variables(tmp_path / "run", deleted_wait_s=0.1)
  assert step == 2
  assert "step 4 is unreadable (corrupt or incomplete: " in caplog.text and "deleted" not in caplog.text
  with pytest.raises(ckpt.UnreadableCheckpointError, match=r"checkpoints/4 is unreadable \(corrupt or incomplete"):
    ckpt.load_model_variables(tmp_path / "run", 4, deleted_wait_s=0.1)
