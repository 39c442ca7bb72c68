#!/usr/bin/env bash
# Several CPU processes on this machine form one JAX job: a rehearsal of a
# multi-host run (each process reads its own data shard, all save checkpoints
# together, process 0 writes logs) without a cluster.
#
#   launch/local_cpu.sh [diverse_cfg.main flags...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_cpu.sh --stage=pretrain \
#       --config=configs/essen.py:smoke --workdir=/tmp/mp
#
# Variables (environment):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process, via
#                        --xla_force_host_platform_device_count (default 4)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               interpreter (default: .venv/bin/python if present, else python3)
#   LOG_DIR              where process I writes process_I.log (default: a fresh temp dir);
#                        process 0's output also goes to this terminal
#   TIMEOUT_S            seconds for all processes to join (--distributed_timeout_s; default 120)
#
# Waits for all processes. If one fails, the others are stopped and the script
# exits with the failed process's status (and prints the tail of its log).
set -euo pipefail

cd "$(dirname "$0")/.."
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
TIMEOUT_S=${TIMEOUT_S:-120}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${PORT:-}" ]]; then
  # Bind port 0 and release it: the kernel's choice of a currently free port.
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
LOG_DIR=${LOG_DIR:-$(mktemp -d -t diverse_cfg_local.XXXXXX)}
mkdir -p "$LOG_DIR"

echo "local_cpu: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator" \
     "127.0.0.1:$PORT, logs in $LOG_DIR" >&2

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOG_DIR/process_$i.log"
  env XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
      JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 \
      "$PYTHON" -m diverse_cfg.main "$@" --distributed=explicit \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" --distributed_timeout_s="$TIMEOUT_S" >"$log" 2>&1 &
  pids+=($!)
done
if [[ $NUM_PROCESSES -gt 0 ]]; then
  tail -n +1 -f "$LOG_DIR/process_0.log" --pid="${pids[0]}" >&2 &
fi

# Reap processes as they end; the first failure stops the rest.
status=0
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  finished=''
  if wait -n -p finished "${live[@]}"; then rc=0; else rc=$?; fi
  [[ -n "$finished" ]] || break  # nothing left to wait for
  rest=()
  for pid in "${live[@]}"; do [[ $pid == "$finished" ]] || rest+=("$pid"); done
  live=("${rest[@]}")
  if ((rc != 0)) && ((status == 0)); then
    status=$rc
    for ((i = 0; i < NUM_PROCESSES; i++)); do
      [[ ${pids[$i]} == "$finished" ]] && failed=$i
    done
    echo "local_cpu: process $failed (pid $finished) failed with status $rc; stopping the" \
         "others. The end of $LOG_DIR/process_$failed.log:" >&2
    tail -n 20 "$LOG_DIR/process_$failed.log" >&2 || true
    stop_all
  fi
done
wait 2>/dev/null || true
if ((status == 0)); then
  echo "local_cpu: all $NUM_PROCESSES processes finished" >&2
fi
exit "$status"
