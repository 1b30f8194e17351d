#!/usr/bin/env bash
# Cloud TPU VM launcher for pixelbert_jax: the same `python -m pixelbert_jax.main` on every worker of a
# slice; jax.distributed finds the other workers by itself (pixelbert_jax/distributed.py leaves it to JAX).
#
#   launch/tpu_vm.sh [FLAGS] create|setup|run|logs|stop|delete|status [FLAGS] [-- MAIN_ARGS...]
#
# Every flag also comes from the environment (in brackets). --dry-run prints each command instead of
# running it, quoted so that it can be pasted into a shell.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [FLAGS] SUBCOMMAND [FLAGS] [-- MAIN_ARGS...]

subcommands
  create   a TPU VM (or, with --queued, a queued resource) of --accelerator-type in --zone
  setup    on all workers, idempotently: venv, jax[tpu], this package (from --source)
  run      python -m pixelbert_jax.main on all workers, detached; appends to ~/pixelbert_logs/main.log
  logs     copy every worker's log into --log-dir/worker-N.log (and print it); --follow keeps going
  stop     SIGTERM the run on all workers (the TPU VM keeps running; rerun `run` to resume)
  delete   delete the TPU VM / queued resource
  status   describe the TPU VM / queued resource

flags [environment]
  --name NAME                 [TPU_NAME, default pixelbert]
  --zone ZONE                 [TPU_ZONE, required]
  --project PROJECT           [TPU_PROJECT, default: gcloud's]
  --accelerator-type TYPE     [TPU_ACCELERATOR_TYPE, default v4-32]
  --runtime-version VERSION   [TPU_RUNTIME_VERSION, default: by TPU generation]
  --spot | --reserved | --on-demand   [TPU_PROVISIONING=spot|reserved|on-demand, default on-demand]
  --queued                    [TPU_QUEUED=1] create through a queued resource
  --source SRC                [PIXELBERT_SOURCE] local (git archive of HEAD, default), a .tar.gz, or
                              git+URL[@REF]
  --config CONFIG             [PIXELBERT_CONFIG, default configs/pretrain.py:r50]
  --workdir gs://BUCKET/DIR   [PIXELBERT_WORKDIR, required by run]
  --data-dir gs://BUCKET/tfds [TFDS_DATA_DIR]
  --log-dir DIR               [PIXELBERT_LOG_DIR, default tpu_logs/NAME]
  --follow                    logs (or run): keep streaming
  --dry-run                   [DRY_RUN=1] print the commands, run nothing
  -- MAIN_ARGS                run: extra arguments for pixelbert_jax.main, e.g. --config.total_steps=1000
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

NAME="${TPU_NAME:-pixelbert}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
PROVISIONING="${TPU_PROVISIONING:-on-demand}"
QUEUED="${TPU_QUEUED:-0}"
SOURCE="${PIXELBERT_SOURCE:-local}"
CONFIG="${PIXELBERT_CONFIG:-configs/pretrain.py:r50}"
WORKDIR="${PIXELBERT_WORKDIR:-}"
DATA_DIR="${TFDS_DATA_DIR:-}"
LOG_DIR="${PIXELBERT_LOG_DIR:-}"
DRY_RUN="${DRY_RUN:-0}"
FOLLOW=0
SUBCOMMAND=""
MAIN_ARGS=()
# On the workers, relative to $HOME: where the package, its venv and the run's log live.
REMOTE_DIR="pixelbert_jax"
REMOTE_VENV="pixelbert_venv"
REMOTE_LOGS="pixelbert_logs"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

while (($#)); do
  arg="$1"
  case "$arg" in
    --) shift; MAIN_ARGS=("$@"); break ;;
    --*=*) flag="${arg%%=*}"; value="${arg#*=}"; has_value=1 ;;
    *) flag="$arg"; value="${2-}"; has_value=0 ;;
  esac
  case "$flag" in
    --name|--zone|--project|--accelerator-type|--runtime-version|--source|--config|--workdir|--data-dir|--log-dir)
      if ((has_value == 0)); then
        (($# >= 2)) || die "$flag needs a value"
        shift
      fi
      case "$flag" in
        --name) NAME="$value" ;;
        --zone) ZONE="$value" ;;
        --project) PROJECT="$value" ;;
        --accelerator-type) ACCELERATOR_TYPE="$value" ;;
        --runtime-version) RUNTIME_VERSION="$value" ;;
        --source) SOURCE="$value" ;;
        --config) CONFIG="$value" ;;
        --workdir) WORKDIR="$value" ;;
        --data-dir) DATA_DIR="$value" ;;
        --log-dir) LOG_DIR="$value" ;;
      esac ;;
    --spot) PROVISIONING=spot ;;
    --reserved) PROVISIONING=reserved ;;
    --on-demand) PROVISIONING=on-demand ;;
    --queued) QUEUED=1 ;;
    --follow) FOLLOW=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    create|setup|run|logs|stop|delete|status)
      [[ -z "$SUBCOMMAND" ]] || die "two subcommands: $SUBCOMMAND and $flag"
      SUBCOMMAND="$flag" ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
  shift
