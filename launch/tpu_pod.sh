#!/usr/bin/env bash
# Run a t2x training job on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh setup TPU_NAME                         # once: copy t2x, install it on every worker
#   launch/tpu_pod.sh train TPU_NAME CONFIG [key=value ...]  # train (rerun to resume)
#   launch/tpu_pod.sh stop  TPU_NAME                         # SIGTERM: checkpoint and exit on every worker
#
# Environment (required; nothing is hard-coded):
#   TPU_ZONE      e.g. us-central2-b
#   TPU_PROJECT   Google Cloud project
# Optional:
#   T2X_DIR       where t2x lives on the workers (default ~/t2x)
#
# Every worker runs the same command; JAX detects the pod and connects the workers.
# train.run_dir must be on a filesystem all workers see (a mounted Filestore or GCS
# bucket path); the config's paths are read on the workers.
set -euo pipefail

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
command=$1
tpu=$2
shift 2
[[ -n "${TPU_ZONE:-}" ]] || { echo "tpu_pod.sh: set TPU_ZONE" >&2; usage; }
[[ -n "${TPU_PROJECT:-}" ]] || { echo "tpu_pod.sh: set TPU_PROJECT" >&2; usage; }
command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud not found" >&2; exit 2; }
dir=${T2X_DIR:-'~/t2x'}
repo=$(cd "$(dirname "$0")/.." && pwd)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$TPU_ZONE" --project="$TPU_PROJECT" --worker=all --command="$1"
}

case "$command" in
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/t2x.tar.gz" \
      --zone="$TPU_ZONE" --project="$TPU_PROJECT" --worker=all
    on_all_workers "mkdir -p $dir && tar -xzf /tmp/t2x.tar.gz -C $dir && cd $dir && \
      python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    quoted=$(printf ' %q' "$@")
    # nohup: the job outlives the ssh session; logs go to $dir/train.log on each worker.
    on_all_workers "cd $dir && nohup .venv/bin/t2x train$quoted > train.log 2>&1 &"
    ;;
  stop)
    on_all_workers "pkill -TERM -f 't2x train' || true"
    ;;
  *)
    usage
    ;;
esac
