#!/usr/bin/env bash
# One diverse_cfg stage on every worker of a Cloud TPU VM (a pod slice or a single host).
#
#   TPU_NAME=dcfg ZONE=us-west4-a BUCKET=gs://my-bucket/diverse_cfg \
#     launch/tpu_pod.sh --stage=pretrain --config=configs/essen.py:pod
#   TPU_NAME=dcfg ZONE=us-west4-a BUCKET=gs://my-bucket/diverse_cfg \
#     launch/tpu_pod.sh --stage=all --config=configs/essen.py:pod
#
# What it does, in order (each step is skipped when already done):
#   1. creates the TPU VM unless it exists (gcloud compute tpus tpu-vm create);
#   2. puts the code on every worker: a tarball of this checkout's tracked files
#      (CODE=copy) or a pip install of CODE (e.g. a git URL), into a venv with jax[tpu];
#   3. mounts BUCKET with Cloud Storage FUSE at MOUNT on every worker, so that the
#      data dir (BUCKET/data) and the work dir (BUCKET/runs/RUN) are the same
#      directory tree on all hosts (the code reads and writes them with plain file
#      I/O: metrics, reports, the dataset's ArrayRecord files; Orbax's checkpoint
#      finalisation renames a directory, which --rename-dir-limit permits);
#   4. runs the same command on all workers at once (--worker=all) with
#      --distributed=auto: JAX reads the pod's topology from the TPU metadata and
#      process 0 coordinates. Process 0 builds the dataset on first use; the others
#      wait for it.
#
# Variables (environment):
#   TPU_NAME          TPU VM name                                      (required)
#   ZONE              its zone                                         (required)
#   BUCKET            gs://bucket[/prefix] for data/ and runs/         (required)
#   PROJECT           gcloud project (default: gcloud's current one)
#   ACCELERATOR_TYPE  when creating: v5litepod-64, v4-32, ...         (default v5litepod-64)
#   RUNTIME_VERSION   when creating: the TPU VM image                  (default v2-alpha-tpuv5-lite;
#                     tpu-ubuntu2204-base for v4 / v5p)
#   SPOT              1: create a spot (preemptible) VM; the run resumes from its
#                     last checkpoint when relaunched                  (default 0)
#   RUN               run name: the work dir is BUCKET/runs/RUN        (default essen)
#   CODE              'copy': install this checkout (editable); else a pip requirement
#                     (e.g. git+https://github.com/you/diverse_cfg@v1) installed instead,
#                     with configs/ still copied from here         (default copy)
#   MOUNT             mount point of BUCKET on the workers             (default /mnt/diverse_cfg)
#   TIMEOUT_S         --distributed_timeout_s: all hosts must join    (default 600)
#   DELETE_AFTER      1: delete the TPU VM when the command ends       (default 0)
#   DRY_RUN           1: print the gcloud commands instead of running them
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET=gs://bucket[/prefix]}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
SPOT=${SPOT:-0}
RUN=${RUN:-essen}
CODE=${CODE:-copy}
MOUNT=${MOUNT:-/mnt/diverse_cfg}
TIMEOUT_S=${TIMEOUT_S:-600}
DELETE_AFTER=${DELETE_AFTER:-0}
DRY_RUN=${DRY_RUN:-0}
[[ $# -gt 0 ]] || { echo "usage: launch/tpu_pod.sh --stage=STAGE --config=FILE[:preset] [flags]" >&2; exit 2; }
[[ $BUCKET == gs://* ]] || { echo "BUCKET must start with gs://, got $BUCKET" >&2; exit 2; }

cd "$(dirname "$0")/.."
bucket_path=${BUCKET#gs://}
bucket_name=${bucket_path%%/*}
bucket_prefix=${bucket_path#"$bucket_name"}
bucket_prefix=${bucket_prefix#/}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

run() {  # runs (or, with DRY_RUN=1, prints) one command
  if [[ $DRY_RUN == 1 ]]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi
}
on_all_workers() {
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

# 1. The VM.
if [[ $DRY_RUN == 1 ]] || ! "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ $SPOT == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi
if [[ $DELETE_AFTER == 1 ]]; then
  trap 'run "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet' EXIT
fi

# 2. The code, in a venv on every worker. The checkout's files (tracked and new,
# not ignored: no venv, no work dirs) always travel, for configs/.
archive=$(mktemp -t diverse_cfg_code.XXXXXX.tar.gz)
git ls-files -z --cached --others --exclude-standard | tar --null -czf "$archive" -T -
run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:diverse_cfg.tar.gz" "${where[@]}" --worker=all
rm -f "$archive"
venv='$HOME/diverse_cfg_venv'
setup="python3 -m venv $venv && $venv/bin/pip install --quiet --upgrade pip"
if [[ $CODE == copy ]]; then
  code_dir='$HOME/diverse_cfg'
  setup+=" && rm -rf $code_dir && mkdir -p $code_dir && tar -xzf \$HOME/diverse_cfg.tar.gz -C $code_dir"
  setup+=" && $venv/bin/pip install --quiet -e $code_dir 'jax[tpu]'"
else  # the package from CODE; only configs/ from the checkout (so nothing shadows the package)
  code_dir='$HOME'
  setup+=" && rm -rf \$HOME/configs && tar -xzf \$HOME/diverse_cfg.tar.gz -C \$HOME configs"
  setup+=" && $venv/bin/pip install --quiet $(printf '%q' "$CODE") 'jax[tpu]'"
fi
on_all_workers "$setup"

# 3. The bucket, mounted at the same path on every worker.
only_dir=()
[[ -n $bucket_prefix ]] && only_dir=(--only-dir "$bucket_prefix")
mount_cmd="if ! mountpoint -q $MOUNT; then"
mount_cmd+=" (command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s);"
mount_cmd+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\""
mount_cmd+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
mount_cmd+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
mount_cmd+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse))"
mount_cmd+=" && sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT"
mount_cmd+=" && gcsfuse --implicit-dirs --rename-dir-limit=200000 ${only_dir[*]} $bucket_name $MOUNT; fi"
on_all_workers "$mount_cmd"

# 4. The same command on every worker; JAX finds its peers from the TPU metadata.
args=$(printf '%q ' "$@")
on_all_workers "cd $code_dir && $venv/bin/python -m diverse_cfg.main $args \
--distributed=auto --distributed_timeout_s=$TIMEOUT_S \
--workdir=$MOUNT/runs/$RUN --config.data.data_dir=$MOUNT/data"