done

[[ -n "$SUBCOMMAND" ]] || { usage >&2; exit 2; }
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lower-case letters, digits and '-'"
case "$PROVISIONING" in spot|reserved|on-demand) ;; *) die "TPU_PROVISIONING='$PROVISIONING': spot, reserved or on-demand" ;; esac
LOG_DIR="${LOG_DIR:-tpu_logs/$NAME}"

if [[ -z "$RUNTIME_VERSION" ]]; then
  # The software image differs per TPU generation.
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

# POSIX single quotes unless the word is plainly safe, so the printed commands paste back exactly.
quote() {
  local word="$1" squote="'" escaped="'\\''"
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$squote/$escaped}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run.
cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_all "$@"
    printf '\n'
  else
    "$@"
  fi
}

GCLOUD_COMMON=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_COMMON+=("--project=$PROJECT")

on_all_workers() {  # $1: a bash script for the workers
  cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_COMMON[@]}" --worker=all --command="$1"
}

do_create() {
  local provisioning=()
  [[ "$PROVISIONING" == on-demand ]] || provisioning=("--$PROVISIONING")
  if [[ "$QUEUED" == 1 ]]; then
    cmd gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GCLOUD_COMMON[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${provisioning[@]}"
  else
    cmd gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_COMMON[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${provisioning[@]}"
  fi
}

do_status() {
  [[ "$QUEUED" != 1 ]] || cmd gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_COMMON[@]}"
  cmd gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}"
}

do_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    cmd gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_COMMON[@]}" --force --quiet
  else
    cmd gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_COMMON[@]}" --quiet
  fi
}

do_setup() {
  local fetch
  case "$SOURCE" in
    git+*)
      local url="${SOURCE#git+}" ref=HEAD
      if [[ "$url" =~ ^(.*)@([^/@]+)$ ]]; then url="${BASH_REMATCH[1]}"; ref="${BASH_REMATCH[2]}"; fi
      fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch -q origin; else rm -rf ~/$REMOTE_DIR; git clone -q $(quote "$url") ~/$REMOTE_DIR; fi; git -C ~/$REMOTE_DIR checkout -q $(quote "$ref")"
      ;;
    *)
      local tarball="$SOURCE"
      if [[ "$SOURCE" == local ]]; then
        tarball="${TMPDIR:-/tmp}/pixelbert_jax-$NAME.tar.gz"
        if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
          echo "tpu_vm.sh: warning: uncommitted changes in $REPO_ROOT are not shipped (git archive HEAD)" >&2
        fi
        cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
      elif [[ "$DRY_RUN" != 1 && ! -f "$tarball" ]]; then
        die "--source '$SOURCE': no such file (expected local, a .tar.gz, or git+URL[@REF])"
      fi
      cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:pixelbert_jax.tar.gz" "${GCLOUD_COMMON[@]}" --worker=all
      fetch="rm -rf ~/$REMOTE_DIR.new && mkdir -p ~/$REMOTE_DIR.new && tar -xzf ~/pixelbert_jax.tar.gz -C ~/$REMOTE_DIR.new && rm -rf ~/$REMOTE_DIR && mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR"
      ;;
  esac
  # gcsfs and google-cloud-storage: gs:// for etils.epath (Orbax metadata, TFDS) and tensorboardX
  # without TensorFlow; array_record and tensorstore read gs:// natively.
  on_all_workers "set -euo pipefail; $fetch; if [ ! -x ~/$REMOTE_VENV/bin/python ]; then python3 -m venv ~/$REMOTE_VENV || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv ~/$REMOTE_VENV; }; fi; ~/$REMOTE_VENV/bin/pip install -q --upgrade pip; ~/$REMOTE_VENV/bin/pip install -q -c ~/$REMOTE_DIR/constraints.txt ~/$REMOTE_DIR'[tpu]' gcsfs google-cloud-storage; ~/$REMOTE_VENV/bin/python -c 'import jax, pixelbert_jax; print(\"worker ready: jax\", jax.__version__)'"
}

