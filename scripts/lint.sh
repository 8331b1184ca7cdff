#!/usr/bin/env bash
# ruff over the Python tree, with the rules and line length in pyproject.toml.
#     scripts/lint.sh           fix what ruff can (lint fixes, then formatting), report the rest
#     scripts/lint.sh --check   change nothing; fail on a lint finding or a formatting diff (CI)
# Uses .venv/bin/ruff when there is one (./quickstart.sh test installs the pinned version), else
# the ruff on PATH, else $RUFF.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff="${RUFF:-$( [ -x .venv/bin/ruff ] && echo .venv/bin/ruff || echo ruff )}"
case "${1:-}" in
  --check)  # both, so that one run reports everything
    status=0
    "$ruff" check . || status=1
    "$ruff" format --check --diff . || status=1
    exit "$status"
    ;;
  "")
    "$ruff" check --fix .
    "$ruff" format .
    ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
