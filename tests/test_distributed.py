"""Multi-host initialisation: environment parsing, and real two-process CPU runs through the same
PIXELBERT_* variables the launch scripts export. The real multi-process tests are named
test_multiprocess_* (select or skip them with -k multiprocess); each is bounded by short timeouts."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pixelbert_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each worker builds a global array from process-local rows and sums it with a jitted reduction that
# crosses processes; every process prints what it saw.
WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from pixelbert_jax import distributed
    info = distributed.initialize_from_env(timeout_s=int(sys.argv[1]))
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = np.full((info.local_device_count, 3), info.process_index + 1.0, np.float32)
    local[:, 1] = np.arange(info.local_device_count) + 10.0 * info.process_index
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(lambda a: a.sum(axis=0), out_shardings=NamedSharding(mesh, P()))(x)
    print("RESULT", info.detected_by, info.process_index, info.process_count, info.local_device_count,
          info.device_count, int(distributed.is_main_process()),
          " ".join(f"{v:.1f}" for v in np.asarray(total)), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env(**extra) -> dict:
  env = {
      k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIXELBERT_", "TPU_", "MEGASCALE_", "JAX_"))
  }
  env.update(
      PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      **extra,
  )
  return env


def _spawn(env: dict, timeout_s: int) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-c", WORKER, str(timeout_s)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


@pytest.mark.slow
def test_multiprocess_two_cpu_processes_sum_across_processes():
  address = f"127.0.0.1:{_free_port()}"
  # Process 1 starts first: it must wait for the coordinator instead of failing.
  procs = [
      _spawn(
          _clean_env(PIXELBERT_COORDINATOR_ADDRESS=address, PIXELBERT_NUM_PROCESSES="2", PIXELBERT_PROCESS_ID=str(i)),
          30,
      )
      for i in (1, 0)
  ]
  outputs = [p.communicate(timeout=50) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = sorted(line.split()[1:] for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT"))
  assert len(results) == 2
  # 2 processes x 2 local devices: column 0 sums 1+1+2+2, column 1 sums 0+1+10+11, column 2 like 0.
  for index, (method, pid, count, n_local, n_global, main, *total) in enumerate(results):
    assert (method, int(pid), int(count), int(n_local), int(n_global)) == ("explicit", index, 2, 2, 4)
    assert int(main) == (index == 0)
    assert [float(v) for v in total] == [6.0, 22.0, 6.0]


@pytest.mark.slow
def test_multiprocess_unreachable_coordinator_fails_fast_naming_address():
  address = f"127.0.0.1:{_free_port()}"  # nothing listens there
  start = time.monotonic()
  proc = _spawn(
      _clean_env(PIXELBERT_COORDINATOR_ADDRESS=address, PIXELBERT_NUM_PROCESSES="2", PIXELBERT_PROCESS_ID="1"), 3
  )
  out, err = proc.communicate(timeout=30)
  elapsed = time.monotonic() - start
  assert proc.returncode != 0
  assert "RESULT" not in out
  assert f"cannot reach the JAX coordinator at {address}" in err
  assert elapsed < 3 + 15, elapsed  # the timeout plus interpreter start-up, not gRPC's minutes


@pytest.mark.slow
def test_multiprocess_coordinator_without_peers_exits_within_timeout():
  address = f"127.0.0.1:{_free_port()}"
  start = time.monotonic()
  proc = _spawn(
      _clean_env(PIXELBERT_COORDINATOR_ADDRESS=address, PIXELBERT_NUM_PROCESSES="2", PIXELBERT_PROCESS_ID="0"), 3
  )
  out, err = proc.communicate(timeout=40)
  assert proc.returncode != 0 and "RESULT" not in out
  assert f"joining coordinator {address}" in err
  assert time.monotonic() - start < 3 + 25


def test_explicit_plan_parses_all_variables():
  plan = distributed.plan_from_env(
      {
          "PIXELBERT_COORDINATOR_ADDRESS": "node-a:1234",
          "PIXELBERT_NUM_PROCESSES": "4",
          "PIXELBERT_PROCESS_ID": "3",
          "PIXELBERT_LOCAL_DEVICE_IDS": "2,3",
          "SLURM_NTASKS": "8",
          "SLURM_PROCID": "1",
      }
  )  # explicit wins over SLURM
  assert plan == distributed.InitPlan("explicit", "node-a:1234", 4, 3, (2, 3))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PIXELBERT_COORDINATOR_ADDRESS": "h:1"}, "missing: PIXELBERT_NUM_PROCESSES, PIXELBERT_PROCESS_ID"),
        (
            {"PIXELBERT_COORDINATOR_ADDRESS": "h", "PIXELBERT_NUM_PROCESSES": "2", "PIXELBERT_PROCESS_ID": "0"},
            "PIXELBERT_COORDINATOR_ADDRESS='h' is not HOST:PORT",
        ),
        (
            {"PIXELBERT_COORDINATOR_ADDRESS": "h:70000", "PIXELBERT_NUM_PROCESSES": "2", "PIXELBERT_PROCESS_ID": "0"},
            "outside 1..65535",
        ),
        (
            {"PIXELBERT_COORDINATOR_ADDRESS": "h:1", "PIXELBERT_NUM_PROCESSES": "two", "PIXELBERT_PROCESS_ID": "0"},
            "PIXELBERT_NUM_PROCESSES='two' is not an integer",
        ),
        (
            {"PIXELBERT_COORDINATOR_ADDRESS": "h:1", "PIXELBERT_NUM_PROCESSES": "2", "PIXELBERT_PROCESS_ID": "2"},
            "PIXELBERT_PROCESS_ID=2 must be < PIXELBERT_NUM_PROCESSES=2",
        ),
        (
            {
                "PIXELBERT_COORDINATOR_ADDRESS": "h:1",
                "PIXELBERT_NUM_PROCESSES": "2",
                "PIXELBERT_PROCESS_ID": "0",
                "PIXELBERT_LOCAL_DEVICE_IDS": "0;1",
            },
            "PIXELBERT_LOCAL_DEVICE_IDS='0;1'",
        ),
        ({"PIXELBERT_DISTRIBUTED": "mpi"}, "PIXELBERT_DISTRIBUTED='mpi'"),
        ({"PIXELBERT_DISTRIBUTED": "slurm", "SLURM_NTASKS": "2"}, "missing SLURM_PROCID, SLURM_JOB_ID"),
    ],
)
def test_bad_environment_is_rejected_by_name(env, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    distributed.plan_from_env(env)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu001", "gpu001"),
        ("gpu[003-010,012],cpu1", "gpu003"),
        ("a-1,b-2", "a-1"),
        ("rack[2-3]-n[07,09]", "rack2-n07"),
        ("node[5]", "node5"),
    ],
)
def test_first_slurm_host(nodelist, host):
  assert distributed.first_slurm_host(nodelist) == host


def test_slurm_plan_one_process_per_node_sees_all_gpus():
  env = {
      "SLURM_JOB_ID": "4242",
      "SLURM_STEP_NODELIST": "gpu[07-08]",
      "SLURM_STEP_NUM_TASKS": "2",
      "SLURM_STEP_NUM_NODES": "2",
      "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0",
  }
  plan = distributed.plan_from_env(env)
  assert plan == distributed.InitPlan("slurm", f"gpu07:{4242 % 4096 + 61440}", 2, 1, None)
  assert distributed.plan_from_env({**env, "PIXELBERT_COORDINATOR_PORT": "5555"}).coordinator_address == "gpu07:5555"


def test_slurm_plan_one_process_per_gpu_binds_local_id():
  env = {
      "SLURM_JOB_ID": "7",
      "SLURM_JOB_NODELIST": "n[1-2]",
      "SLURM_NTASKS": "16",
      "SLURM_NNODES": "2",
      "SLURM_PROCID": "13",
      "SLURM_LOCALID": "5",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
  }
  assert distributed.plan_from_env(env).local_device_ids == (5,)
  # SLURM already bound one GPU per task: it is device 0 of this process, no restriction needed.
  assert distributed.plan_from_env({**env, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids is None


def _fake_pci(root, devices):
  for i, (vendor, device) in enumerate(devices):
    d = root / "bus" / "pci" / "devices" / f"0000:00:0{i}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(root)


def test_tpu_detected_from_pci_bus_and_env(tmp_path):
  tpu_root = _fake_pci(tmp_path / "tpu", [("0x1ae0", "0x005e")] * 4)
  gpu_root = _fake_pci(tmp_path / "gpu", [("0x10de", "0x2330"), ("0x1ae0", "0x0042")])
  assert distributed.plan_from_env({}, sys_root=tpu_root).method == "tpu"
  assert distributed.plan_from_env({}, sys_root=gpu_root).method == "single"
  assert distributed.plan_from_env({"TPU_WORKER_HOSTNAMES": "w0,w1"}, sys_root=gpu_root).method == "tpu"
  # One host named: a single-host slice needs no coordinator.
  assert distributed.plan_from_env({"TPU_WORKER_HOSTNAMES": "w0"}, sys_root=tpu_root).method == "single"
  assert distributed.plan_from_env({"PIXELBERT_DISTRIBUTED": "none"}, sys_root=tpu_root).method == "single"


def test_single_process_fallbacks(tmp_path):
  empty = str(tmp_path)
  assert distributed.plan_from_env({}, sys_root=empty) == distributed.InitPlan("single")
  # One SLURM task (an interactive srun, a one-GPU job) is a single process.
  assert distributed.plan_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, sys_root=empty).method == "single"


def test_wait_for_coordinator_returns_when_listening():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    left = distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5)
  assert 0 < left <= 5


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_cpu_devices_is_validated(bad):
  with pytest.raises(ValueError, match="config.cpu_devices"):
    distributed.set_cpu_devices(bad)


def test_cpu_devices_after_the_backend_exists_is_an_error():
  import jax

  jax.devices()  # this process's backend exists from here on
  distributed.set_cpu_devices(0)  # nothing asked: no error
  with pytest.raises(RuntimeError, match="config.cpu_devices=3 must be applied before JAX creates"):
    distributed.set_cpu_devices(3)