do_run() {
  [[ -n "$WORKDIR" ]] || die "run needs --workdir (or PIXELBERT_WORKDIR), e.g. gs://BUCKET/runs/r50"
  [[ "$WORKDIR" == gs://* ]] || echo "tpu_vm.sh: warning: workdir '$WORKDIR' is not on gs://: every worker must see the same checkpoints" >&2
  local main=(-m pixelbert_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
  local env_part="PYTHONUNBUFFERED=1"
  if [[ -n "$DATA_DIR" ]]; then
    main+=("--config.data.data_dir=$DATA_DIR")
    env_part+=" TFDS_DATA_DIR=$(quote "$DATA_DIR")"
  fi
  main+=("${MAIN_ARGS[@]}")
  # shellcheck disable=SC2088  # expanded on the worker, not here
  local logs="~/$REMOTE_LOGS"
  # Detached (setsid + nohup) so that a dropped ssh does not kill the run; the pid file guards against
  # two runs on one worker and lets `stop` signal the whole process group.
  on_all_workers "set -euo pipefail; mkdir -p $logs; if [ -f $logs/main.pid ] && kill -0 \"\$(cat $logs/main.pid)\" 2>/dev/null; then echo \"\$(hostname): a run is already going (pid \$(cat $logs/main.pid)); use stop first\" >&2; exit 1; fi; cd ~/$REMOTE_DIR; echo \"=== \$(date -u +%FT%TZ) start\" >> $logs/main.log; $env_part nohup setsid ~/$REMOTE_VENV/bin/python $(quote_all "${main[@]}") >> $logs/main.log 2>&1 < /dev/null & echo \$! > $logs/main.pid; echo \"\$(hostname): started pid \$(cat $logs/main.pid)\""
  if [[ "$FOLLOW" == 1 ]]; then do_logs; fi
}

# Splits '[worker-N] line' into LOG_DIR/worker-N.log and echoes every line.
split_by_worker() {
  local line
  mkdir -p "$LOG_DIR"
  rm -f "$LOG_DIR"/worker-*.log
  while IFS= read -r line; do
    if [[ "$line" =~ ^\[worker-([A-Za-z0-9_.-]+)\]\ (.*)$ ]]; then
      printf '%s\n' "${BASH_REMATCH[2]}" >> "$LOG_DIR/worker-${BASH_REMATCH[1]}.log"
    fi
    printf '%s\n' "$line"
  done
}

do_logs() {
  local tail_args="-n +1"
  [[ "$FOLLOW" != 1 ]] || tail_args="-n +1 -F"
  local script="W=\$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname); tail $tail_args ~/$REMOTE_LOGS/main.log | sed -u \"s/^/[worker-\$W] /\""
  if [[ "$DRY_RUN" == 1 ]]; then
    on_all_workers "$script"
  else
    on_all_workers "$script" | split_by_worker
    echo "tpu_vm.sh: per-worker logs in $LOG_DIR/" >&2
  fi
}

do_stop() {
  # shellcheck disable=SC2088  # expanded on the worker, not here
  local logs="~/$REMOTE_LOGS"
  on_all_workers "if [ -f $logs/main.pid ]; then pid=\$(cat $logs/main.pid); kill -TERM -- -\$pid 2>/dev/null || kill -TERM \$pid 2>/dev/null || true; rm -f $logs/main.pid; echo \"\$(hostname): sent SIGTERM to \$pid\"; else echo \"\$(hostname): no run\"; fi"
}

"do_$SUBCOMMAND"
