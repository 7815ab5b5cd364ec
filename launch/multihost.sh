#!/usr/bin/env bash
# Multi-host training with an explicit coordinator (no SLURM, no Cloud TPU auto-detection).
#
# One process per host; run the SAME command on every host, each with its own PROCESS_ID:
#   COORDINATOR=10.0.0.1:8476 NUM_PROCESSES=4 PROCESS_ID=0 \
#     launch/multihost.sh .venv/bin/python -m ultralong_jax.train --config=... --workdir=/shared/run
# The command gets --coordinator_address=$COORDINATOR --num_processes=$NUM_PROCESSES
# --process_id=$PROCESS_ID appended (ultralong_jax.train's flags). COORDINATOR is host:port of
# process 0, reachable from every host (process 0 listens on that port; open it in the firewall).
#
# N processes on this machine, the machine's CPU devices split between them (a multi-host run in
# miniature: what tests/launch/test_launch.py uses to check multi-host equivalence):
#   launch/multihost.sh --local 2 [--devices-per-process 4] [--log-dir DIR] -- COMMAND...
# Each process gets JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count in XLA_FLAGS, a
# free port on localhost as coordinator, its log in DIR/process_<i>.log and its pid in
# DIR/process_<i>.pid (default DIR: runs/multihost-<timestamp>, git-ignored). SIGTERM to the launcher goes to
# every process. If one process fails the others are stopped (they would otherwise
# wait at the next collective); the exit status is the first failure's.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "multihost.sh: error: $*" >&2; exit 2; }

local_n=0 per_process="" log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --local) [[ $# -ge 2 ]] || die "--local needs a process count"; local_n="$2"; shift 2 ;;
    --devices-per-process) [[ $# -ge 2 ]] || die "--devices-per-process needs a number"
                           per_process="$2"; shift 2 ;;
    --log-dir) [[ $# -ge 2 ]] || die "--log-dir needs a directory"; log_dir="$2"; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given (e.g. .venv/bin/python -m ultralong_jax.train --config=...)"

if [[ "$local_n" == 0 ]]; then
  for var in COORDINATOR NUM_PROCESSES PROCESS_ID; do
    [[ -n "${!var:-}" ]] || die "$var is not set. Set COORDINATOR=host:port (process 0's address), \
NUM_PROCESSES (the host count) and PROCESS_ID (0..NUM_PROCESSES-1, unique per host), or use \
--local N for N processes on this machine."
  done
  [[ "$COORDINATOR" == *:* ]] || die "COORDINATOR=$COORDINATOR must be host:port"
  [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$PROCESS_ID" =~ ^[0-9]+$ ]] || \
    die "NUM_PROCESSES=$NUM_PROCESSES and PROCESS_ID=$PROCESS_ID must be whole numbers"
  (( PROCESS_ID >= 0 && PROCESS_ID < NUM_PROCESSES )) || \
    die "PROCESS_ID=$PROCESS_ID must be in 0..$((NUM_PROCESSES - 1)) (NUM_PROCESSES=$NUM_PROCESSES)"
  export ULTRALONG_DISTRIBUTED=1
  exec "$@" --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
    --process_id="$PROCESS_ID"
fi

# --local N
[[ "$local_n" =~ ^[1-9][0-9]*$ ]] || die "--local $local_n: give a process count >= 1"
per_process="${per_process:-$(( 8 / local_n ))}"
[[ "$per_process" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be >= 1 (8 / $local_n is 0)"
log_dir="${log_dir:-runs/multihost-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$log_dir"
if command -v python3 >/dev/null 2>&1; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
else
  port=$(( 20000 + RANDOM % 20000 ))
fi
# Keep the caller's XLA flags, but this launcher decides the simulated device count.
base_flags=$(printf '%s\n' ${XLA_FLAGS:-} | grep -v -- '--xla_force_host_platform_device_count' \
             | tr '\n' ' ' || true)
echo "multihost.sh: $local_n processes x $per_process CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir/" >&2

pids=()
for (( i = 0; i < local_n; i++ )); do
  JAX_PLATFORMS=cpu ULTRALONG_DISTRIBUTED=1 \
    XLA_FLAGS="${base_flags}--xla_force_host_platform_device_count=${per_process}" \
    "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$local_n" --process_id="$i" \
    > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
  echo "$!" > "$log_dir/process_$i.pid"
done
# A SIGTERM/SIGINT for the launcher is one for every process (the loop saves, then exits).
trap 'for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done' TERM INT

status=0 stopped_at=0
running=("${pids[@]}")
while (( ${#running[@]} > 0 )); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    rc=0; wait "$pid" || rc=$?
    if (( rc != 0 && status == 0 )); then
      status=$rc
      echo "multihost.sh: a process exited with status $rc; stopping the others" >&2
      for other in "${pids[@]}"; do kill "$other" 2>/dev/null || true; done
      stopped_at=$SECONDS
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  # A process blocked in a collective with a dead peer never reaches its SIGTERM handler's save.
  if (( status != 0 && SECONDS - stopped_at > 10 )); then
    for pid in "${running[@]+"${running[@]}"}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  (( ${#running[@]} == 0 )) || sleep 1
done
for (( i = 0; i < local_n; i++ )); do
  if (( status != 0 )); then
    echo "--- $log_dir/process_$i.log (last lines)" >&2
    tail -n 15 "$log_dir/process_$i.log" >&2 || true
  fi
done
exit "$status"
