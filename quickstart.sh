#!/usr/bin/env bash
# Sets up ./.venv with PyTorch and gradstats built from this folder, then runs one thing:
#   ./quickstart.sh demo    one training step of an instrumented ResNet, per-layer gradient table
#   ./quickstart.sh test    the test suite
# Safe to run again: an existing .venv is reused and gradstats is rebuilt from the sources.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-demo}"
case "$what" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --upgrade pip setuptools wheel ninja
# gradstats compiles against the torch in this environment; install one if there is none.
python -c "import torch" 2>/dev/null || pip install --quiet "torch>=2.6"
pip install --quiet numpy
extras="[tools]"   # the demo's data and plots
if [ "$what" = test ]; then
  extras="[test]"    # the tools, TensorBoard, Weights & Biases, Lightning, timm, pytest, ruff
fi
# torchvision (the `data` extra: instrument() also probes its ResNets, `train` streams
# ImageFolder data with it): only the release built for this torch works beside it
# (torch 2.X.Y <-> torchvision 0.(X+15).Y), so ask for that one and never let pip replace torch
# (the constraint below pins the torch gradstats is built against). If that torchvision is not
# available, the install of the extras says so.
if ! python -c "import torchvision" 2>/dev/null; then
  tv=$(python -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.{v[2]}')")
  pip install --quiet --no-deps "torchvision==$tv" || echo "torchvision $tv unavailable here"
fi
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-pin.txt
# --no-build-isolation: build against the torch installed above, not a fresh one.
pip install --quiet --no-build-isolation --constraint .venv/torch-pin.txt ".$extras"

if [ "$what" = demo ]; then
  exec gradstats demo
else
  # The `pytest` script, not `python -m pytest`: the tests must import the installed package,
  # not this source folder (which has no compiled extension).
  exec pytest -q
fi
