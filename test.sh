#!/usr/bin/env bash
# Set up everything this project needs and run the whole test suite.
# Extra arguments go to pytest (for example: ./test.sh -k magic).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
