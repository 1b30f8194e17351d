"""The conversion CLI end to end: train -> to-torch -> PyTorch ITM scores; from-torch -> a training step;
and the one-line errors for bad inputs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import train
from pixelbert_jax.convert.__main__ import main
from pixelbert_jax.convert.from_torch import load_config
from pixelbert_jax.convert.model_mapping import hf_bert_config
from pixelbert_jax.convert.torch_model import load_pixelbert
from pixelbert_jax.data import pipeline
from pixelbert_jax.models.build import build_model
from tests import train_helpers as th

# A resnet50-shaped CNN under a tiny BERT: what `from-torch` is for, at test size.
R50_TINY = {
    "model.cnn.stage_sizes": [3, 4, 6, 3],
    "model.cnn.stem_width": 64,
    "model.cnn.base_planes": 64,
    "model.cnn.norm": "frozen_bn",
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.intermediate_size": 64,
}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  config = th.tiny_config(data_dir, total_steps=3)
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "pixelbert_jax.convert", *map(str, args)],
      cwd=th.REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.mark.slow
def test_trained_checkpoint_to_torch_gives_the_same_itm_scores(trained, tmp_path):
  workdir, config = trained
  out = tmp_path / "out"
  proc = _cli("to-torch", "--checkpoint", workdir, "--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "agree" in proc.stdout and "itm_logits" in proc.stdout
  assert {p.name for p in out.iterdir()} >= {
      "cnn.safetensors",
      "text_encoder",
      "pixelbert.safetensors",
      "pixelbert_config.json",
      "README.md",
  }
  # Real images and captions from the eval split, through both models.
  it = pipeline.make_iterator(
      config.data, "pretrain", "val", batch_size=8, seed=0, process_index=0, process_count=1, train=False
  )
  batch = next(iter(it))
  inputs = {k: batch[k] for k in ("image", "image_mask", "input_ids", "text_mask")}
  variables, _, step = ckpt_lib.load_model_variables(workdir)
  assert step == 3
  with jax.default_matmul_precision("highest"):
    flax_itm = np.asarray(
        build_model(config.model, "pretrain").apply({k: v for k, v in variables.items() if v}, **inputs, train=False)[
            "itm_logits"
        ]
    )
  model = load_pixelbert(out)
  with torch.no_grad():
    torch_itm = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})["itm_logits"].numpy()
  diff = np.abs(flax_itm - torch_itm).max()
  print(f"ITM logits on {len(flax_itm)} val pairs: max|flax - torch| = {diff:.2e}")
  assert diff <= 1e-4
  assert np.array_equal(flax_itm.argmax(-1), torch_itm.argmax(-1))


@pytest.mark.slow
def test_from_torch_then_one_training_step(data_dir, tmp_path):
  cnn_path = tmp_path / "resnet50.pth"
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet50().state_dict(), cnn_path)
  vocab = pipeline.vocab_size(th.load_config().data)
  _tiny_bert(tmp_path / "bert", vocab=vocab, model_class=transformers.BertForPreTraining)
  init_dir = tmp_path / "init"
  sets = [f"--set={k}={v}" for k, v in R50_TINY.items()]
  proc = _cli(
      "from-torch",
      "--cnn",
      cnn_path,
      "--bert",
      tmp_path / "bert",
      "--out",
      init_dir,
      "--config",
      "configs/pretrain.py:demo_single",
      *sets,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "cnn C5" in proc.stdout and "bert hidden states" in proc.stdout
  variables, meta, step = ckpt_lib.load_model_variables(init_dir)
  assert step == 0 and meta["task"] == "pretrain" and meta["model"]["cnn"]["stage_sizes"] == [3, 4, 6, 3]
  w = torch.load(cnn_path, weights_only=True)["layer3.2.conv2.weight"].numpy()
  np.testing.assert_array_equal(
      variables["params"]["encoder"]["cnn"]["layer3"]["2"]["conv2"]["kernel"], w.transpose(2, 3, 1, 0)
  )

  config = th.tiny_config(data_dir, total_steps=1, **R50_TINY)
  config.init_from_torch = str(init_dir)
  config.model.cnn.frozen = True  # keep the one step cheap: the imported CNN must still come through
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  after, _, _ = ckpt_lib.load_model_variables(workdir)
  np.testing.assert_array_equal(
      after["batch_stats"]["encoder"]["cnn"]["bn1"]["mean"], variables["batch_stats"]["encoder"]["cnn"]["bn1"]["mean"]
  )
  assert any(r.get("train/loss") is not None and np.isfinite(r["train/loss"]) for r in th.metrics(workdir))


def _error_line(capsys, argv):
  capsys.readouterr()  # drop what the test's own fixture writing printed
  code = main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 1, err
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def test_missing_checkpoint_dir(capsys, tmp_path):
  err = _error_line(capsys, ["to-torch", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
  assert str(tmp_path / "nope") in err


@pytest.mark.slow
def test_checkpoint_of_another_config(trained, capsys, tmp_path):
  workdir, config = trained
  variables, meta, _ = ckpt_lib.load_model_variables(workdir)
  meta["model"]["hidden_size"] = 48  # parameters of one model, meta of another
  ckpt_lib.save_model_variables(tmp_path / "other", variables, meta)
  err = _error_line(capsys, ["to-torch", "--checkpoint", str(tmp_path / "other"), "--out", str(tmp_path / "o")])
  assert str(tmp_path / "other") in err and "does not match" in err and "expects" in err


def _tiny_bert(path, vocab=30, model_class=transformers.BertModel):
  """A random HF BERT of R50_TINY's size: the transformer those configs describe (hf_bert_config)."""
  cfg = load_config(
      str(th.REPO / "configs" / "pretrain.py") + ":demo_single", [f"{k}={v}" for k, v in R50_TINY.items()]
  )
  cfg.model.vocab_size = vocab
  model_class(hf_bert_config(cfg.model)).save_pretrained(path)


