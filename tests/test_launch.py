"""Launch scripts: lint, the gcloud commands tpu_vm.sh prints under --dry-run, and the environment the
SLURM script hands each task (run with bash, fake SLURM variables and stub srun/scontrol/python)."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
SBATCH = os.path.join(REPO, "launch", "gpu_slurm.sbatch")
SCRIPTS = [TPU_VM, SBATCH, os.path.join(REPO, "launch", "gpu_multinode.sh")]
# Real config keys (test_help_texts_name_real_config_keys), with values that need quoting.
TRICKY = ['--config.data.vocab_path=it\'s "quoted" & spaced', "--config.total_steps=10"]


def test_help_texts_name_real_config_keys():
  """Every `--config.KEY` a launch script or launch/README.md shows, and TRICKY above, is a key of
  configs/pretrain.py (the scripts' default config; its variants share the keys): a user may copy it."""
  from tests import train_helpers as th

  config = th.load_config("pretrain", "r50")
  launch = os.path.join(REPO, "launch")
  texts = {name: open(os.path.join(launch, name)).read() for name in os.listdir(launch)}
  texts["TRICKY"] = " ".join(TRICKY)
  # lower case: `--config.KEY=VALUE` is a placeholder
  shown = {(name, key) for name, text in texts.items() for key in re.findall(r"--config\.([a-z_][\w.]*)=", text)}
  assert shown, "no --config.KEY= found: the pattern no longer matches the help texts"
  missing = []
  for name, key in sorted(shown):
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if not hasattr(node, "get") or leaf not in node:
      missing.append(f"{name}: --config.{key}")
  assert not missing, f"keys that configs/pretrain.py does not have: {missing}"


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "PIXELBERT_", "SLURM_", "TFDS_", "DRY_RUN"))}
  env.update(extra)
  return env


def _tpu(*args, env=None, check=True):
  proc = subprocess.run(
      ["bash", TPU_VM, "--dry-run", *args], capture_output=True, text=True, env=env or _env(), timeout=30
  )
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(proc):
  return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _contains(seq, sub):
  return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("script", [s for s in SCRIPTS if os.path.exists(s)])
def test_scripts_parse_and_pass_shellcheck(script):
  assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  lint = subprocess.run(["shellcheck", "-x", script], capture_output=True, text=True)
  assert lint.returncode == 0, lint.stdout


def test_create_plain_and_queued():
  (create,) = _commands(_tpu("create", "--zone", "us-central2-b", "--name", "pb-a", "--spot"))
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pb-a"]
  assert _flag(create, "--zone") == "us-central2-b"
  assert _flag(create, "--accelerator-type") == "v4-32"
  assert _flag(create, "--version") == "tpu-ubuntu2204-base"
  assert "--spot" in create and "--reserved" not in create

  env = _env(
      TPU_ZONE="us-east5-a",
      TPU_ACCELERATOR_TYPE="v5p-64",
      TPU_PROVISIONING="reserved",
      TPU_QUEUED="1",
      TPU_PROJECT="my-proj",
  )
  (queued,) = _commands(_tpu("create", env=env))
  assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pixelbert"]
  assert _flag(queued, "--node-id") == "pixelbert"
  assert (_flag(queued, "--zone"), _flag(queued, "--accelerator-type")) == ("us-east5-a", "v5p-64")
  assert _flag(queued, "--runtime-version") == "v2-alpha-tpuv5"
  assert _flag(queued, "--project") == "my-proj"
  assert "--reserved" in queued and "--spot" not in queued


def test_setup_ships_head_and_installs_on_all_workers():
  archive, scp, ssh = _commands(_tpu("setup", "--zone", "europe-west4-a"))
  assert archive[:4] == ["git", "-C", REPO, "archive"] and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
  for command in (scp, ssh):
    assert "--worker=all" in command and _flag(command, "--zone") == "europe-west4-a"
  remote = shlex.split(_flag(ssh, "--command"))
  assert "-c" in remote and "pip" in " ".join(remote) and any(w.endswith("[tpu]") for w in remote)
  # Idempotent: the venv is only created when missing.
  assert "if [ ! -x ~/pixelbert_venv/bin/python ]" in _flag(ssh, "--command")

  (ssh,) = _commands(_tpu("setup", "--zone", "z", "--source", "git+https://example.com/pb.git@v0.1"))
  script = _flag(ssh, "--command")
  assert "git clone -q https://example.com/pb.git" in script and "checkout -q v0.1" in script


