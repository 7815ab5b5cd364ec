#!/usr/bin/env bash
# Cloud TPU VM slices: create (or queue for) a slice, copy this checkout to every worker, install,
# run the same command on all workers, fetch their logs, delete. Run from the repository root.
#
#   export TPU_NAME=ultralong-v5p ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-128
#   launch/tpu_vm.sh queue            # spot capacity through a queued resource; waits for ACTIVE
#   launch/tpu_vm.sh copy             # this checkout -> ~/ultralong-jax on every worker
#   launch/tpu_vm.sh setup            # launch/setup.sh + jax[tpu] on every worker
#   launch/tpu_vm.sh run -- .venv/bin/python -m ultralong_jax.train \
#       --config=configs/llama31_8b_stage1.py:1m --workdir=/mnt/gcs/runs/stage1_1m ...
#   launch/tpu_vm.sh logs             # every worker's logs -> runs/tpu-logs/$TPU_NAME/worker-<i>/
#   launch/tpu_vm.sh delete
#
# Subcommands: create | queue | wait | copy | setup | run -- CMD... | status | logs [DIR] | stop |
#              ssh CMD... | delete
#   create   gcloud compute tpus tpu-vm create (on-demand; SPOT=1 for a spot VM)
#   queue    gcloud compute tpus queued-resources create, CAPACITY=spot (default) | best-effort
#            (alpha track) | reserved | on-demand, then `wait`
#   wait     polls the queued resource until ACTIVE (fails on FAILED/SUSPENDED, after WAIT_TIMEOUT)
#   run      starts CMD with nohup on every worker (--worker=all) at once, in REMOTE_DIR, with
#            ULTRALONG_DISTRIBUTED=1 (jax.distributed.initialize() finds the slice through the TPU
#            metadata server); stdout+stderr to REMOTE_DIR/logs/RUN_NAME/<hostname>.log per worker
#   status   the last lines of each worker's log;  stop: SIGTERM (the loop saves, then exits)
#
# Settings (environment): TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE (v5p-128, v6e-256, ...)
# required; RUNTIME_VERSION (default by accelerator: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for
# v6e, v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4), QR_NAME (${TPU_NAME}-qr),
# CAPACITY, SPOT, REMOTE_DIR (ultralong-jax, under the remote home), RUN_NAME (train),
# NUM_WORKERS (for `logs`; default: asked from gcloud), WAIT_TIMEOUT (seconds, 7200),
# POLL_SECONDS (60). DRY_RUN=1 prints every gcloud command instead of running it.
set -euo pipefail

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR="${REMOTE_DIR:-ultralong-jax}"
RUN_NAME="${RUN_NAME:-train}"
QR_NAME="${QR_NAME:-${TPU_NAME:-}-qr}"

quote() {  # one word as a shell would need it: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (one line, quoted so that it can be pasted into a shell) under
# DRY_RUN=1.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local word line=""
    for word in "$@"; do line+="$(quote "$word") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

need() {  # need VAR... : every named setting is set
  local var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || die "$var is not set. Required: TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE \
(e.g. export TPU_NAME=ultralong-v5p ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-128)."
  done
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH. Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), \
run 'gcloud auth login', or use DRY_RUN=1 to print the commands."
  fi
}

runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then echo "$RUNTIME_VERSION"; return; fi
  case "$ACCELERATOR_TYPE" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION \
(see https://cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

where() { echo "--zone=$ZONE" "--project=$PROJECT"; }

on_all_workers() {  # on_all_workers 'remote shell command'
  # shellcheck disable=SC2046
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" $(where) --worker=all --command="$1"
}

cmd_create() {
  need TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  # shellcheck disable=SC2046
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" $(where) \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$(runtime_version)" "${extra[@]+"${extra[@]}"}"
}

cmd_queue() {
  need TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
  local track=() tier=()
  case "${CAPACITY:-spot}" in
    spot) tier=(--spot) ;;
    best-effort) track=(alpha); tier=(--best-effort) ;;  # only on gcloud's alpha track
    reserved) tier=(--reserved) ;;
    on-demand) tier=() ;;
    *) die "CAPACITY=${CAPACITY}: use spot, best-effort, reserved or on-demand" ;;
  esac
  # shellcheck disable=SC2046
  run_cmd gcloud "${track[@]+"${track[@]}"}" compute tpus queued-resources create "$QR_NAME" \
    --node-id="$TPU_NAME" $(where) --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$(runtime_version)" "${tier[@]+"${tier[@]}"}"
  cmd_wait
}

cmd_wait() {
  need TPU_NAME ZONE PROJECT
  local timeout="${WAIT_TIMEOUT:-7200}" poll="${POLL_SECONDS:-60}" start=$SECONDS state
  # shellcheck disable=SC2046
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" $(where)
                  --format="value(state.state)")
  if [[ "$DRY_RUN" == 1 ]]; then
    run_cmd "${describe[@]}"
    echo "# (repeated every ${poll}s until the state is ACTIVE; fails on FAILED or SUSPENDED)"
    return
  fi
  while true; do
    state=$("${describe[@]}")
    echo "tpu_vm.sh: queued resource $QR_NAME: $state ($(( SECONDS - start ))s)" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|SUSPENDING) die "queued resource $QR_NAME is $state; see \
'gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE --project=$PROJECT'" ;;
    esac
    (( SECONDS - start < timeout )) || die "queued resource $QR_NAME not ACTIVE after ${timeout}s \
(still $state); it stays queued: run 'launch/tpu_vm.sh wait' again, or 'delete' to give up."
    sleep "$poll"
  done
}

