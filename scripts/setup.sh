#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a virtual environment in .venv with
# the project, its server side and its development tools installed.
#
# torch is pinned first: 2.13.0 is a CPU wheel; an unpinned torch would pull
# gigabytes of CUDA packages (the server runs on CPU slots where there is no
# GPU). Set RGPU_SKIP_APT=1 to skip installing Debian packages: Chromium for
# the browser test, PostgreSQL for the store's tests on that backend, and
# bubblewrap, which isolates the workers of a server that does not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"

# Debian's packages the tests use: Chromium renders JupyterLab for the browser
# tests; bubblewrap (bwrap) sandboxes the workers of a server that is not root;
# PostgreSQL: the store's tests start a server of their own on a Unix socket in
# a temporary folder (tests/postgres.py), and no service is enabled.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
if [ -z "${RGPU_SKIP_APT:-}" ] && [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: ${missing[*]} missing; the tests that need them will be skipped" \
             "(apt-get install ${missing[*]})" >&2
    fi
fi
