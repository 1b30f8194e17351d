"""Compiling the trainer's step for a TPU slice that is not attached (pixelbert_jax/aot.py), with libtpu.

These compile a small model for a 2x2 v5e slice (v5litepod-4: 4 devices of 16 GiB) on the CPU. They fail if
the step stops compiling for TPU, if the logical sharding rules stop applying (parameters replicated where
FSDP and tensor parallelism should shard them), or if a batch far too large is not reported in one line.
CI installs libtpu (`.[tpu]`); elsewhere the tests are skipped unless CI is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from pixelbert_jax import aot, aot_screen, tpu_slices
from tests import train_helpers as th

if importlib.util.find_spec("libtpu") is None:
  if os.environ.get("CI"):
    raise RuntimeError("CI must install libtpu (pip install '.[tpu]'): tests/test_aot.py needs it")
  pytest.skip("libtpu is not installed (pip install '.[tpu]')", allow_module_level=True)

SLICE = "v5litepod-4"


def test_slice_names_map_to_topologies():
  expected = {
      "v4-8": ("v4:2x2x1", 4),
      "v4-32": ("v4:2x2x4", 16),
      "v4-128": ("v4:4x4x4", 64),
      "v5p-8": ("v5p:2x2x1", 4),
      "v5p-128": ("v5p:4x4x4", 64),
      "v5litepod-16": ("v5e:4x4", 16),
      "v5litepod-64": ("v5e:8x8", 64),
      "v6e-16": ("v6e:4x4", 16),
      "v6e-8": ("v6e:2x4", 8),
  }
  for name, (topology, chips) in expected.items():
    assert tpu_slices.parse_slice(name)[1:] == (topology, chips), name
  for bad in ("v4-6", "v3-8", "v5p-4", "tpu"):
    with pytest.raises(tpu_slices.PlanError, match="--topology"):
      tpu_slices.parse_slice(bad)


def _tiny(mesh_shape, batch_size=16):
  """The demo recipe at test size on 64x64 images, with a 128-wide transformer: TPU memory holds arrays in
  tiles of 8 x 128, so narrower layers would be mostly padding, which no sharding reduces. The vocabulary is
  given as the planner's flag gives it."""
  overrides = {
      "model.vocab_size": 512,
      "model.hidden_size": 128,
      "model.intermediate_size": 512,
      "data.buckets": ((64, 64),),
      "batch_size": batch_size,
  }
  config = th.tiny_config("/nonexistent", variant="demo_single", **overrides)
  config.mesh_shape = mesh_shape
  return config


def _devices():
  from jax.experimental import topologies

  tpu_slices.quiet_libtpu(SLICE)
  chip, topology, _ = tpu_slices.parse_slice(SLICE)
  return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def _state_bytes_per_device(mesh_shape) -> tuple[aot.Attempt, float]:
  """A compile of 4 examples per device, and the argument bytes per device less the batch's."""
  from pixelbert_jax import partitioning

  config = _tiny(mesh_shape)
  mesh = partitioning.make_mesh(config.mesh_shape, _devices())
  attempt = aot.compile_once(config, mesh, 4, 1)
  assert attempt.fits, attempt.refusal
  batch_gib = aot_screen.batch_input_bytes(config, mesh, 4 * partitioning.data_parallel_size(mesh)) / aot.GIB
  return attempt, attempt.memory["arguments"] - batch_gib


