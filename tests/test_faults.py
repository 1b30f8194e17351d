"""Fault injection: what training and its tools do under NaN, corrupt checkpoints, concurrent runs, a full
disk, Ctrl-C and bad input. Each case is one row of the reliability table in docs/training.md.

Runs are the tiny pre-training model of train_helpers.py: in process where the Python API is what is tested,
as subprocesses where the command line is (one-line errors, exit codes, signals).
"""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import predict, train
from tests import train_helpers as th


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints 2, 4, 6): what every healed run must reproduce bit for bit."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _copy(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    return workdir


# -- checkpoints -------------------------------------------------------------------------------------------------

def test_nan_at_a_saved_step_is_never_saved_and_a_rerun_resumes_from_the_last_finite_step(data_dir, reference,
                                                                                          tmp_path, caplog):
    """The issue's run: a checkpoint every step, a log line every 10, a learning rate that blows up. Step 3's
    update makes the parameters infinite while its loss is still finite, and step 4's loss was checked only at
    step 5's log: the old loop saved steps 3 and 4, and keep_checkpoints=2 rotated the finite ones out."""
    every_step = {"checkpoint_every_steps": 1, "log_every_steps": 10, "keep_checkpoints": 2}
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=2, **every_step), str(tmp_path))
    blow_up = th.tiny_config(data_dir, total_steps=6, **every_step, **{"optim.transformer.lr": float("inf")})
    with pytest.raises(train.NonFiniteLossError, match=r"Step 3: \d+ parameter arrays hold NaN/Inf.*not saving it"
                                                       r".*checkpoints/2, holds finite parameters"):
        train.train_and_evaluate(blow_up, str(tmp_path))
    assert _steps(tmp_path) == [1, 2]
    for step in _steps(tmp_path):
        ckpt_lib.load_model_variables(tmp_path, step)  # raises on a step with NaN/Inf parameters
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(th.tiny_config(data_dir, total_steps=4, **every_step), str(tmp_path))
    assert "at step 2" in caplog.text
    # The same learning rate from step 2 on is the reference run's step 4 exactly.
    reference_step_4 = ckpt_lib.load_model_variables(reference, 4)[0]
    th.assert_same_params(th.final_params(tmp_path), {"step": 4, **_flat(reference_step_4)})


def _flat(variables):
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


def test_keep_checkpoints_0_is_refused_and_deletes_nothing(data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    with pytest.raises(ValueError, match=r"config.keep_checkpoints=0 must be >= 1"):
        train.train_and_evaluate(th.tiny_config(data_dir, total_steps=8, keep_checkpoints=0), str(workdir))
    assert _steps(workdir) == [2, 4, 6]


def _truncate(step_dir):
    for f in (step_dir / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_truncated_newest_step_of_a_finished_run_is_healed_by_a_rerun(data_dir, reference, tmp_path, image,
                                                                      capsys, caplog):
    """Before: predict crashed on the truncated step 6, and the rerun fell back to 4, retrained 5 and 6, then
    stopped with 'Checkpoint for step 6 already exists', on every rerun."""
    workdir = _copy(reference, tmp_path)
    _truncate(workdir / "checkpoints" / "6")
    expected = predict.Predictor(str(reference)).score(str(image), "a red star")

    def cli_score():
        capsys.readouterr()
        rc = predict.main(["--checkpoint", str(workdir), "--image", str(image), "--caption", "a red star"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        import json
        return json.loads(out.out)

    with caplog.at_level(logging.WARNING):
        cli_score()  # the newest good step, 4, named in the log
    assert "step 6 is unreadable" in caplog.text and "using step 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
    moved = [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("6.corrupt-")]
    assert len(moved) == 1 and str(moved[0]) in caplog.text
    assert _steps(workdir) == [2, 4, 6]
    th.assert_same_params(th.final_params(workdir), th.final_params(reference))
    assert cli_score() == expected
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))  # and again: nothing to do


def test_unfinished_checkpoint_folders_are_removed_at_start(data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    leftover = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1764500000"
    (leftover / "params").mkdir(parents=True)
    (leftover / "params" / "blob").write_bytes(b"\0" * 1000)
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
    assert not leftover.exists() and _steps(workdir) == [2, 4, 6]
