"""docs/own_data.md, run: its file-format examples build, and every command of its ```bash blocks, then its
```python block, runs in order on tiny generated images, so the guide cannot go stale.

The commands are parsed out of the guide and run from a temporary folder that holds what the guide assumes
the user has (my_captions/ with images, my_vqa/ without, the downloads as tiny stand-ins of the same names)
and a link to the repository's configs/. `python -m pixelbert_jax.main` runs as a subprocess, exactly as
written plus appended `--config.X=Y` flags that only shrink the model, the images and the step counts;
the other `python -m` modules run in this process through their `main(argv)` with the argv as written
(`convert from-torch` gets the same shrinking `--set`s), other commands (`ln`) as subprocesses.
The guide's downloads are described in prose, never run: tests never download.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests import own_data_helpers as od
from tests import train_helpers as th

GUIDE = th.REPO / "docs" / "own_data.md"
_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)
# `python -m X` modules run in-process, by the module holding their main(argv).
_IN_PROCESS = {
    "pixelbert_jax.data.prepare": "pixelbert_jax.data.prepare",
    "pixelbert_jax.evaluate": "pixelbert_jax.evaluate",
    "pixelbert_jax.predict": "pixelbert_jax.predict",
    "pixelbert_jax.convert": "pixelbert_jax.convert.__main__",
}
# Only shrink: the model (the r50 depth stays: list fields cannot be overridden from the command line),
# the images, the batches and the step counts.
MODEL_SHRINK = {
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.intermediate_size": 64,
    "model.cnn.stem_width": 8,
    "model.cnn.base_planes": 4,
    "model.dtype": "float32",
    "model.remat": False,
}
RUN_SHRINK = {
    "model.pixel_sampling.num_pixels": 4,
    "data.image_short_side": 64,
    "data.image_long_side": 64,
    "data.buckets": "((64, 64),)",
    "batch_size": 4,
    "eval_batch_size": 4,
    "total_steps": 2,
    "log_every_steps": 1,
    "checkpoint_every_steps": 2,
    "optim.warmup_steps": 1,
    "cpu_devices": 1,
}
TASK_SHRINK = {
    "configs/retrieval.py": {
        "data.retrieval_negatives": 2,
        "loss.hard_negatives": 1,
        "retrieval_eval.pair_batch_size": 16,
    }
}
VAL_COUNTS = [1, 3, 1, 10, 3, 10]  # answers per val question: 2 scored by the official metric, 4 by ours


def blocks(lang: str) -> list[tuple[str, str]]:
  """(info after the language, body) of each fenced block of the guide in `lang`."""
  return [(info.strip(), body) for found, info, body in _FENCE.findall(GUIDE.read_text()) if found == lang]


def commands() -> list[str]:
  """Every command of the guide's ```bash blocks, in order, continuation lines joined."""
  out = []
  for _, body in blocks("bash"):
    for line in body.replace("\\\n", " ").splitlines():
      if line.strip() and not line.lstrip().startswith("#"):
        out.append(" ".join(line.split()))
  return out


def test_the_guide_covers_every_step():
  """The issue's list: prepare, pre-training, fine-tuning from a pre-trained and a converted checkpoint,
  evaluation, predict, export; a guide edit that drops one fails here, before the slow test runs."""
  cmds = commands()
  for needed in (
      "pixelbert_jax.convert from-torch",
      "pixelbert_jax.data.prepare --dataset jsonl --builder_config " "captions",
      "pixelbert_jax.data.prepare --dataset jsonl --builder_config vqa",
      "configs/pretrain.py",
      "configs/retrieval.py",
      "configs/vqa.py",
      "--config.init_from=runs/pre",
      "--config.init_from_torch=runs/init",
      "pixelbert_jax.evaluate",
      "pixelbert_jax.predict",
      "pixelbert_jax.convert to-torch",
  ):
    assert any(needed in c for c in cmds), needed
  assert "vocab_path" in GUIDE.read_text() and len(blocks("python")) == 1