def test_fsdp_and_tensor_axes_shard_the_state():
  """The train state (parameters and Adam's two moments) per device: with data parallelism all of it on
  every device; with fsdp 2 x tensor 2 most of it in halves or quarters. The rules shard 71% of this
  model's state bytes: matrices with an `embed` axis (fsdp) in halves, those that also have an `mlp`, `kv`
  or `vocab` axis (tensor) in quarters, the CNN's `conv_out` in halves; by the rules 29% of the replicated
  bytes stay per device (XLA measured 38% with its tile padding). Half is the bound: without the FSDP rule
  only the tensor-parallel matrices would shrink."""
  replicated, data_only = _state_bytes_per_device((4, 1, 1))
  sharded, fsdp_tensor = _state_bytes_per_device((1, 2, 2))
  assert fsdp_tensor < 0.5 * data_only, (fsdp_tensor, data_only)
  for attempt in (replicated, sharded):
    m = attempt.memory
    assert m["total"] == pytest.approx(m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"])
    # (temporaries may be 0: a program this small keeps its scratch space in the core's own memory)
    assert m["arguments"] > 0 and m["code"] > 0 and attempt.flops > 0
    # the donated state comes back in its own buffers: outputs beyond it are the metrics (a few scalars)
    assert m["outputs"] - m["aliased"] < 1e-3


def test_plan_report_and_an_absurd_batch(capsys):
  """The planner's report for a batch that fits as written, then one line for a batch that cannot fit."""
  config = _tiny((2, 2, 1), batch_size=16)
  tpu_slices.quiet_libtpu(SLICE)
  out = aot.plan(config, SLICE, find_max=False, utilization=0.2, train_examples=1000)
  text = capsys.readouterr().out
  assert out["fits"] and out["fits_as_written"] and out["accum"] == 1, out
  assert "memory per device (XLA, measured): arguments" in text and "of 15.75 GiB" in text, text
  assert "verdict: batch 16 fits v5litepod-4 as written" in text, text
  assert out["steps"] == config.total_steps and out["est_hours"] > 0, out


def test_the_usable_hbm_table_is_libtpus():
  """--screen caps libtpu's HBM, so it judges a fit against `Chip.usable_gib`: the installed libtpu, uncapped
  (this process never caps it; the planner does so only in its own process), must report the same."""
  from jax.experimental import topologies

  tpu_slices.quiet_libtpu(SLICE)
  for name in ("v4-8", "v5p-8", "v5litepod-4", "v6e-4"):
    chip, topology, _ = tpu_slices.parse_slice(name)
    kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices
    # libtpu prints the limit to 2 decimals of a GiB
    assert tpu_slices.usable_hbm(devices) / aot.GIB == pytest.approx(chip.usable_gib, abs=0.005), name


def test_temporaries_are_read_off_the_refusal():
  line = "RESOURCE_EXHAUSTED: ... the total memory required for HLO temporaries (20.73G) exceeds available HBM (1.00G)."
  assert aot_screen.temporaries_bytes(line) == pytest.approx(20.73 * aot.GIB)
  assert aot_screen.temporaries_bytes(line.replace("20.73G", "512.5M")) == pytest.approx(512.5 * (1 << 20))
  assert aot_screen.temporaries_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem.") is None


def _plan_cli(tmp_path, name, *flags, batch_size=64) -> tuple[subprocess.CompletedProcess, dict]:
  """The planner's command on the demo config for SLICE: its output and its JSON."""
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "pixelbert_jax.aot",
          "--config=configs/pretrain.py:demo_single",
          f"--topology={SLICE}",
          "--vocab_size=64",
          f"--config.batch_size={batch_size}",
          f"--json_out={tmp_path / name}",
          *flags,
      ],
      cwd=th.REPO,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result, json.loads((tmp_path / name).read_text())


def test_cli_says_in_one_line_that_an_absurd_batch_does_not_fit(tmp_path):
  """a million images of 192x192 (a quarter million per device): refused by the compiler, and no micro-batching
  can help (the inputs alone exceed the device), so the search stops after one compile."""
  result, _ = _plan_cli(tmp_path, "plan.json", batch_size=1 << 20)
  verdicts = [line for line in result.stdout.splitlines() if line.startswith("verdict:")]
  assert verdicts == [f"verdict: batch {1 << 20} does NOT fit {SLICE}"], result.stdout
  assert result.stdout.count("does not fit") == 1, result.stdout  # one compile, then the inputs' bound


@pytest.mark.slow
def test_screen_against_a_full_compile(tmp_path):
  """The demo step (16 per device) compiled fully and screened under a 4 MiB cap (so XLA refuses it after
  its buffer assignment): the screen read the temporaries off the refusal, counted the arguments as XLA
  does but for tile padding, counted the FLOPs as the compiled program does but for XLA's rewrites, and
  needs at least what the full compile measured (screening errs towards 'does not fit')."""
  _, full = _plan_cli(tmp_path, "full.json")
  _, screened = _plan_cli(tmp_path, "screened.json", "--screen", "--screen_cap_mib=4")
  f, s = full["memory_gib"], screened["memory_gib"]
  assert screened["screened"] and not full["screened"] and screened["tried"][0]["screened"]
  assert s["temporaries"] > 4 / 1024, s  # over the cap: judged from the refusal, not from a full compile
  # TPU layouts pad the minor two dimensions to tiles (8 x 128 for 32-bit): never smaller, measured +10% here
  assert 0.8 * f["arguments"] <= s["arguments"] <= f["arguments"], (s, f)
  # XLA's rewrites (fusions, algebraic simplification) change a few percent of the counted FLOPs
  assert screened["flops_per_device"] == pytest.approx(full["flops_per_device"], rel=0.1)
  assert s["total"] >= f["total"], (s, f)
