"""``%%gpu --env NAME`` inside a real local kernel, against a server with a named
environment (np1: numpy 1.26.4; the server's own Python has numpy 2)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernels import LocalKernel, kernel_with_magic
from servers import ServerProcess


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, test_environments: dict[str, Path]) -> Iterator[LocalKernel]:
    server = ServerProcess(tmp_path_factory.mktemp("magic-envs"), "cpu:1", "--no-isolation",
                           f"--env=np1={test_environments['np1']}")
    token = server.token("alice")
    server.start()
    try:
        with kernel_with_magic(dict(os.environ, RGPU_URL=server.url, RGPU_TOKEN=token)) as k:
            yield k
    finally:
        server.stop()


def test_the_magic_leases_in_the_environment_env_names_and_keeps_it(kernel: LocalKernel) -> None:
    help_text = "".join(p["data"].get("text/plain", "") for p in kernel.run("%%gpu?\n").reply.get("payload", []))
    assert "--env NAME" in help_text
    ran = kernel.run("%%gpu --env np1\nimport numpy\nprint('numpy', numpy.__version__)")
    assert ran.reply["status"] == "ok" and "numpy 1.26.4" in ran.stdout
    # The lease is kept: the next cell runs in np1 too.
    assert "numpy 1.26.4" in kernel.run("%%gpu\nprint('numpy', numpy.__version__)").stdout
    assert kernel.run("%gpu release").reply["status"] == "ok"
    assert "numpy 2." in kernel.run("%%gpu\nimport numpy\nprint('numpy', numpy.__version__)").stdout


def test_an_unknown_environment_fails_the_cell_naming_those_there_are(kernel: LocalKernel) -> None:
    kernel.run("%gpu release")
    unknown = kernel.run("%%gpu --env np3\nprint('never')")
    assert unknown.reply["status"] == "error"
    said = unknown.stderr + str(unknown.reply)
    assert "no environment 'np3'" in said and "it has: default, np1" in said
    assert "never" not in unknown.stdout
