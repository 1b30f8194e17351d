#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this once on every node (ssh, pdsh, a k8s pod, ...),
# one process per node using all its GPUs. It sets the PIXELBERT_* variables that
# pixelbert_jax/distributed.py reads and execs the main command.
#
#   launch/gpu_multinode.sh --coordinator HOST0:PORT --num-nodes N --node-rank I -- --config=... --workdir=...
#
# Flags also come from PIXELBERT_COORDINATOR_ADDRESS, PIXELBERT_NUM_PROCESSES, PIXELBERT_PROCESS_ID.
# PIXELBERT_PYTHON picks the interpreter (default python); --dry-run prints instead of running.
set -euo pipefail

die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

coordinator="${PIXELBERT_COORDINATOR_ADDRESS:-}"
num_nodes="${PIXELBERT_NUM_PROCESSES:-}"
node_rank="${PIXELBERT_PROCESS_ID:-}"
dry_run=0
while (($#)); do
  case "$1" in
    --coordinator) (($# >= 2)) || die "$1 needs a value"; coordinator="$2"; shift ;;
    --num-nodes) (($# >= 2)) || die "$1 needs a value"; num_nodes="$2"; shift ;;
    --node-rank) (($# >= 2)) || die "$1 needs a value"; node_rank="$2"; shift ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (main's arguments go after --)" ;;
  esac
  shift
done

[[ "$coordinator" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator HOST:PORT is required (got '$coordinator')"
[[ "$num_nodes" =~ ^[1-9][0-9]*$ ]] || die "--num-nodes must be a positive integer (got '$num_nodes')"
if ! [[ "$node_rank" =~ ^[0-9]+$ ]] || ((node_rank >= num_nodes)); then
  die "--node-rank must be in 0..$((num_nodes - 1)) (got '$node_rank')"
fi

export PIXELBERT_COORDINATOR_ADDRESS="$coordinator"
export PIXELBERT_NUM_PROCESSES="$num_nodes"
export PIXELBERT_PROCESS_ID="$node_rank"
export PYTHONUNBUFFERED=1
command=("${PIXELBERT_PYTHON:-python}" -m pixelbert_jax.main "$@")
if ((dry_run)); then
  echo "export PIXELBERT_COORDINATOR_ADDRESS=$coordinator PIXELBERT_NUM_PROCESSES=$num_nodes PIXELBERT_PROCESS_ID=$node_rank"
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi
exec "${command[@]}"
