#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a virtual environment in .venv with
# the project, its server side and its development tools installed.
#
# torch is pinned first: 2.13.0 is a CPU wheel; an unpinned torch would pull
# gigabytes of CUDA packages (the server runs on CPU slots where there is no
# GPU). Set RGPU_SKIP_APT=1 to skip installing Chromium for the browser test
# and PostgreSQL for the store's tests on that backend.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"

# Debian's Chromium renders JupyterLab for the sidebar's browser test.
if [ -z "${RGPU_SKIP_APT:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: chromium is missing; the browser test will be skipped (apt-get install chromium)" >&2
    fi
fi

# Debian's PostgreSQL server: the store's tests start one of their own on a
# Unix socket in a temporary folder (tests/postgres.py); no service is enabled.
if [ -z "${RGPU_SKIP_APT:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup: PostgreSQL is missing; the store's PostgreSQL tests will be skipped" \
             "(apt-get install postgresql)" >&2
    fi
fi