def test_truncated_safetensors(capsys, tmp_path):
  from safetensors.torch import save_file

  path = tmp_path / "cnn.safetensors"
  save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 100])
  _tiny_bert(tmp_path / "bert")
  err = _error_line(
      capsys,
      [
          "from-torch",
          "--cnn",
          str(path),
          "--bert",
          str(tmp_path / "bert"),
          "--out",
          str(tmp_path / "o"),
          "--config",
          "configs/pretrain.py:demo_single",
      ],
  )
  assert str(path) in err and "truncated" in err


def test_pickle_that_is_not_a_plain_state_dict(capsys, tmp_path):
  nested = tmp_path / "ckpt.pth"
  torch.save({"model": {"conv1.weight": torch.zeros(1)}, "epoch": 3}, nested)
  err = _error_line(
      capsys,
      [
          "from-torch",
          "--cnn",
          str(nested),
          "--bert",
          str(tmp_path),
          "--out",
          str(tmp_path / "o"),
          "--config",
          "configs/pretrain.py:demo_single",
      ],
  )
  assert str(nested) in err and "'model'" in err and "not a plain state dict" in err
  module = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 2), module)  # a pickled module: weights_only refuses it
  err = _error_line(
      capsys,
      [
          "from-torch",
          "--cnn",
          str(module),
          "--bert",
          str(tmp_path),
          "--out",
          str(tmp_path / "o"),
          "--config",
          "configs/pretrain.py:demo_single",
      ],
  )
  assert str(module) in err and "weights_only=True" in err


def test_missing_bert_dir_and_wrong_sizes(capsys, tmp_path):
  cnn = tmp_path / "cnn.pth"
  torch.save({}, cnn)
  argv = [
      "from-torch",
      "--cnn",
      str(cnn),
      "--out",
      str(tmp_path / "o"),
      "--config",
      "configs/pretrain.py:demo_single",
      "--set",
      "model.cnn.norm=frozen_bn",
  ]
  err = _error_line(capsys, argv + ["--bert", str(tmp_path / "nobert")])
  assert "missing conv1.weight" in err  # the CNN is read and refused first, naming the tensor
  torch.save(torchvision.models.resnet50().state_dict(), cnn)
  err = _error_line(
      capsys, argv + ["--bert", str(tmp_path / "nobert")] + [f"--set={k}={v}" for k, v in R50_TINY.items()]
  )
  assert str(tmp_path / "nobert") in err and "does not exist" in err
  _tiny_bert(tmp_path / "bert", vocab=30)
  err = _error_line(capsys, argv + ["--bert", str(tmp_path / "bert")] + [f"--set={k}={v}" for k, v in R50_TINY.items()])
  assert "vocab_size=30" in err and "config.json" in err


