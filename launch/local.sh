#!/usr/bin/env bash
# Run one t2x training job as N processes on this machine, the way it runs on N hosts:
# each process owns its own devices and they meet through a coordinator on 127.0.0.1.
#
#   launch/local.sh N CONFIG [key=value ...]
#
# Environment:
#   T2X_CPU_DEVICES   CPU devices per process (default 1; ignored on GPU/TPU hosts)
#   T2X_PORT          coordinator port (default: a free one)
#   T2X               the t2x command (default: t2x on PATH)
#
# SIGTERM or SIGINT to this script is passed to every process: they finish the current
# step, save a checkpoint together and exit 0; running the same command resumes. If a
# process fails, the others are stopped and the script exits with its status.
set -uo pipefail

usage() {
  echo "usage: launch/local.sh N CONFIG [key=value ...]" >&2
  echo "  runs N t2x training processes on this machine as one multi-process job" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
num_processes=$1
config=$2
shift 2
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N must be a positive integer, got '$num_processes'" >&2; usage; }
[[ -f "$config" ]] || { echo "local.sh: config file not found: $config" >&2; usage; }

t2x_cmd=${T2X:-t2x}
if ! command -v "${t2x_cmd%% *}" >/dev/null 2>&1; then
  echo "local.sh: '$t2x_cmd' not found; install t2x (pip install -e .) or set T2X" >&2
  exit 2
fi
devices=${T2X_CPU_DEVICES:-1}
port=${T2X_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {  # preemption: every process checkpoints the same step and exits 0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap stop_all TERM INT

export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"  # the last one wins
for ((i = 0; i < num_processes; i++)); do
  args=(train "$config" "$@"
        "distributed.coordinator_address=127.0.0.1:$port"
        "distributed.num_processes=$num_processes"
        "distributed.process_id=$i")
  if [[ $i -eq 0 ]]; then
    $t2x_cmd "${args[@]}" &
  else  # the other processes only log warnings; tag their lines
    $t2x_cmd "${args[@]}" > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2) &
  fi
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=""
  wait -n -p finished "${running[@]}"
  code=$?
  [[ -n "$finished" ]] || continue  # a signal interrupted the wait; the processes carry on
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    echo "local.sh: process $finished exited with status $code; stopping the others" >&2
    for pid in "${running[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  fi
done
exit $status
