#!/usr/bin/env bash
# Start (or delete) a t2x training job on Kubernetes: an Indexed Job of one pod per host
# plus a headless Service for the coordinator (launch/kubernetes/t2x-job.yaml).
#
#   launch/k8s.sh apply    # start the job (after a failure or preemption, delete and apply to resume)
#   launch/k8s.sh delete   # delete it (pods get SIGTERM: they checkpoint and exit)
#   launch/k8s.sh render   # print the manifest
#
# Environment (required; nothing is hard-coded):
#   T2X_JOB          job name, also the run directory /runs/$T2X_JOB
#   T2X_IMAGE        container image with t2x installed (launch/Dockerfile builds one)
#   T2X_CONFIG       config path inside the image, e.g. configs/gpt2_small.yaml
#   T2X_NUM_HOSTS    pods (hosts) in the job
#   T2X_RUNS_PVC     ReadWriteMany PersistentVolumeClaim mounted at /runs
# Optional:
#   T2X_ACCELERATOR       resource name (default nvidia.com/gpu; google.com/tpu on TPU node pools)
#   T2X_DEVICES_PER_HOST  accelerators per pod (default 8)
#   T2X_OVERRIDES         extra key=value config overrides, space separated
set -euo pipefail

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[[ $# -eq 1 ]] || usage
action=$1
missing=()
for var in T2X_JOB T2X_IMAGE T2X_CONFIG T2X_NUM_HOSTS T2X_RUNS_PVC; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if ((${#missing[@]})); then
  echo "k8s.sh: set ${missing[*]}" >&2
  usage
fi
[[ "$T2X_NUM_HOSTS" =~ ^[1-9][0-9]*$ ]] || { echo "k8s.sh: T2X_NUM_HOSTS must be a positive integer" >&2; exit 2; }
export T2X_ACCELERATOR=${T2X_ACCELERATOR:-nvidia.com/gpu}
export T2X_DEVICES_PER_HOST=${T2X_DEVICES_PER_HOST:-8}
export T2X_OVERRIDES=${T2X_OVERRIDES:-}

manifest=$(python3 - "$(dirname "$0")/kubernetes/t2x-job.yaml" <<'PY'
import os, re, sys  # fill ${T2X_...}; Kubernetes' own $(VAR) references stay
print(re.sub(r"\$\{(T2X_[A-Z_]+)\}", lambda m: os.environ[m.group(1)], open(sys.argv[1]).read()))
PY
)
case "$action" in
  render) echo "$manifest" ;;
  apply) echo "$manifest" | kubectl apply -f - ;;
  delete) echo "$manifest" | kubectl delete --ignore-not-found -f - ;;
  *) usage ;;
esac