def test_run_quotes_the_main_command_for_all_workers(tmp_path):
  proc = _tpu(
      "run",
      "--zone",
      "us-central2-b",
      "--workdir",
      "gs://bucket/runs/r 50",
      "--data-dir",
      "gs://bucket/tfds",
      "--config",
      "configs/pretrain.py:r50",
      "--",
      *TRICKY,
  )
  (ssh,) = _commands(proc)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pixelbert"]
  assert "--worker=all" in ssh and _flag(ssh, "--zone") == "us-central2-b"
  script = _flag(ssh, "--command")
  expected = [
      "-m",
      "pixelbert_jax.main",
      "--config=configs/pretrain.py:r50",
      "--workdir=gs://bucket/runs/r 50",
      "--config.data.data_dir=gs://bucket/tfds",
      *TRICKY,
  ]
  assert _contains(shlex.split(script), expected)

  # The worker's shell must hand main exactly these arguments: run the remote script with a stub python.
  home = tmp_path / "home"
  (home / "pixelbert_jax").mkdir(parents=True)
  python = home / "pixelbert_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(
      '#!/usr/bin/env bash\nexec "$PYTHON_FOR_STUB" -c \'import json,os,sys; '
      'json.dump({"argv": sys.argv[1:], "data_dir": os.environ.get("TFDS_DATA_DIR")}, '
      'open(os.path.expanduser("~/argv.json"), "w"))\' "$@"\n'
  )
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  worker_env = _env(HOME=str(home), PYTHON_FOR_STUB=shutil.which("python3") or "python3")
  subprocess.run(["bash", "-c", script], check=True, env=worker_env, timeout=30)
  out = home / "argv.json"
  for _ in range(100):
    if out.exists() and out.stat().st_size:
      break
    time.sleep(0.05)
  seen = json.loads(out.read_text())
  assert seen == {"argv": expected, "data_dir": "gs://bucket/tfds"}
  assert (home / "pixelbert_logs" / "main.pid").read_text().strip().isdigit()
  assert "start" in (home / "pixelbert_logs" / "main.log").read_text()

  stop = _flag(_commands(_tpu("stop", "--zone", "us-central2-b"))[0], "--command")
  result = subprocess.run(["bash", "-c", stop], env=worker_env, capture_output=True, text=True, timeout=30)
  assert "sent SIGTERM" in result.stdout and not (home / "pixelbert_logs" / "main.pid").exists()


def test_run_requires_a_workdir_and_zone():
  proc = _tpu("run", "--zone", "z", check=False)
  assert proc.returncode == 2 and "--workdir" in proc.stderr
  proc = _tpu("delete", check=False)
  assert proc.returncode == 2 and "--zone" in proc.stderr
  proc = _tpu("launch", "--zone", "z", check=False)
  assert proc.returncode == 2 and "unknown argument 'launch'" in proc.stderr


def test_logs_stop_delete_target_all_workers():
  (logs,) = _commands(_tpu("logs", "--zone", "z1", "--follow"))
  assert "--worker=all" in logs and "tail -n +1 -F" in _flag(logs, "--command")
  (stop,) = _commands(_tpu("stop", "--zone", "z1"))
  assert "--worker=all" in stop and "kill -TERM" in _flag(stop, "--command")
  (delete,) = _commands(_tpu("delete", "--zone", "z1", "--name", "pb-b"))
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pb-b"] and "--quiet" in delete
  (delete,) = _commands(_tpu("delete", "--zone", "z1", "--queued"))
  assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete
  status = _commands(_tpu("status", "--zone", "z1"))
  assert status == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "pixelbert", "--zone=z1"]]


