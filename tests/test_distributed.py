"""Multi-host initialisation: environment parsing, and real CPU processes through the same PIXELBERT_*
variables the launch scripts export, and through faked SLURM and Open MPI environments that JAX's own
detection reads. The real multi-process tests are named test_multiprocess_* (select or skip them with
-k multiprocess); each is bounded by short timeouts."""

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
    # jax_cuda_visible_devices: what JAX would show of this host's GPUs ('all', or the ids it kept).
    print("RESULT", info.detected_by, info.process_index, info.process_count, info.local_device_count,
          info.device_count, int(distributed.is_main_process()), int(jax.distributed.is_initialized()),
          jax.config.values["jax_cuda_visible_devices"], " ".join(f"{v:.1f}" for v in np.asarray(total)),
          flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env(**extra) -> dict:
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "PIXELBERT_", "TPU_", "MEGASCALE_", "JAX_", "OMPI_", "KUBERNETES_"))
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


def _slurm_step(task: int, tasks: int, local_id: int, nodes: int, **extra) -> dict:
  return {
      "SLURM_JOB_ID": "4242",
      "SLURM_STEP_NODELIST": "127.0.0.1",
      "SLURM_NTASKS": str(tasks),
      "SLURM_PROCID": str(task),
      "SLURM_LOCALID": str(local_id),
      "SLURM_STEP_NUM_NODES": str(nodes),
      **extra,
  }


