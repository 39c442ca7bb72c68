#!/usr/bin/env bash
# The benchmarks at a realistic size on one GPU, in one go (for the days a GPU machine is lent).
#
#   bash benchmarks/gpu.sh OUT_DIR [STEPS]
#
# STEPS: a comma list of medium,sampling,large (default: all three, in that order). On an H100 the
# first two took 170 s and 150 s; gpu_large (403M params) took 305 s (its whole finetuning step
# compiles in ~41 s), so inside a 10-minute call give it a call of its own.
#
# Needs JAX with CUDA. Packages the GPU image may lack (ml-collections, grain, array-record,
# portpicker) can be carried as wheels in .whl/; they are installed into /tmp/site when present.
# Fetch them on a machine with the package index, for the GPU image's Python (3.12 so far):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ml-collections grain array-record portpicker
# Writes JSON and logs to OUT_DIR.
set -uo pipefail
OUT=${1:-/tmp/diverse_cfg_gpu}
STEPS=",${2:-medium,sampling,large},"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# Each benchmark has its own time limit (seconds, compilation included) so that one that runs long
# leaves the others their turn inside a lease.
if [[ $STEPS == *,medium,* ]]; then
  timeout 240 python3 -m benchmarks.train_step --size=gpu_medium --repeats=5 \
    --json_out="$OUT/train_gpu_medium.json" 2>&1 | tee "$OUT/train_gpu_medium.log"
fi
if [[ $STEPS == *,sampling,* ]]; then
  timeout 200 python3 -m benchmarks.sampling --sizes=large --batch=16,128 --repeats=5 \
    --growth_sizes=large --growth_batch=16 --json_out="$OUT/sampling.json" 2>&1 | tee "$OUT/sampling.log"
fi
if [[ $STEPS == *,large,* ]]; then
  timeout 540 python3 -m benchmarks.train_step --size=gpu_large --repeats=3 \
    --parts=pretrain,rollout,whole_step --json_out="$OUT/train_gpu_large.json" 2>&1 | tee "$OUT/train_gpu_large.log"
fi
