#!/usr/bin/env bash
# Runs a command with gradstats' CUDA kernels available on the CPU, under the emulator:
#     scripts/cuda_emulator.sh CMD [ARGS...]
# builds csrc/cuda/*.cu for the host (csrc/cuda_emu/build.py; cached in build/cuda_emu/ by a
# hash of the sources), then runs CMD with PYTHONPATH such that `import gradstats_cuda_emu`
# works and GRADSTATS_CUDA_EMU=1, under which the test suite's CUDA cases run on the emulator:
#     scripts/cuda_emulator.sh python -P -m pytest -q tests/test_cuda_emu.py tests/test_op.py -m cuda
# GRADSTATS_EMU_SANITIZE=1 builds and runs it under AddressSanitizer (out-of-range accesses to
# global memory). Python: $PYTHON, else .venv/bin/python if there is one, else python3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}"
[ $# -ge 1 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
sanitize=()
if [ "${GRADSTATS_EMU_SANITIZE:-0}" = 1 ]; then
  sanitize=(--sanitize)
  # The build imports the module it made, so ASan's runtime comes first there too. libstdc++
  # is preloaded after it: ASan resolves the real __cxa_throw (which it intercepts) when it
  # starts, and python itself does not link libstdc++; without it the first C++ exception (an
  # operator's argument error) fails ASan's CHECK "real___cxa_throw != 0" and aborts.
  cxx="${CXX:-g++}"
  export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so):$("$cxx" -print-file-name=libstdc++.so)"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0"
fi
out="$("$python" "$root/csrc/cuda_emu/build.py" "$root/build/cuda_emu" "${sanitize[@]}")" || {
  echo "cuda_emulator.sh: the emulated build failed; see $root/build/cuda_emu/build.log" >&2
  exit 1
}
export PYTHONPATH="$out${PYTHONPATH:+:$PYTHONPATH}"
export GRADSTATS_CUDA_EMU=1
if [ "$1" = python ]; then shift; exec "$python" "$@"; fi
exec "$@"