def _run_together(envs: list, timeout_s: int = 30) -> list:
  """Starts one worker per environment (the last first); returns each one's RESULT fields, by process index."""
  procs = [_spawn(env, timeout_s) for env in reversed(envs)]
  outputs = [p.communicate(timeout=timeout_s + 20) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = sorted(line.split()[1:] for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT"))
  assert len(results) == len(envs)
  return results


def _check_sum(results: list, method: str, visible: list) -> None:
  # 2 processes x 2 local devices: column 0 sums 1+1+2+2, column 1 sums 0+1+10+11, column 2 like 0.
  for index, (got_method, pid, count, n_local, n_global, main, initialized, got_visible, *total) in enumerate(results):
    assert (got_method, int(pid), int(count), int(n_local), int(n_global)) == (method, index, 2, 2, 4)
    assert int(main) == (index == 0) and initialized == "1"
    assert got_visible == visible[index]
    assert [float(v) for v in total] == [6.0, 22.0, 6.0]


@pytest.mark.slow
def test_multiprocess_two_cpu_processes_sum_across_processes():
  address = f"127.0.0.1:{_free_port()}"
  # Process 1 starts first: it must wait for the coordinator instead of failing. Inside a SLURM step with
  # one task per node (what gpu_slurm.sbatch starts) JAX's detection, left on, would show each process
  # GPU 0 only.
  envs = [
      _clean_env(
          PIXELBERT_COORDINATOR_ADDRESS=address,
          PIXELBERT_NUM_PROCESSES="2",
          PIXELBERT_PROCESS_ID=str(i),
          **_slurm_step(i, 2, 0, 2),
      )
      for i in (0, 1)
  ]
  _check_sum(_run_together(envs), "explicit", ["all", "all"])


@pytest.mark.slow
def test_multiprocess_slurm_step_goes_through_jax_with_every_gpu_per_node():
  port = str(_free_port())
  # One task per node: JAX alone would keep GPU SLURM_LOCALID=0 of each node.
  per_node = [_clean_env(JAX_COORDINATOR_PORT=port, **_slurm_step(i, 2, 0, 2)) for i in (0, 1)]
  _check_sum(_run_together(per_node), "slurm", ["all", "all"])


@pytest.mark.slow
def test_multiprocess_other_clusters_are_left_to_jax():
  # Open MPI (mpirun -n 2): this module knows nothing of it, JAX's detection finds it.
  port = str(_free_port())
  uri = "1531576320.0;tcp://127.0.0.1:34911"
  envs = [
      _clean_env(
          OMPI_MCA_orte_hnp_uri=uri,
          OMPI_COMM_WORLD_SIZE="2",
          OMPI_COMM_WORLD_RANK=str(i),
          OMPI_COMM_WORLD_LOCAL_RANK=str(i),
          JAX_COORDINATOR_PORT=port,
      )
      for i in (0, 1)
  ]
  _check_sum(_run_together(envs), "jax", ["0", "1"])


@pytest.mark.slow
def test_multiprocess_single_process_does_not_initialize():
  # Nothing set (TPU worker variables but no TPU chips: JAX finds no cluster), and a one-task SLURM step,
  # where JAX would start a one-process coordinator and show only GPU SLURM_LOCALID.
  lone = _clean_env(TPU_WORKER_HOSTNAMES="w0,w1", TPU_WORKER_ID="0")
  one_task = _clean_env(**_slurm_step(0, 1, 0, 1))
  for env in (lone, one_task):
    (result,) = _run_together([env])
    assert result[:8] == ["single", "0", "1", "2", "2", "1", "0", "all"], result


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


@pytest.mark.slow
def test_multiprocess_coordinator_port_in_use_fails_naming_it():
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    address = f"127.0.0.1:{busy.getsockname()[1]}"
    proc = _spawn(
        _clean_env(PIXELBERT_COORDINATOR_ADDRESS=address, PIXELBERT_NUM_PROCESSES="2", PIXELBERT_PROCESS_ID="0"), 30
    )
    out, err = proc.communicate(timeout=40)
  assert proc.returncode != 0 and "RESULT" not in out
  # JAX alone crashes with SIGSEGV about half the time here, or raises without naming the port.
  assert proc.returncode == 1, err[-2000:]
  assert f"process 0 cannot serve the JAX coordinator on {address}: port {address.rsplit(':', 1)[1]} is in use" in err


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
        (
            {"PIXELBERT_DISTRIBUTED": "slurm", "SLURM_NTASKS": "2"},
            "missing: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID",
        ),
        (_slurm_step(0, 2, 0, 1, SLURM_NTASKS="two"), "SLURM_NTASKS='two' is not an integer"),
    ],
)
def test_bad_environment_is_rejected_by_name(env, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    distributed.plan_from_env(env)


def test_slurm_plan_one_process_per_node_sees_all_gpus():
  env = _slurm_step(1, 2, 0, 2, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed.plan_from_env(env) == distributed.InitPlan("slurm", local_device_ids=())
  del env["SLURM_STEP_NUM_NODES"]  # srun sets it; the allocation's node count stands in
  assert distributed.plan_from_env({**env, "SLURM_NNODES": "2"}).local_device_ids == ()


def test_slurm_plan_one_process_per_gpu_binds_local_id():
  env = _slurm_step(13, 16, 5, 2, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed.plan_from_env(env).local_device_ids == (5,)
  # SLURM already bound one GPU per task: it is device 0 of this process, no restriction needed.
  assert distributed.plan_from_env({**env, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids == ()
  assert distributed.plan_from_env({**env, "PIXELBERT_LOCAL_DEVICE_IDS": "4,5"}).local_device_ids == (4, 5)


def test_single_process_and_jax_fallbacks():
  # One SLURM task (an interactive srun, a one-GPU job) is a single process.
  assert distributed.plan_from_env(_slurm_step(0, 1, 0, 1)) == distributed.InitPlan("single")
  assert distributed.plan_from_env({"PIXELBERT_DISTRIBUTED": "none", **_slurm_step(0, 2, 0, 2)}).method == "single"
  # No step (a batch script without srun, or no SLURM): JAX's own detection decides, one process if it finds none.
  batch = {k: v for k, v in _slurm_step(0, 2, 0, 2).items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.plan_from_env(batch) == distributed.InitPlan("jax")
  assert distributed.plan_from_env({}) == distributed.InitPlan("jax")
  assert distributed.plan_from_env({"PIXELBERT_DISTRIBUTED": "jax"}) == distributed.InitPlan("jax", required=True)


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
