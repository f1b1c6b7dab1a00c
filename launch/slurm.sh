#!/usr/bin/env bash
# Submit a sleep-jax command to Slurm on N GPU nodes (launch/slurm.sbatch).
#
#   launch/slurm.sh [--nodes 2] [--gpus-per-node 8] [--partition P] [--time 04:00:00]
#       [--account A] [--dry-run] -- sleep-jax train --config configs/train.py:tiny --workdir W
#
# Per-worker logs: logs/sleep-jax-<jobid>/worker-<task>.log. --dry-run prints the sbatch line
# and the per-worker command (what srun runs on each node) instead of submitting.
set -euo pipefail
NODES=2 GPUS=8 PART="" TIME="" ACCOUNT="" DRY=0
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --partition) PART="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "slurm.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "slurm.sh: no command: ... -- sleep-jax <command> ..." >&2; usage; }
[[ "$1" == "sleep-jax" ]] || { echo "slurm.sh: the command must start with sleep-jax, got $1" >&2; exit 2; }
HERE="$(cd "$(dirname "$0")" && pwd)"
ARGS=(sbatch --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS")
[[ -n "$PART" ]] && ARGS+=(--partition="$PART")
[[ -n "$TIME" ]] && ARGS+=(--time="$TIME")
[[ -n "$ACCOUNT" ]] && ARGS+=(--account="$ACCOUNT")
ARGS+=("$HERE/slurm.sbatch" "$@")
if [[ $DRY == 1 ]]; then
  printf '%q ' "${ARGS[@]}"; echo
  echo "worker-command: $(printf '%q ' "$@")"
else
  mkdir -p logs
  "${ARGS[@]}"
fi
