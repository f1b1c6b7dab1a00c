#!/usr/bin/env bash
# One GPU benchmark run for one H100 or H200 (issue P item 3), meant to end in under 5 minutes.
#
#   benchmarks/gpu.sh [OUT_DIR]          (default: $OUT, else gpu_out)
#   GPU_SMOKE=1 benchmarks/gpu.sh DIR    (tiny sizes on any backend: checks the script itself)
#
# It runs from the repository root with the machine's own python3 and JAX. Packages that
# machine lacks (grain, array-record, portpicker, ml-collections) are installed from wheels in
# .whl/ (git-ignored; fetch them on a networked machine with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 array-record==0.8.6 portpicker ml-collections==1.1.0
# and carry .whl along). Nothing is fetched at run time.
#
# Each benchmark prints one JSON line last; that line lands in OUT_DIR/<name>.json, the whole
# output in OUT_DIR/<name>.log, and OUT_DIR/summary.json gathers them with the GPU's name.
#   sampler  decode tokens/s of the KV-cache sampler (SmolLM2-135M shape, bf16) against the
#            HBM roofline (target >= 25%)
#   train    training MFU of a ~1B Llama shape (llama_1b preset, bf16, remat of dots) on one GPU
#            (target >= 45%)
#   rl       one GRPO update against one SFT step, and rollout tokens/s (SmolLM2 shape)
#   dream    dreams scored per second, vmapped against a Python loop of the same compiled
#            per-dream function (target >= 5x on an accelerator)
#   growth   grow onto the device against a plain copy of the same bytes (target <= 2x)
# Not in it: the seeding step against an SFT step at scale (the demo's report measures it on
# the tiny model).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT_DIR"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # every benchmark is its own process
T=${BENCH_TIMEOUT:-150}

if ! $PY -c "import grain, ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps .whl/*.whl || exit 1
  else
    echo "gpu.sh: grain / ml_collections missing and no wheels in .whl/" >&2
    exit 1
  fi
fi
$PY -c "import sleep_jax.train.step, sleep_jax.dream.inner, sleep_jax.grow" || exit 1

GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
GPU=${GPU:-$($PY -c "import jax; print(jax.devices()[0].device_kind)")}
case "$GPU" in
  *H200*) HBM=4800; PEAK=989 ;;   # GB/s, dense bf16 TFLOP/s (NVIDIA H200 SXM datasheet)
  *H100*) HBM=3350; PEAK=989 ;;   # H100 SXM datasheet
  *) HBM=3350; PEAK=989 ;;
esac
echo "gpu.sh: $GPU (HBM $HBM GB/s, peak $PEAK TFLOP/s bf16); outputs in $OUT_DIR"

if [ "${GPU_SMOKE:-0}" = 1 ]; then
  SAMPLER=(--preset tiny --batches 1,4 --new-tokens 16 --no-hf)
  TRAIN=(--preset tiny --meshes fsdp=-1 --batch 8 --seq 32 --steps 3 --no-hf)
  RL=(--preset tiny --mesh fsdp=-1 --prompts 2 --group 2 --prompt-len 8 --new-tokens 8 --repeats 2)
  DREAM=(--preset tiny --dreams 4 --tokens 16 --steps 2 --repeats 2)
  GROWTH=(--sizes tiny --pairs "fsdp=-1>fsdp=-1" --repeats 2)
else
  SAMPLER=(--preset smollm2_135m --batches 1,64,256 --new-tokens 256 --dtype bfloat16
           --hbm-gbps "$HBM" --no-hf)
  TRAIN=(--preset llama_1b --meshes fsdp=-1 --batch 4 --seq 2048 --steps 10 --dtype bfloat16
         --remat dots --peak-tflops "$PEAK" --no-hf)
  RL=(--preset smollm2_135m --mesh fsdp=-1 --prompts 16 --group 8 --prompt-len 64
      --new-tokens 64)
  DREAM=(--preset smollm2_135m --dreams 16 --tokens 128 --steps 4)
  GROWTH=(--sizes tiny,mid --pairs "fsdp=-1>fsdp=-1")
fi

run() {
  local name=$1; shift
  local t0=$SECONDS
  timeout "$T" $PY "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then
    tail -n 1 "$OUT_DIR/$name.log" > "$OUT_DIR/$name.json"
  else
    echo "{\"failed\": $rc}" > "$OUT_DIR/$name.json"
  fi
  echo "gpu.sh: $name rc $rc in $((SECONDS - t0)) s"
}

run sampler benchmarks/sampler.py "${SAMPLER[@]}"
run train benchmarks/train_throughput.py "${TRAIN[@]}"
run rl benchmarks/rl.py "${RL[@]}"
run dream benchmarks/dream.py "${DREAM[@]}"
run growth benchmarks/growth.py "${GROWTH[@]}"

$PY - "$OUT_DIR" "$GPU" <<'EOF'
import json, os, sys
out, gpu = sys.argv[1], sys.argv[2]
summary = {"gpu": gpu}
for name in ("sampler", "train", "rl", "dream", "growth"):
    try:
        summary[name] = json.load(open(os.path.join(out, f"{name}.json")))
    except (OSError, ValueError) as e:
        summary[name] = {"unreadable": str(e)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: ("ok" if isinstance(v, dict) and "failed" not in v
                      and "unreadable" not in v else v) for k, v in summary.items()}))
EOF