@pytest.mark.slow
def test_no_verify_says_so_loudly(trained, capsys, tmp_path):
  workdir, _ = trained
  assert main(["to-torch", "--checkpoint", str(workdir), "--out", str(tmp_path / "o"), "--no-verify"]) == 0
  assert "NOT compared" in capsys.readouterr().err
  assert "NOT VERIFIED" in (tmp_path / "o" / "README.md").read_text()


@pytest.fixture
def home(tmp_path, monkeypatch):
  """HOME and the working directory in tmp_path: `--x=~/...` reaches the CLI unexpanded, as from bash."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "home").mkdir()
  monkeypatch.chdir(tmp_path)
  return tmp_path / "home"


@pytest.mark.slow
def test_to_torch_tilde_checkpoint_relative_out(trained, home, tmp_path):
  workdir, _ = trained
  (home / "run").symlink_to(workdir)
  assert main(["to-torch", "--checkpoint=~/run", "--out=converted", "--no-verify"]) == 0
  info = json.loads((tmp_path / "converted" / "pixelbert_config.json").read_text())
  assert info["source"] == str(home / "run") and info["step"] == 3
  assert (tmp_path / "converted" / "cnn.safetensors").is_file() and not (tmp_path / "~").exists()


@pytest.mark.slow
def test_from_torch_tilde_inputs_relative_out(home, tmp_path):
  # torchvision's widths (stem and planes 64) with one bottleneck per stage: the R50 layout, cheaply.
  shape = {
      "model.cnn.stage_sizes": [1, 1, 1, 1],
      "model.cnn.stem_width": 64,
      "model.cnn.base_planes": 64,
      "model.cnn.norm": "frozen_bn",
      "model.hidden_size": 32,
      "model.num_layers": 2,
      "model.num_heads": 2,
      "model.intermediate_size": 64,
  }
  torch.manual_seed(0)
  tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
  torch.save(tv.state_dict(), home / "cnn.pth")
  (home / "configs").symlink_to(th.REPO / "configs")
  _tiny_bert(tmp_path / "bert", vocab=pipeline.vocab_size(th.load_config().data))
  argv = [
      "from-torch",
      "--cnn=~/cnn.pth",
      "--bert=bert",
      "--out=init",
      "--config=~/configs/pretrain.py:demo_single",
      "--no-verify",
  ] + [f"--set={k}={v}" for k, v in shape.items()]
  assert main(argv) == 0
  variables, meta, step = ckpt_lib.load_model_variables(tmp_path / "init")
  assert step == 0 and meta["source"]["cnn"] == str(home / "cnn.pth")
  assert meta["source"]["bert"] == str(tmp_path / "bert")
  np.testing.assert_array_equal(
      variables["params"]["encoder"]["cnn"]["layer4"]["0"]["conv2"]["kernel"],
      tv.state_dict()["layer4.0.conv2.weight"].numpy().transpose(2, 3, 1, 0),
  )


def test_to_torch_into_a_non_empty_folder_refuses_unless_overwrite(capsys, tmp_path):
  """An export into a folder that holds anything is refused before the checkpoint is read (it was written
  over without a word); --overwrite lets it through (here to the missing checkpoint's error)."""
  out = tmp_path / "export"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  argv = ["to-torch", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]
  err = _error_line(capsys, argv)
  assert err == (
      f"error: --out {out} is not empty (1 entries, e.g. notes.txt): choose a new folder, or pass --overwrite to "
      "write this export's files over it"
  )
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
  err = _error_line(capsys, argv + ["--overwrite"])
  assert str(tmp_path / "nope") in err and "not empty" not in err
  (tmp_path / "file").write_text("x")
  err = _error_line(capsys, ["to-torch", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "file")])
  assert err == f"error: --out {tmp_path / 'file'} is a file, not a folder"
