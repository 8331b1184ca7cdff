#!/usr/bin/env bash
# Everything a GPU machine should check, in one call, logs in the folder given:
#     bench/gpu_check.sh OUT
# 1. builds gradstats from source against the machine's torch (never a .so from elsewhere),
# 2. runs the whole test suite (the CUDA tests run there instead of skipping),
# 3. runs compute-sanitizer memcheck, racecheck, initcheck and synccheck over small CUDA cases that
#    reach every kernel (train and eval passes, both layouts, channel_moments, record, all dtypes),
# 4. runs the bench presets (fp32/fp16/bf16 x NCHW/channels_last) and the end-to-end step,
#    with JSON next to each log.
# Each step writes OUT/<step>.log; the script goes on after a failing step and ends with a
# summary line per step (and a non-zero exit status if any failed).
set -uo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_FOLDER}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
declare -a summary=()
status=0

step() {  # step NAME COMMAND...: run, log, remember the outcome
  local name="$1"; shift
  echo "== $name: $*" | tee "$out/$name.log"
  local start=$SECONDS
  "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-28s %s (%ds)' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - start)))")
  [ $rc -eq 0 ] || status=1
  tail -n 3 "$out/$name.log"
}

{ nvidia-smi; "$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; git rev-parse HEAD; } \
  >"$out/machine.log" 2>&1

step deps "$python" -m pip install --quiet pytest hypothesis expecttest scikit-learn matplotlib tqdm pillow ninja
step build env GRADSTATS_EXPECT_CUDA_BUILD=1 "$python" -m pip install --no-build-isolation --no-deps -v .
# From a folder outside the source tree, so the installed build is what gets imported.
run_tests() { (cd "$out" && GRADSTATS_EXPECT_CUDA_BUILD=1 "$python" -m pytest -q -p no:cacheprovider \
  --rootdir="$OLDPWD" "$OLDPWD/tests" "$@"); }
step tests run_tests

# Small CUDA cases: every pass kernel (train reduce, train grad_input, eval fused, moments),
# the finish and record kernels, NCHW / channels_last / H=W=1, every dtype, non-finite values.
SAN_CASES='cuda and (2x5x1x1 or 3x17x9x9 or 5x48x4x4 or 3x300x2x3) or (cuda and nonfinite) or (cuda and channel_moments) or (cuda and opcheck)'
sanitize() {
  local tool="$1"
  (cd "$out" && compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
    "$python" -m pytest -q -x -p no:cacheprovider --rootdir="$OLDPWD" \
    "$OLDPWD/tests/test_op.py" "$OLDPWD/tests/test_nonfinite.py" "$OLDPWD/tests/test_probe.py" -k "$SAN_CASES")
}
for tool in memcheck racecheck initcheck synccheck; do
  step "sanitizer_$tool" sanitize "$tool"
done

for dtype in float32 float16 bfloat16; do
  step "bench_resnet56_$dtype" "$python" -m gradstats bench --device cuda --preset resnet56-cifar \
    --both-layouts --dtype "$dtype" --repeats 50 --json "$out/bench_resnet56_$dtype.json"
  step "bench_resnet50_$dtype" "$python" -m gradstats bench --device cuda --preset resnet50 \
    --both-layouts --dtype "$dtype" --repeats 30 --json "$out/bench_resnet50_$dtype.json"
done
step bench_e2e "$python" -m gradstats bench --device cuda --e2e --steps 30 --json "$out/bench_e2e.json"

printf '%s\n' "${summary[@]}" | tee "$out/summary.log"
exit $status
