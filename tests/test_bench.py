"""Smoke test of bench/train_step.py and bench/inference.py: the demo workload, one step, JAX and PyTorch
in this process. Besides "it runs", the two frameworks must start from the same weights: the first
training losses agree up to dropout and pixel-sampling noise, and eval-mode ITM scores agree to float32
precision."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import inference  # noqa: E402
import residuals  # noqa: E402
import train_step  # noqa: E402


@pytest.mark.slow
def test_train_step_bench_demo(tmp_path):
  out = tmp_path / "train.json"
  train_step.main(
      [
          "--workload",
          "demo",
          "--frameworks",
          "jax,torch",
          "--in-process",
          "--batch",
          "2",
          "--steps",
          "1",
          "--warmup",
          "0",
          "--dtype",
          "float32",
          "--json",
          str(out),
      ]
  )
  results = {r["framework"]: r for r in json.loads(out.read_text())["results"]}
  assert set(results) == {"jax", "torch"} and not any("error" in r for r in results.values())
  jax_loss, torch_loss = results["jax"]["first_loss"], results["torch"]["first_loss"]
  assert abs(jax_loss - torch_loss) < 0.1 * jax_loss, (jax_loss, torch_loss)
  assert results["torch"]["flops_torch"] > 0 and results["jax"]["median_ms"] > 0
  assert all(r["cpu_user_ms"] > 0 and r["minflt"] >= 0 for r in results.values())


@pytest.mark.slow
def test_inference_bench_demo(tmp_path, capsys):
  out = tmp_path / "inference.json"
  inference.main(
      [
          "--workload",
          "demo",
          "--frameworks",
          "jax,torch",
          "--in-process",
          "--dtype",
          "float32",
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
          "4",
          "--json",
          str(out),
          "--profile",
          str(tmp_path / "prof"),
      ]
  )
  jax_r, torch_r = json.loads(out.read_text())["results"]
  assert len(jax_r["scores"]) == 16
  assert max(abs(a - b) for a, b in zip(jax_r["scores"], torch_r["scores"])) < 1e-4
  # --profile: a trace on disk and a table of XLA ops that names the model's layers.
  printed = capsys.readouterr().out
  assert "XLA ops, ms per call" in printed and "bert.encode/encoder/layer_0" in printed
  assert list((tmp_path / "prof").rglob("*.trace.json.gz"))


def test_inference_bench_refuses_cudnn_attention_without_gpu_and_bf16(capsys):
  with pytest.raises(SystemExit):
    inference.parse_args(["--attention", "cudnn", "--dtype", "float32"])
  assert "--attention cudnn needs a CUDA GPU and --dtype bfloat16" in capsys.readouterr().err


@pytest.mark.slow
def test_residuals_bench_attributes_what_the_backward_keeps(tmp_path, capsys):
  """The demo step in bf16: the parts add up, the CNN's activations are kept in bf16 (frozen batch norm,
  no float32 copies), and remat leaves the transformer only its layer inputs while the CNN is untouched."""
  tables = {}
  for remat in ("off", "on"):
    out = tmp_path / f"{remat}.json"
    residuals.main(["--workload", "demo", "--batch", "2", "--norm", "frozen_bn", "--remat", remat, "--json", str(out)])
    tables[remat] = json.loads(out.read_text())["table"]
  off, on = tables["off"], tables["on"]
  for column in ("total", "bfloat16", "float32", "bool", residuals.BROADCAST):
    assert sum(off[p].get(column, 0) for p in off if p != "total") == off["total"].get(column, 0)
  assert off["CNN"]["total"] > off["transformer"]["total"] > 0
  assert off["CNN"].get("float32", 0) == 0 and off["CNN"]["bfloat16"] > 0
  assert on["CNN"] == off["CNN"]
  assert 0 < on["transformer"]["total"] < 0.2 * off["transformer"]["total"]
  printed = capsys.readouterr().out
  assert "| CNN |" in printed and "encoder.encode_image/cnn" in printed


def _in_process_then_two_cpu_devices(tmp_path, module, flags):
  """`module` run in this process (one device), then as a fresh process with --jax-cpu-devices 2 (JAX's
  device count is fixed when it starts) -> (the two JAX results, the second run's stdout)."""
  one, two = tmp_path / "one.json", tmp_path / "two.json"
  module.main(flags + ["--in-process", "--json", str(one)])
  done = subprocess.run(
      [sys.executable, module.__file__, *flags, "--jax-cpu-devices", "2", "--json", str(two)],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return [json.loads(f.read_text())["results"][0] for f in (one, two)], done.stdout


@pytest.mark.slow
def test_train_step_bench_on_two_cpu_devices_computes_the_same_step(tmp_path):
  """--jax-cpu-devices 2 (the CPU default, as the demo configs' cpu_devices) splits the batch over a
  data-parallel mesh; its first loss is the one-device loss of the same batch."""
  results, out = _in_process_then_two_cpu_devices(
      tmp_path,
      train_step,
      [
          "--workload",
          "demo",
          "--frameworks",
          "jax",
          "--batch",
          "4",
          "--steps",
          "1",
          "--warmup",
          "0",
          "--dtype",
          "float32",
      ],
  )
  assert "JAX CPU devices (data-parallel, --jax-cpu-devices): 2" in out
  assert abs(results[0]["first_loss"] - results[1]["first_loss"]) < 1e-5, results


@pytest.mark.slow
def test_inference_bench_on_two_cpu_devices_scores_as_one(tmp_path):
  """--jax-cpu-devices 2 splits encoding and pair scoring over a data axis; the scores are those of one
  device."""
  results, out = _in_process_then_two_cpu_devices(
      tmp_path,
      inference,
      [
          "--workload",
          "demo",
          "--frameworks",
          "jax",
          "--dtype",
          "float32",
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
  )
  assert "JAX CPU devices (data-parallel encoding and pair scoring, --jax-cpu-devices): 2" in out
  scores = [r["scores"] for r in results]
  assert len(scores[1]) == 16
  assert max(abs(a - b) for a, b in zip(*scores)) < 1e-6
