"""The sidebar's TypeScript model, through its vitest suite (model.test.ts)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from labext import EXT_DIR, npm_installed


@pytest.mark.timeout(300)
def test_typescript_model() -> None:
    npm = npm_installed()
    # vitest colours its report where it sees CI=true, whatever the terminal
    env = dict(os.environ, NO_COLOR="1", FORCE_COLOR="0")
    result = subprocess.run([npm, "test", "--silent", "--", "--reporter=verbose"], cwd=EXT_DIR,
                            capture_output=True, text=True, timeout=280, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert "model.test.ts" in report
    assert re.search(r"Tests\s+\d+ passed \(\d+\)", report), report


@pytest.mark.timeout(300)
def test_typescript_compiles_without_errors() -> None:
    npm = npm_installed()
    result = subprocess.run([npm, "run", "--silent", "typecheck"], cwd=EXT_DIR,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
