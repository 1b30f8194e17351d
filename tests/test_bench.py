"""Smoke test of `python -m bench.train_step` and `bench.inference`: the demo workload, one step, JAX and
PyTorch in this process. Besides "it runs", the two frameworks must start from the same weights: the first
training losses agree up to pixel-sampling noise, and eval-mode ITM scores agree to float32 precision."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from bench import inference, residuals, train_step  # noqa: E402
from tests import train_helpers as th  # noqa: E402


def test_inference_bench_refuses_cudnn_attention_without_gpu_and_bf16(capsys):
  with pytest.raises(SystemExit):
    inference.parse_args(["--attention", "cudnn", "--set", "model.dtype=float32"])
  assert "--attention cudnn needs a CUDA GPU and model.dtype bfloat16" in capsys.readouterr().err


def test_train_step_bench_refuses_an_unknown_config_key_in_one_line(capsys):
  with pytest.raises(SystemExit):
    train_step.parse_args(["--workload", "demo", "--set", "model.no_such_key=1"])
  assert "override model.no_such_key: no such config field" in capsys.readouterr().err


@pytest.mark.slow
def test_residuals_bench_attributes_what_the_backward_keeps(tmp_path, capsys):
  """The demo step in bf16 with a trained CNN on frozen batch norm (the paper configs'): the parts add up, the
  CNN's activations are kept in bf16 (no float32 copies), and remat leaves the transformer only its layer
  inputs while the CNN is untouched."""
  tables = {}
  for remat in ("false", "true"):
    out = tmp_path / f"{remat}.json"
    overrides = ["model.dtype=bfloat16", "model.cnn.frozen=false", "model.cnn.norm=frozen_bn", f"model.remat={remat}"]
    residuals.main(
        ["--workload", "demo", "--batch", "2", *(a for o in overrides for a in ("--set", o)), "--json", str(out)]
    )
    tables[remat] = json.loads(out.read_text())["table"]
  off, on = tables["false"], tables["true"]
  for column in ("total", "bfloat16", "float32", "bool", residuals.BROADCAST):
    assert sum(off[p].get(column, 0) for p in off if p != "total") == off["total"].get(column, 0)
  assert off["CNN"]["total"] > off["transformer"]["total"] > 0
  assert off["CNN"].get("float32", 0) == 0 and off["CNN"]["bfloat16"] > 0
  assert on["CNN"] == off["CNN"]
  assert 0 < on["transformer"]["total"] < 0.2 * off["transformer"]["total"]
  printed = capsys.readouterr().out
  assert "| CNN |" in printed and "encoder.cnn_features/cnn" in printed


def _in_process_then_two_cpu_devices(tmp_path, module, flags, in_process=()):
  """`module` run in this process (one device; JAX and PyTorch), then JAX alone as `python -m` in a fresh
  process, which splits the CPU into the demo config's 2 devices (JAX's device count is fixed when it starts)
  -> (the in-process results by framework, the two-device JAX result, the second run's stdout)."""
  one, two = tmp_path / "one.json", tmp_path / "two.json"
  module.main(flags + ["--frameworks", "jax,torch", "--in-process", "--json", str(one), *in_process])
  done = subprocess.run(
      [sys.executable, "-m", module.__name__, *flags, "--frameworks", "jax", "--json", str(two)],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=th.REPO,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  first = {r["framework"]: r for r in json.loads(one.read_text())["results"]}
  assert set(first) == {"jax", "torch"} and not any("error" in r for r in first.values()), first
  return first, json.loads(two.read_text())["results"][0], done.stdout


@pytest.mark.slow
def test_train_step_bench_demo_jax_torch_and_two_cpu_devices(tmp_path):
  """The demo step in JAX and PyTorch (the same first loss within 10%), then JAX with the demo config's
  cpu_devices=2, which splits the batch over a data-parallel mesh: its first loss is the one-device loss."""
  first, two, out = _in_process_then_two_cpu_devices(
      tmp_path, train_step, ["--workload", "demo", "--batch", "4", "--steps", "1", "--warmup", "0"]
  )
  jax_loss, torch_loss = first["jax"]["first_loss"], first["torch"]["first_loss"]
  assert abs(jax_loss - torch_loss) < 0.1 * jax_loss, (jax_loss, torch_loss)
  assert first["torch"]["flops_torch"] > 0 and first["jax"]["median_ms"] > 0
  assert all(r["cpu_user_ms"] > 0 and r["minflt"] >= 0 for r in first.values())
  assert "JAX mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in out
  assert abs(jax_loss - two["first_loss"]) < 1e-5, (jax_loss, two["first_loss"])


@pytest.mark.slow
def test_inference_bench_demo_jax_torch_and_two_cpu_devices(tmp_path, capsys):
  """Pair scores of JAX and PyTorch (within 1e-4) and, with --profile, a trace and a table of XLA ops naming
  the model's layers; then JAX with cpu_devices=2 over a data axis, which scores as one device does."""
  first, two, out = _in_process_then_two_cpu_devices(
      tmp_path,
      inference,
      [
          "--workload",
          "demo",
          "--latency-iters",
          "1",
          "--pairs-steps",
          "1",
          "--warmup",
          "0",
          "--pairs-batch",
          "16",
          "--cache-images",
          "4",
          "--encode-batch",
          "2",
      ],
      in_process=("--profile", str(tmp_path / "prof")),
  )
  assert len(first["jax"]["scores"]) == 16
  assert max(abs(a - b) for a, b in zip(first["jax"]["scores"], first["torch"]["scores"])) < 1e-4
  printed = capsys.readouterr().out
  assert "XLA ops, ms per call" in printed and "bert.encode/encoder/layer_0" in printed
  assert list((tmp_path / "prof").rglob("*.trace.json.gz"))
  assert "JAX mesh {'data': 2, 'fsdp': 1, 'tensor': 1} for encoding and pair scoring" in out
  assert len(two["scores"]) == 16
  assert max(abs(a - b) for a, b in zip(first["jax"]["scores"], two["scores"])) < 1e-6
