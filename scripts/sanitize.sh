#!/usr/bin/env bash
# Builds gradstats' CPU code with AddressSanitizer and UndefinedBehaviorSanitizer into a scratch
# folder and runs the op-level tests under them (Python itself is not instrumented: libasan is
# preloaded). Any finding stops the run with a report. Usage, from the repository root, in an
# environment where gradstats builds (e.g. after ./quickstart.sh test):
#     scripts/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
out="$(mktemp -d /tmp/gradstats-sanitize.XXXXXX)"
GRADSTATS_SANITIZE=1 "$python" -m pip install --quiet --no-build-isolation --no-deps --target "$out" .
if ! ldd "$out"/gradstats/_C*.so | grep -q libasan; then
  echo "sanitize.sh: the build in $out is not linked against libasan" >&2
  exit 1
fi
asan="$(${CXX:-g++} -print-file-name=libasan.so)"
ubsan="$(${CXX:-g++} -print-file-name=libubsan.so)"
export LD_PRELOAD="$asan:$ubsan"
# Leaks: CPython and torch keep allocations alive at exit by design; memory errors stop the run.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$out"
unset GRADSTATS_EXPECT_CUDA_BUILD  # this build is CPU-only by design
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-sanitize}"
# The tests must import the sanitised build, not the source folder: run the pytest module from
# the scratch folder's view (cwd is not on sys.path with -P).
"$python" -P -c "import gradstats, sys; sys.exit(0 if gradstats.__file__.startswith('$out') else 'sanitize.sh: imported ' + gradstats.__file__)"
"$python" -P -m pytest -q -p no:cacheprovider tests/test_op.py tests/test_nonfinite.py tests/test_probe.py \
    tests/test_fuzz.py tests/test_build.py -k "not torch_compile and not every_cpu_build" "$@"
