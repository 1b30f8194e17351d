#!/usr/bin/env bash
# The issue #8 benchmarks on one GPU, in a fixed order, within a time budget (BENCH_BUDGET_S, default 560 s;
# each step also has its own cap, and later steps are skipped when the budget runs out):
#   (a) train step configs/pretrain.py:r50 (bfloat16, remat), batch 16: jax, torch, torch-compile
#       (SKIP_COMPILE=1: no compile)
#   (e) the largest JAX batch for pretrain-r50, doubling from 64
#   (d) inference r50: batch-1 latency and cached-pixel ITM throughput: jax, torch
#   (g) (d) for jax with cuDNN's fused attention (--attention cudnn; session 4's `dot_product` run was
#       XLA's attention: jax.nn.dot_product_attention does not pick cuDNN by itself)
#   (b) train step finetune-r50 (configs/vqa.py:r50: VQA head, all 273 pixels): jax, torch
#   (c) train step pretrain-x152: jax, torch
#   (f) train step pretrain-r50, jax only, with model.cnn.impl=cpu (1x1 convs as matmuls, explicit
#       max-pool / batch-norm gradients): does the CPU formulation help or hurt on a GPU?
# (a), (d) and (g) also print the top XLA ops of a profiled JAX step / pair batch (--profile).
# ONLY="d g" runs just those steps (a device call is capped at 600 s: split the sequence over calls).
# Everything (per step a log and a JSON, packed into steps.tar.gz at the end; env.txt, status.txt,
# summary.md) goes to $OUT.
#
#   OUT=/tmp/bench_out PYTHONPATH=/tmp/site bash bench/gpu_run.sh        # from the repo root or anywhere
#   BENCH_SMOKE=1 OUT=/tmp/smoke bash bench/gpu_run.sh                   # CPU rehearsal: demo shapes, 2 steps
#
# Needs jax (CUDA), flax, optax, orbax-checkpoint, ml_collections, torch, torchvision, transformers; the package is used from
# this checkout (PYTHONPATH), no install. Neither grain nor tensorflow_datasets is imported.
# Each step runs under `timeout`, so one hang costs that step only; within a step each framework is its
# own process (JAX and PyTorch never share the GPU's memory), started by the Python script.
set -x
OUT=$(realpath -m "${OUT:-./bench_out}")  # relative to where the script is started from
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=".:${PYTHONPATH:-}"
# One process at a time owns the GPU, so JAX may take most of it up front (its default is 75%); the
# max-batch search below raises this further. PyTorch workers keep JAX on the CPU (it only makes the
# weights they convert), so this preallocation never happens in a PyTorch process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# A fresh persistent compilation cache: every measured compile is still cold (no two steps compile the
# same program). torch.compile workers get a fresh Inductor cache
# each (bench/workers.py), so their first step is a cold compile too.
JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
export JAX_COMPILATION_CACHE_DIR
BUDGET=${BENCH_BUDGET_S:-560}
PY=${PYTHON:-python}
STEPS="--warmup 3 --steps 10"

if [ "${BENCH_SMOKE:-0}" = 1 ]; then  # the same commands at demo size on a CPU, to catch bugs first
  PRE=(--workload demo --batch 4)
  FT=(--workload demo-finetune --batch 4)
  # the r50/x152 configs' CNN (trained, frozen batch norm) and remat
  X152=(--workload demo --batch 4 --set model.cnn.frozen=false --set model.cnn.norm=frozen_bn --set model.remat=true)
  INF=(--workload demo --latency-iters 2 --pairs-steps 2 --pairs-batch 32 --cache-images 8)
  MAXB=(--workload demo --batch 2 --max-batch-limit 8)
  STEPS="--warmup 1 --steps 2"
else
  B=${BATCH:-16}  # BATCH / X152_BATCH override (X152 at 600x1024 holds the most activations per example)
  # The configs as the trainer reads them (bfloat16, remat on); EXTRA="--set model.remat=false" and the like
  # apply to every step.
  PRE=(--workload pretrain-r50 --batch "$B" ${EXTRA:-})
  FT=(--workload finetune-r50 --batch "$B" ${EXTRA:-})
  X152=(--workload pretrain-x152 --batch "${X152_BATCH:-$B}" ${EXTRA:-})
  INF=(--workload r50 --latency-iters 20 --pairs-batch 512 --cache-images 64 --encode-batch 16 ${EXTRA:-})
  MAXB=(--workload pretrain-r50 --batch 64 --max-batch-granularity 16 ${EXTRA:-})
fi