def _slurm_stubs(tmp_path):
  """scontrol expands the fake node list; srun runs its command once per task, like SLURM would on
  each node; python records the PIXELBERT_* environment and argv of every task."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  stubs = {
      "scontrol": '[ "$1 $2" = "show hostnames" ] || exit 9\necho gpu07\necho gpu08\n',
      "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
      "per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))\n"
      "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
      '  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) "$@" || exit $?\ndone\n',
      "fakepython": 'exec python3 -c \'import json,os,sys; json.dump({"argv": sys.argv[1:], "env": '
      '{k: v for k, v in os.environ.items() if k.startswith("PIXELBERT_")}}, '
      'open(os.path.join(os.environ["OUT"], os.environ["SLURM_PROCID"] + ".json"), "w"))\' "$@"\n',
  }
  for name, body in stubs.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def _sbatch(tmp_path, ntasks, nodes, *args, **env):
  bin_dir = _slurm_stubs(tmp_path)
  out = tmp_path / "out"
  shutil.rmtree(out, ignore_errors=True)  # no task file may survive from an earlier call
  out.mkdir()
  full_env = _env(
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      OUT=str(out),
      PIXELBERT_PYTHON="fakepython",
      SLURM_JOB_ID="4242",
      SLURM_JOB_NODELIST="gpu[07-08]",
      SLURM_NTASKS=str(ntasks),
      SLURM_JOB_NUM_NODES=str(nodes),
      **env,
  )
  proc = subprocess.run(["bash", SBATCH, *args], capture_output=True, text=True, env=full_env, timeout=60)
  tasks = [json.loads((out / f"{i}.json").read_text()) for i in range(ntasks) if (out / f"{i}.json").exists()]
  return proc, tasks


def test_sbatch_one_process_per_node(tmp_path):
  proc, tasks = _sbatch(tmp_path, 2, 2, "--workdir=/shared/run", *TRICKY, PIXELBERT_COORDINATOR_PORT="7777")
  assert proc.returncode == 0, proc.stderr
  assert len(tasks) == 2
  for i, task in enumerate(tasks):
    assert task["env"] == {
        "PIXELBERT_COORDINATOR_ADDRESS": "gpu07:7777",
        "PIXELBERT_NUM_PROCESSES": "2",
        "PIXELBERT_PROCESS_ID": str(i),
        "PIXELBERT_PER_GPU": "0",
        "PIXELBERT_PYTHON": "fakepython",
        "PIXELBERT_COORDINATOR_PORT": "7777",
    }
    assert task["argv"] == [
        "-m",
        "pixelbert_jax.main",
        "--config=configs/pretrain.py:r50",
        "--workdir=/shared/run",
        *TRICKY,
    ]


def test_sbatch_one_process_per_gpu(tmp_path):
  proc, tasks = _sbatch(
      tmp_path, 8, 2, "--config=configs/pretrain.py:x152", PIXELBERT_WORKDIR="/shared/x", CUDA_VISIBLE_DEVICES="0,1,2,3"
  )
  assert proc.returncode == 0, proc.stderr
  assert len(tasks) == 8
  assert [t["env"]["PIXELBERT_PROCESS_ID"] for t in tasks] == [str(i) for i in range(8)]
  assert [t["env"]["PIXELBERT_LOCAL_DEVICE_IDS"] for t in tasks] == ["0", "1", "2", "3"] * 2
  assert {t["env"]["PIXELBERT_COORDINATOR_ADDRESS"] for t in tasks} == {f"gpu07:{20000 + 4242 % 20000}"}
  assert tasks[5]["argv"] == ["-m", "pixelbert_jax.main", "--workdir=/shared/x", "--config=configs/pretrain.py:x152"]
  # SLURM bound one GPU per task already (--gpus-per-task=1): no further restriction.
  proc, tasks = _sbatch(tmp_path, 8, 2, PIXELBERT_WORKDIR="/shared/x", CUDA_VISIBLE_DEVICES="0")
  assert proc.returncode == 0 and len(tasks) == 8
  assert all("PIXELBERT_LOCAL_DEVICE_IDS" not in t["env"] for t in tasks)


def test_sbatch_dry_run_and_errors(tmp_path):
  proc, _ = _sbatch(tmp_path, 2, 2, "--workdir=/w", PIXELBERT_DRY_RUN="1")
  assert proc.returncode == 0, proc.stderr
  assert "export PIXELBERT_COORDINATOR_ADDRESS=gpu07:24242" in proc.stdout
  srun = shlex.split(proc.stdout.splitlines()[-1])
  assert srun[0] == "srun" and srun[-4:] == [
      "-m",
      "pixelbert_jax.main",
      "--config=configs/pretrain.py:r50",
      "--workdir=/w",
  ]
  assert not any((tmp_path / "out").iterdir())  # nothing ran
  assert "export PIXELBERT_NUM_PROCESSES=2" in proc.stdout
  proc, _ = _sbatch(tmp_path, 2, 2)
  assert proc.returncode == 2 and "--workdir" in proc.stderr


def test_gpu_multinode_sets_explicit_variables(tmp_path):
  script = os.path.join(REPO, "launch", "gpu_multinode.sh")
  bin_dir = _slurm_stubs(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  env = _env(
      PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), PIXELBERT_PYTHON="fakepython", SLURM_PROCID="rank1"
  )  # fakepython names its output file after SLURM_PROCID
  subprocess.run(
      [
          "bash",
          script,
          "--coordinator",
          "node0:12355",
          "--num-nodes",
          "2",
          "--node-rank",
          "1",
          "--",
          "--workdir=/w",
          *TRICKY,
      ],
      check=True,
      env=env,
      timeout=30,
  )
  task = json.loads((out / "rank1.json").read_text())
  assert task["argv"] == ["-m", "pixelbert_jax.main", "--workdir=/w", *TRICKY]
  assert {
      k: task["env"][k] for k in ("PIXELBERT_COORDINATOR_ADDRESS", "PIXELBERT_NUM_PROCESSES", "PIXELBERT_PROCESS_ID")
  } == {"PIXELBERT_COORDINATOR_ADDRESS": "node0:12355", "PIXELBERT_NUM_PROCESSES": "2", "PIXELBERT_PROCESS_ID": "1"}
  bad = subprocess.run(
      ["bash", script, "--coordinator", "node0:12355", "--num-nodes", "2", "--node-rank", "2"],
      capture_output=True,
      text=True,
      env=env,
      timeout=30,
  )
  assert bad.returncode == 2 and "--node-rank must be in 0..1" in bad.stderr
