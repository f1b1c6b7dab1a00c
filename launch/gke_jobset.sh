#!/usr/bin/env bash
# Run one sleep-jax command on every host of a GKE TPU slice as a JobSet (XPK-compatible).
#
#   launch/gke_jobset.sh --name NAME --image IMAGE [--workers 4] [--accelerator tpu-v5-lite-podslice]
#       [--topology 4x4] [--chips-per-host 4] [--port 8476] [--init-timeout 300]
#       [--max-restarts 0] [--dry-run] -- sleep-jax train --config configs/train.py:tiny --workdir W
#
# Renders launch/gke_jobset.yaml (the image must have the package installed, e.g. built from
# this repo with `pip install -c constraints.txt 'jax[tpu]' .`) and applies it with kubectl;
# then `kubectl logs -f jobset/NAME` or `kubectl logs NAME-slice-0-<i>-...` per worker.
# --dry-run prints the manifest and the kubectl command instead (no cluster needed).
set -euo pipefail

NAME="" IMAGE="" WORKERS=4 ACCEL="tpu-v5-lite-podslice" TOPO="4x4" CHIPS=4 PORT=8476
TIMEOUT=300 RESTARTS=0 DRY=0
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --topology) TOPO="$2"; shift 2 ;;
    --chips-per-host) CHIPS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --init-timeout) TIMEOUT="$2"; shift 2 ;;
    --max-restarts) RESTARTS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "gke_jobset.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "gke_jobset.sh: no command: ... -- sleep-jax <command> ..." >&2; usage; }
[[ "$1" == "sleep-jax" ]] || { echo "gke_jobset.sh: the command must start with sleep-jax, got $1" >&2; exit 2; }
[[ -n "$NAME" && -n "$IMAGE" ]] || { echo "gke_jobset.sh: --name and --image are required" >&2; exit 2; }
HERE="$(cd "$(dirname "$0")" && pwd)"

# The command as a YAML flow list of JSON strings (valid YAML).
COMMAND="[$(for a in "$@"; do printf '%s, ' "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$a")"; done | sed 's/, $//')]"
render() {
  NAME="$NAME" IMAGE="$IMAGE" WORKERS="$WORKERS" TPU_ACCELERATOR="$ACCEL" TPU_TOPOLOGY="$TOPO" \
  CHIPS_PER_HOST="$CHIPS" PORT="$PORT" INIT_TIMEOUT="$TIMEOUT" MAX_RESTARTS="$RESTARTS" \
  COMMAND="$COMMAND" python3 -c '
import os, re, sys
text = open(sys.argv[1]).read()
print(re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m.group(1)], text), end="")' "$HERE/gke_jobset.yaml"
}

if [[ $DRY == 1 ]]; then
  render
  echo "# kubectl apply -f - (the manifest above)"
else
  render | kubectl apply -f -
  echo "gke_jobset.sh: submitted jobset/$NAME ($WORKERS workers); kubectl get jobset $NAME; kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$NAME --prefix"
fi
