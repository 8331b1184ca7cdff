#!/usr/bin/env bash
# Shows that the emulated CUDA tests can fail: applies one mutation at a time to a temporary copy
# of csrc/ and expects the emulated tests (tests/test_cuda_emu.py, float32 cases and the
# emulator's self-checks) to fail on it:
#   - each __syncthreads() of the kernels (csrc/cuda/*.cu) removed in turn,
#   - each warp-shuffle reduction started at a wrong offset (kWarp / 4 for kWarp / 2),
#   - a block's slice one value too long, and a thread's share of it one value too long,
#   - the per-sample group sum started at half its offset (a sample's sum missing some threads).
# Prints one line per mutant (caught / SURVIVED / did not build) and exits non-zero if any
# survived. Usage, where scripts/cuda_emulator.sh works (e.g. after ./quickstart.sh test):
#     scripts/cuda_mutants.sh [extra pytest args]
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}"
# The copy lives in build/mutants (ignored) and is kept: its emulated build is reused by the next
# run, so that each mutant only recompiles the file it changes.
work="$root/build/mutants"
mkdir -p "$work/repo"
for d in csrc scripts tests; do
  # Files that differ from the checkout's are copied afresh (new modification time: rebuilt).
  mkdir -p "$work/repo/$d"
  (cd "$root/$d" && find . -type f ! -name '*.pyc' -print0) | while IFS= read -r -d '' f; do
    cmp -s "$root/$d/$f" "$work/repo/$d/$f" || { mkdir -p "$(dirname "$work/repo/$d/$f")"; cp "$root/$d/$f" "$work/repo/$d/$f"; }
  done
done
# The emulated build of the unmutated copy first: later builds recompile only the mutated file.
PYTHON="$python" "$work/repo/scripts/cuda_emulator.sh" python -P -c "import gradstats_cuda_emu" 2>/dev/null || {
  echo "cuda_mutants.sh: the unmutated emulated build failed" >&2; exit 1; }
# The selected tests must pass on the unmutated copy, or a failure below would prove nothing.
PYTHON="$python" "$work/repo/scripts/cuda_emulator.sh" python -P -m pytest -x -q -p no:cacheprovider \
    "$work/repo/tests/test_cuda_emu.py" -k "float32 or faulty" "$@" >"$work/unmutated.log" 2>&1 || {
  echo "cuda_mutants.sh: the tests fail on the unmutated source; see $work/unmutated.log" >&2; exit 1; }
kernel="csrc/cuda/bn_backward_stats_kernel.cu"

# mutate FILE N OLD NEW: replaces the N-th (1-based) code line containing OLD in FILE's copy.
mutate() {
  "$python" - "$work/repo/$1" "$2" "$3" "$4" <<'PY'
import sys
path, nth, old, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = open(path).read().split("\n")
hits = [i for i, l in enumerate(lines) if old in l and not l.lstrip().startswith("//")]
if len(hits) < nth:
    sys.exit(3)
lines[hits[nth - 1]] = lines[hits[nth - 1]].replace(old, new, 1)
open(path, "w").write("\n".join(lines))
PY
}

declare -a mutants=()
for f in "$root"/csrc/cuda/*.cu; do
  rel="csrc/cuda/$(basename "$f")"
  n=$(grep -v '^\s*//' "$f" | grep -c '__syncthreads()')
  for ((i = 1; i <= n; i++)); do mutants+=("$rel|$i|__syncthreads();|;|__syncthreads() number $i removed"); done
done
n=$(grep -v '^\s*//' "$root/$kernel" | grep -c 'delta = kWarp / 2')
for ((i = 1; i <= n; i++)); do
  mutants+=("$kernel|$i|delta = kWarp / 2|delta = kWarp / 4|shuffle reduction number $i starts at offset 8, not 16")
done
mutants+=("$kernel|1|begin + a.slice < a.M ? begin + a.slice : a.M|begin + a.slice + 1 < a.M ? begin + a.slice + 1 : a.M|slice one value too long")
mutants+=("$kernel|1|(end - first + TY - 1) / TY|(end - first + TY) / TY|a thread's share of the slice one value too long")
mutants+=("$kernel|1|(W < kWarp ? W : kWarp) / 2|(W < kWarp ? W : kWarp) / 4|per-sample group sum starts at half its offset")

survived=0
for m in "${mutants[@]}"; do
  IFS='|' read -r file nth old new what <<<"$m"
  # Copied afresh (a new modification time, so the build sees the change) before and after.
  cp "$root/$file" "$work/repo/$file"
  if ! mutate "$file" "$nth" "$old" "$new"; then
    echo "NOT APPLIED  $what ($file)"; survived=1; continue
  fi
  if ! PYTHON="$python" "$work/repo/scripts/cuda_emulator.sh" python -P -c "import gradstats_cuda_emu" >/dev/null 2>&1; then
    echo "did not build $what ($file)"; continue
  fi
  log="$work/$(echo "$what" | tr -c 'a-zA-Z0-9' _).log"
  if PYTHON="$python" "$work/repo/scripts/cuda_emulator.sh" python -P -m pytest -x -q -p no:cacheprovider \
      "$work/repo/tests/test_cuda_emu.py" -k "float32 or faulty" "$@" >"$log" 2>&1; then
    echo "SURVIVED     $what ($file)"; survived=1
  else
    echo "caught       $what ($file): $(grep -m1 -E '^E ' "$log" | cut -c1-160)"
  fi
  cp "$root/$file" "$work/repo/$file"
done
exit $survived
