#!/usr/bin/env bash
# Set up everything and run the main job: a GPU server on the embedded
# defaults (SQLite, GPUs from NVML or CPU slots) and JupyterLab with the
# Remote GPU kernel, the %%gpu magic and the sidebar ready.
# Extra arguments go to JupyterLab (for example: ./run.sh --no-browser); the
# GPU server's port is $RGPU_PORT, else 8765 or the next free one.
set -euo pipefail
cd "$(dirname "$0")"
RGPU_SKIP_APT=1 scripts/setup.sh
exec .venv/bin/rgpu up -- "$@"