cmd_copy() {
  need TPU_NAME ZONE PROJECT
  local tarball="/tmp/ultralong-jax-${TPU_NAME}.tgz"
  # The checkout's tracked and untracked-but-not-ignored files: no .venv, no runs/.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "git ls-files -z --cached --others --exclude-standard | tar --null -czf $tarball -T -"
  else
    git rev-parse --show-toplevel >/dev/null 2>&1 || die "run from the ultralong-jax git checkout"
    git ls-files -z --cached --others --exclude-standard | tar --null -czf "$tarball" -T -
  fi
  # shellcheck disable=SC2046
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/" $(where) --worker=all
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$(basename "$tarball") -C ~/$REMOTE_DIR"
}

cmd_setup() {
  need TPU_NAME ZONE PROJECT
  # TPU VM images ship Python 3.10; ultralong-jax needs >= 3.12 (deadsnakes' build on Ubuntu).
  # jax[tpu] at the installed jax version adds libtpu.
  local remote
  remote="set -e; cd ~/$REMOTE_DIR; "
  remote+="if ! command -v python3.12 >/dev/null; then sudo add-apt-repository -y ppa:deadsnakes/ppa "
  remote+="&& sudo apt-get update -q && sudo apt-get install -y -q python3.12 python3.12-venv; fi; "
  remote+="bash launch/setup.sh; "
  remote+=".venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\"; "
  remote+=".venv/bin/python -c 'import jax; print(jax.device_count(), \"devices\")'"
  on_all_workers "$remote"
}

cmd_run() {
  need TPU_NAME ZONE PROJECT
  [[ "${1:-}" == "--" ]] && shift
  [[ $# -gt 0 ]] || die "run needs a command: launch/tpu_vm.sh run -- .venv/bin/python -m ultralong_jax.train ..."
  local quoted logs="logs/$RUN_NAME"
  quoted=$(printf '%q ' "$@")
  # Same command on every worker at once: JAX's multi-controller runtime needs all of them.
  on_all_workers "cd ~/$REMOTE_DIR && mkdir -p $logs && { ULTRALONG_DISTRIBUTED=1 nohup ${quoted}\
> $logs/\$(hostname).log 2>&1 < /dev/null & echo \$! > $logs/\$(hostname).pid; }"
  if [[ "$DRY_RUN" != 1 ]]; then
    echo "tpu_vm.sh: started on all workers; 'launch/tpu_vm.sh status' to watch, 'logs' to fetch" >&2
  fi
}

cmd_status() {
  need TPU_NAME ZONE PROJECT
  on_all_workers "tail -n 5 ~/$REMOTE_DIR/logs/$RUN_NAME/\$(hostname).log"
}

cmd_stop() {
  need TPU_NAME ZONE PROJECT
  on_all_workers "kill -TERM \$(cat ~/$REMOTE_DIR/logs/$RUN_NAME/\$(hostname).pid)"
}

cmd_logs() {
  need TPU_NAME ZONE PROJECT
  local dest="${1:-runs/tpu-logs/$TPU_NAME}" n="${NUM_WORKERS:-}" i
  if [[ -z "$n" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
      # shellcheck disable=SC2046
      run_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" $(where) --format="value(networkEndpoints.len())"
      n=1
      echo "# (the worker count comes from the describe above; NUM_WORKERS=$n assumed here)"
    else
      # shellcheck disable=SC2046
      n=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" $(where) --format="value(networkEndpoints.len())")
    fi
  fi
  for (( i = 0; i < n; i++ )); do
    run_cmd mkdir -p "$dest/worker-$i"
    # shellcheck disable=SC2046
    run_cmd gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:~/$REMOTE_DIR/logs/$RUN_NAME" \
      "$dest/worker-$i/" $(where) --worker="$i"
  done
  [[ "$DRY_RUN" == 1 ]] || echo "tpu_vm.sh: logs of $n workers in $dest/" >&2
}

cmd_ssh() {
  need TPU_NAME ZONE PROJECT
  [[ $# -gt 0 ]] || die "ssh needs a command to run on every worker"
  on_all_workers "$*"
}

cmd_delete() {
  need TPU_NAME ZONE PROJECT
  if [[ "${QUEUED:-auto}" == 1 ]] || { [[ "${QUEUED:-auto}" == auto ]] && [[ "$DRY_RUN" != 1 ]] &&
      gcloud compute tpus queued-resources describe "$QR_NAME" $(where) >/dev/null 2>&1; }; then
    # --force deletes the TPU VM the queued resource created, then the request itself.
    # shellcheck disable=SC2046
    run_cmd gcloud compute tpus queued-resources delete "$QR_NAME" $(where) --force --quiet
  else
    # shellcheck disable=SC2046
    run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" $(where) --quiet
  fi
}

[[ $# -gt 0 ]] || usage
sub="$1"; shift
case "$sub" in
  create|queue|wait|copy|setup|run|status|stop|logs|ssh|delete) "cmd_$sub" "$@" ;;
  -h|--help|help) usage ;;
  *) die "unknown subcommand '$sub'; use create, queue, wait, copy, setup, run, status, logs, stop, ssh or delete" ;;
esac
