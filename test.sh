#!/usr/bin/env bash
# Set up everything this project needs, then check it in four steps, stopping
# at the first that fails:
#   1. lint-imports   the layers between the packages (pyproject.toml's contracts)
#   2. mypy --strict  the types of the four packages
#   3. sphinx-build   the docs site, warnings as errors
#   4. pytest         the test suite, with its 25 slowest steps at the end
# Extra arguments go to pytest (for example: ./test.sh -k magic).
#
# Nothing is written into the checkout: mypy's and import-linter's caches and
# the built docs go to a temporary folder, removed when this script ends.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh

scratch=$(mktemp -d "${TMPDIR:-/tmp}/rgpu-test.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# step NAME COMMAND...: run COMMAND; say that NAME passed, or that it failed and stop.
step() {
    local name=$1 status=0
    shift
    echo "test.sh: $name ..."
    "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "test.sh: FAILED: $name (exit status $status)" >&2
        exit "$status"
    fi
    echo "test.sh: passed: $name"
}

step "import layers (lint-imports)" \
    .venv/bin/lint-imports --cache-dir "$scratch/import-linter"
step "types (mypy --strict)" \
    .venv/bin/mypy --strict --cache-dir "$scratch/mypy" \
    remote_gpu_core remote_gpu_kernel server/remote_gpu_server jupyterlab_ext/remote_gpu_lab
step "docs (sphinx-build -W)" \
    .venv/bin/sphinx-build -W --keep-going -q -b html docs "$scratch/docs"
step "tests (pytest)" \
    .venv/bin/python -m pytest --durations=25 "$@"
