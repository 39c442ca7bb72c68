#!/usr/bin/env bash
# The benchmarks at a realistic size on one GPU, in one go (for the days a GPU machine is lent).
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Needs JAX with CUDA. Packages the GPU image may lack (ml-collections, grain, array-record,
# portpicker) can be carried as wheels in .whl/; they are installed into /tmp/site when present.
# Fetch them on a machine with the package index, for the GPU image's Python (3.12 so far):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ml-collections grain array-record portpicker
# Writes JSON and logs to OUT_DIR.
set -uo pipefail
OUT=${1:-/tmp/diverse_cfg_gpu}
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
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
python3 -m benchmarks.sampling --sizes=medium,large --batch=16,128 --repeats=5 \
  --growth_sizes=large --growth_batch=16 --json_out="$OUT/sampling.json" 2>&1 | tee "$OUT/sampling.log"
for size in gpu_medium gpu_large; do
  python3 -m benchmarks.train_step --size=$size --repeats=5 --json_out="$OUT/train_$size.json" \
    2>&1 | tee "$OUT/train_$size.log"
done
