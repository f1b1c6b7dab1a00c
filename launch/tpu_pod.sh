#!/usr/bin/env bash
# Run one sleep-jax command on every worker of a Cloud TPU VM slice (a pod).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--accelerator v5litepod-16] [--version V]
#       [--project P] [--repo URL] [--ref REF] [--workers N] [--coordinator IP] [--port 8476]
#       [--logdir DIR] [--dir REPO_DIR_ON_WORKERS] [--dry-run] -- sleep-jax train --config configs/train.py:tiny --workdir W
#
# Steps (as MaxText's multihost_runner does them):
#   1. create the slice unless it exists (gcloud compute tpus tpu-vm describe || create);
#   2. on all workers (--worker=all): stop stale holders of the TPU (processes holding
#      /dev/accel* or /dev/vfio/*, and libtpu's lock file);
#   3. on all workers: clone or update the repo at REF and `pip install -e .` with jax[tpu];
#   4. on each worker i in parallel: the same command with TPU_WORKER_ID=i,
#      SLEEP_JAX_NUM_PROCESSES=N and SLEEP_JAX_COORDINATOR=<worker 0's internal IP>:PORT
#      (sleep_jax.runtime reads them), its output in DIR/worker-i.log; the script exits non-zero
#      when any worker fails, naming it.
# The workdir must be a directory every worker sees (a GCS FUSE mount, Filestore, NFS): orbax
# writes each worker's checkpoint shards into it and process 0 the metrics.
# --dry-run prints every command instead of running it (no gcloud call); the line
# "worker-command: ..." is the per-worker command, with $TPU_WORKER_ID for the worker's id.
set -euo pipefail

TPU="" ZONE="" PROJECT="" ACCEL="v5litepod-16" VERSION="v2-alpha-tpuv5-lite"
REPO="" REF="" WORKERS="" COORD="" PORT=8476 LOGDIR="" DRY=0 DIR="~/sleep_jax"
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --coordinator) COORD="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --logdir) LOGDIR="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no command: ... -- sleep-jax <command> ..." >&2; usage; }
[[ "$1" == "sleep-jax" ]] || { echo "tpu_pod.sh: the command must start with sleep-jax, got $1" >&2; exit 2; }
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "tpu_pod.sh: --tpu and --zone are required" >&2; exit 2; }
HERE="$(cd "$(dirname "$0")/.." && pwd)"
REPO="${REPO:-$(git -C "$HERE" remote get-url origin 2>/dev/null || echo "<repo-url>")}"
REF="${REF:-$(git -C "$HERE" rev-parse HEAD 2>/dev/null || echo main)}"
LOGDIR="${LOGDIR:-logs/$TPU-$(date +%Y%m%d-%H%M%S)}"
G=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE"); [[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")

quote() {  # shell words, single-quoted where needed (readable and re-runnable)
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {  # print, or run, one command
  if [[ $DRY == 1 ]]; then quote "$@"; else "$@"; fi
}

if [[ $DRY == 1 ]]; then
  echo "${G[*]} describe $TPU ${LOC[*]} || ${G[*]} create $TPU ${LOC[*]} --accelerator-type $ACCEL --version $VERSION"
  WORKERS="${WORKERS:-<workers>}"; COORD="${COORD:-<worker-0-ip>}"
else
  "${G[@]}" describe "$TPU" "${LOC[@]}" >/dev/null 2>&1 || \
    "${G[@]}" create "$TPU" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION"
  IPS="$("${G[@]}" describe "$TPU" "${LOC[@]}" --format='value(networkEndpoints[].ipAddress)')"
  IFS=';, ' read -r -a IPA <<< "$IPS"
  WORKERS="${WORKERS:-${#IPA[@]}}"; COORD="${COORD:-${IPA[0]}}"
fi

KILL='sudo fuser -k -9 /dev/accel* /dev/vfio/* 2>/dev/null; sudo rm -f /tmp/libtpu_lockfile; true'
INSTALL="set -e; if [ -d $DIR/.git ]; then git -C $DIR fetch -q origin; else git clone -q $REPO $DIR; fi; \
git -C $DIR checkout -q $REF; pip install -q -c $DIR/constraints.txt 'jax[tpu]' -e $DIR"
QUOTED="$(quote "$@")"
WORKER_CMD="cd $DIR && SLEEP_JAX_NUM_PROCESSES=$WORKERS SLEEP_JAX_COORDINATOR=$COORD:$PORT \
TPU_WORKER_ID=\$TPU_WORKER_ID $QUOTED"

run "${G[@]}" ssh "$TPU" "${LOC[@]}" --worker=all --command "$KILL"
run "${G[@]}" ssh "$TPU" "${LOC[@]}" --worker=all --command "$INSTALL"
echo "worker-command: $WORKER_CMD"
if [[ $DRY == 1 ]]; then
  echo "# then for each worker i: ${G[*]} ssh $TPU ${LOC[*]} --worker=i --command 'TPU_WORKER_ID=i; <worker-command>' > $LOGDIR/worker-i.log"
  exit 0
fi
mkdir -p "$LOGDIR"
PIDS=()
for ((i = 0; i < WORKERS; i++)); do
  "${G[@]}" ssh "$TPU" "${LOC[@]}" --worker="$i" \
    --command "TPU_WORKER_ID=$i; $WORKER_CMD" > "$LOGDIR/worker-$i.log" 2>&1 &
  PIDS+=($!)
done
FAIL=0
for ((i = 0; i < WORKERS; i++)); do
  if ! wait "${PIDS[$i]}"; then echo "tpu_pod.sh: worker $i failed: see $LOGDIR/worker-$i.log" >&2; FAIL=1; fi
done
[[ $FAIL == 0 ]] && echo "tpu_pod.sh: all $WORKERS workers done; logs in $LOGDIR"
exit $FAIL
