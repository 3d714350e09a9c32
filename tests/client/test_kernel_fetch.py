"""The Remote GPU kernel reads a file beside its notebook as a local ipykernel does.

The kernel runs in the notebook's folder, as Jupyter starts it; a remote
cell that opens ``data.csv`` there gets it with no ``%gpu upload`` (the
client sends it when the worker asks, see ``docs/user/files.md``), and its
outputs are those of a local ipykernel running the same cell. What is
refused, and how to turn it off, is tested in tests/server/test_fetch.py
and with the kernel's other file commands in test_kernel.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from servers import ServerProcess


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = install_kernelspec(tmp_path_factory.mktemp("prefix"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(path))
        yield path


#: A cell that reads a file beside its notebook, as a notebook's first cell does.
READS_DATA = """\
import csv
rows = list(csv.DictReader(open('data.csv')))
print(len(rows), rows[0])
sum(float(r['y']) for r in rows)
"""


def test_a_cell_reads_a_file_beside_the_notebook_as_a_local_kernel_does(
        jupyter_path: Path, server: ServerProcess, alice: str, tmp_path: Path) -> None:
    """No %gpu upload: the kernel's client sends data.csv when the remote cell opens it."""
    here = tmp_path / "notebook"
    here.mkdir()
    (here / "data.csv").write_text("x,y\n1,2.5\n2,3.5\n")
    outputs = {}
    for name in ("python3", "remote-gpu"):
        driver = KernelDriver(kernel_env(tmp_path, server.url, alice), kernel_name=name).start(cwd=here)
        try:
            run = driver.run(READS_DATA)
            assert run.status == "ok", run.reply
            outputs[name] = (run.stdout, run.stderr, run.text())
            if name == "remote-gpu":
                assert "Remote GPU: fetched data.csv, 16 bytes, from your notebook's folder" in run.text(
                    "display_data")
                again = driver.run(READS_DATA)  # the session's copy: nothing fetched
                assert (again.stdout, again.text(), again.text("display_data")) == \
                    (run.stdout, run.text(), [])
        finally:
            driver.shutdown()
    assert outputs["remote-gpu"] == outputs["python3"] == (
        "2 {'x': '1', 'y': '2.5'}\n", "", ["6.0"])


def test_rgpu_fetch_0_in_the_kernels_environment_turns_it_off(
        jupyter_path: Path, server: ServerProcess, alice: str, tmp_path: Path) -> None:
    here = tmp_path / "notebook"
    here.mkdir()
    (here / "data.csv").write_text("x,y\n1,2.5\n2,3.5\n")
    env = kernel_env(tmp_path, server.url, alice) | {"RGPU_FETCH": "0"}
    driver = KernelDriver(env).start(cwd=here)
    try:
        off = driver.run(READS_DATA)
        assert off.status == "error" and off.reply["ename"] == "FileNotFoundError"
        assert "fetching is off" in off.reply["traceback"][-1]
        assert not any("fetched" in t for t in off.text("display_data"))
        on = driver.run("%gpu fetch on\n" + READS_DATA)  # the notebook's own say wins
        assert on.status == "ok" and on.text() == ["6.0"]
    finally:
        driver.shutdown()