def test_the_format_examples_build(tmp_path, capsys):
  """The guide's example lines, written to the files they name, with their images generated."""
  from pixelbert_jax.data import prepare as prepare_lib

  examples = blocks("json")
  assert {name for name, _ in examples} == {"my_captions/train.jsonl", "my_vqa/train.jsonl"}
  for name, body in examples:
    folder = tmp_path / os.path.dirname(name)
    (folder / "train.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(body)
    images = sorted({json.loads(line)["image"] for line in body.splitlines()})
    for k, image in enumerate(images):
      od.fx.write_image(str(folder / image), 40, 56, seed=k)
    config = "captions" if "captions" in name else "vqa"
    assert (
        prepare_lib.main(
            [
                "--dataset",
                "jsonl",
                "--builder_config",
                config,
                "--manual_dir",
                str(folder),
                "--data_dir",
                str(tmp_path / "tfds"),
            ]
        )
        == 0
    ), capsys.readouterr().err
  out = capsys.readouterr().out
  assert "jsonl/captions" in out and "train: 2 examples" in out  # two lines of one image merged
  assert "jsonl/vqa" in out and "train: 3 examples" in out


def _stand_ins(root, vocab_size: int) -> None:
  """Tiny files named as the guide's downloads: a BERT folder and a ResNet-50 state dict (r50 depth)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from pixelbert_jax.convert.from_torch import load_config
  from pixelbert_jax.convert.model_mapping import hf_bert_config
  from pixelbert_jax.convert.torch_model import build_resnet

  cfg = load_config(
      str(th.REPO / "configs" / "pretrain.py") + ":r50",
      [f"{k}={v}" for k, v in {**MODEL_SHRINK, "model.vocab_size": vocab_size}.items()],
  )
  torch.manual_seed(0)
  torch.save(build_resnet(cfg.model.cnn).state_dict(), root / "resnet50-0676ba61.pth")
  transformers.BertForPreTraining(hf_bert_config(cfg.model)).save_pretrained(root / "bert-base-uncased")


def _shrink(argv: list[str], vocab_size: int) -> list[str]:
  if argv[2] == "pixelbert_jax.main":
    config = next(a for a in argv if a.startswith("--config=")).split("=", 1)[1].split(":")[0]
    keys = {**MODEL_SHRINK, "model.vocab_size": vocab_size, **RUN_SHRINK, **TASK_SHRINK.get(config, {})}
    return [f"--config.{k}={v}" for k, v in keys.items()]
  if argv[2:4] == ["pixelbert_jax.convert", "from-torch"]:
    return [f"--set={k}={v}" for k, v in {**MODEL_SHRINK, "model.vocab_size": vocab_size}.items()]
  return []


def _run(command: str, root, vocab_size: int) -> tuple[int, str]:
  """Runs one guide command from `root`: (exit status, stdout)."""
  argv = shlex.split(command)
  if argv[0] in ("python", "python3") and argv[1] == "-m" and argv[2] in _IN_PROCESS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      rc = importlib.import_module(_IN_PROCESS[argv[2]]).main(argv[3:] + _shrink(argv, vocab_size))
    return rc, out.getvalue()
  if argv[0] in ("python", "python3"):
    argv = [sys.executable] + argv[1:] + _shrink(argv, vocab_size)
  proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{command}\n{proc.stderr[-4000:]}"
  return proc.returncode, proc.stdout


@pytest.mark.slow
def test_every_command_of_the_guide_runs(tmp_path, monkeypatch):
  root = tmp_path / "home"
  root.mkdir()
  (root / "configs").symlink_to(th.REPO / "configs")  # the guide runs from the repository root
  od.write_captions_folder(str(root / "my_captions"), num_train=8, num_val=6)
  od.write_vqa_folder(
      str(root / "my_vqa"), train_counts=[1, 3] * 4, val_counts=VAL_COUNTS, num_test=2, images=False
  )  # the guide links my_captions/images in
  vocab_size = len(open(od.write_vocab(str(root / "bert-base-uncased"))).read().split("\n")[:-1])
  _stand_ins(root, vocab_size)
  monkeypatch.chdir(root)

  outputs = []
  for command in commands():
    start = time.monotonic()
    rc, out = _run(command, root, vocab_size)
    assert rc == 0, command
    outputs.append((command, out))
    print(f"{time.monotonic() - start:6.1f} s  {command[:100]}")  # shown with -s or on failure
  by = lambda needle: [out for c, out in outputs if needle in c]

  assert "train: 8 examples" in by("--builder_config captions")[0]  # 16 lines, 8 images
  assert (root / "runs" / "init").is_dir()
  pre = th.metrics(root / "runs" / "pre")
  assert any("eval/itm_acc" in r for r in pre) and any("train/loss" in r for r in pre)
  ret = [r for r in th.metrics(root / "runs" / "ret") if "eval/tr_r1" in r]
  assert ret and 0.0 <= ret[-1]["eval/tr_r1"] <= 1.0
  # VQA: the documented keys, the counts behind them, and evaluate repeating the training's evaluation.
  trained = [r for r in th.metrics(root / "runs" / "vqa") if "eval/vqa_acc_all" in r][-1]
  assert (trained["eval/vqa_num_official"], trained["eval/vqa_num_custom"]) == (2, 4)
  for key in ("eval/vqa_acc", "eval/vqa_acc_custom", "eval/vqa_acc_all"):
    assert 0.0 <= trained[key] <= 1.0, key
  val_eval, test_eval = (json.loads(out) for out in by("pixelbert_jax.evaluate"))
  for key in ("eval/vqa_acc", "eval/vqa_acc_custom", "eval/vqa_acc_all", "eval/vqa_num_custom"):
    assert val_eval[key] == pytest.approx(trained[key], abs=1e-6), key
  assert val_eval["step"] == 2 and not any(k.startswith("eval/vqa_acc") for k in test_eval)
  results = json.loads((root / "runs" / "vqa" / "results" / "vqa_test_step2.json").read_text())
  assert sorted(r["question_id"] for r in results) == [1, 2]
  vqa_answers, ranking = (json.loads(out) for out in by("pixelbert_jax.predict"))
  vocab = json.loads((root / "runs" / "vqa" / "answer_vocab.json").read_text())
  assert vqa_answers["answers"] and all(a["answer"] in vocab for a in vqa_answers["answers"])
  assert sorted(r["caption"] for r in ranking["ranking"]) == ["a blue picture", "a red picture"]
  assert (root / "runs" / "vqa_torch" / "pixelbert.safetensors").is_file()

  (code,) = [body for _, body in blocks("python")]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(GUIDE), "exec"), {})
  assert out.getvalue().strip() == f"PixelBert {len(vocab)} answers"