{
  date -u
  nvidia-smi || true
  "$PY" -c "import sys; print(sys.version)"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|ml.collections|torch|torchvision|transformers|numpy|nvidia-cudnn)' || true
  "$PY" -c "import jax; print(jax.devices())" || true
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.version.cuda)" || true
  # What the benchmarks import, and proof that grain / tensorflow_datasets are not among it.
  "$PY" -c "import sys; import pixelbert_jax.models, pixelbert_jax.optim, pixelbert_jax.tasks.pretrain, pixelbert_jax.convert.torch_model, pixelbert_jax.convert.torch_reference; bad = [m for m in ('grain', 'tensorflow_datasets', 'tensorflow') if m in sys.modules]; print('imports ok; data-stack modules loaded:', bad)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
: > "$OUT/status.txt"

left() { echo $((BUDGET - SECONDS)); }

# run NAME CAP RESERVE COMMAND...: at most CAP seconds, and never into the RESERVE seconds kept for the
# steps after it (each later step of (a)-(d) keeps 60 s); output to $OUT/NAME.log.
run() {
  local name=$1 cap=$2 reserve=$3 t
  shift 3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" ${name%%_*} "* ]]; then
    echo "$name: not in ONLY=$ONLY" | tee -a "$OUT/status.txt"
    return
  fi
  t=$(( $(left) - reserve ))
  [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 30 ]; then
    echo "$name: skipped (${SECONDS}s of the ${BUDGET}s budget used)" | tee -a "$OUT/status.txt"
    return
  fi
  local t0=$SECONDS
  timeout -k 15 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - t0))s (limit ${t}s)" | tee -a "$OUT/status.txt"
}

# Measured (s): JAX set-up 9-36 (init on the host CPU), compile 37-69; torch eager set-up + first step
# 13-31; torch.compile of pretrain-r50 > 170 (unfinished). One max-batch try compiles for ~100 s. Order:
# what has no figure yet first (session 4 measured (b), (c), (d) and (a) without torch.compile; (g) is new).
FW=jax,torch,torch-compile
[ "${SKIP_COMPILE:-0}" = 1 ] && FW=jax,torch
run a_train_pretrain-r50 420 100 "$PY" -m bench.train_step "${PRE[@]}" --frameworks "$FW" \
  $STEPS --worker-timeout 400 --profile /tmp/prof_a --json "$OUT/a_train_pretrain-r50.json"
# (e) from batch 64 (32 fits: 28.6 GiB at 251 img/s); MAXB_MEM_FRACTION=0.55 on an H200 keeps JAX to about
# an H100's 80 GB. The JSON keeps every try, so a timeout still tells the bracket.
run e_max_batch-r50 300 0 env XLA_PYTHON_CLIENT_MEM_FRACTION="${MAXB_MEM_FRACTION:-0.95}" "$PY" \
  -m bench.train_step "${MAXB[@]}" --max-batch --json "$OUT/e_max_batch-r50.json"
run d_inference-r50 130 0 "$PY" -m bench.inference "${INF[@]}" --frameworks jax,torch \
  --worker-timeout 100 --profile /tmp/prof_d --json "$OUT/d_inference-r50.json"
if [ "${BENCH_SMOKE:-0}" = 1 ]; then ATT=dot_product; else ATT=cudnn; fi  # cuDNN: GPU and bf16 only
run g_inference-r50-$ATT 70 0 "$PY" -m bench.inference "${INF[@]}" --frameworks jax --attention $ATT \
  --worker-timeout 60 --profile /tmp/prof_g --json "$OUT/g_inference-r50-$ATT.json"
run b_train_finetune-r50 200 0 "$PY" -m bench.train_step "${FT[@]}" --frameworks jax,torch \
  $STEPS --worker-timeout 150 --json "$OUT/b_train_finetune-r50.json"
run c_train_pretrain-x152 200 0 "$PY" -m bench.train_step "${X152[@]}" --frameworks jax,torch \
  $STEPS --worker-timeout 150 --json "$OUT/c_train_pretrain-x152.json"
run f_train_pretrain-r50-cnn_cpu 120 0 "$PY" -m bench.train_step "${PRE[@]}" --frameworks jax --set model.cnn.impl=cpu \
  $STEPS --worker-timeout 110 --json "$OUT/f_train_pretrain-r50-cnn_cpu.json"

# The tables of every step in one file.
for f in "$OUT"/[a-g]_*.log; do
  [ -f "$f" ] || continue
  echo "## $(basename "$f" .log)"
  sed -n '/^### /,$p' "$f"
  echo
done > "$OUT/summary.md"
grep -h "^max-batch\|^max batch\|^at batch" "$OUT"/e_*.log >> "$OUT/summary.md" 2>/dev/null
# The device tool brings back at most 8 files: the logs and JSONs travel as one archive.
tar -C "$OUT" -czf "$OUT/steps.tar.gz" $(cd "$OUT" && ls -- *.log *.json 2>/dev/null) && (cd "$OUT" && rm -f -- *.log *.json)
cat "$OUT/status.txt"
echo "total ${SECONDS}s; results in $OUT (summary.md, status.txt, env.txt, steps.tar.gz)"
