"""Public example notebooks give the same outputs under the Remote GPU kernel
as under a local ipykernel, cell by cell.

Each notebook in tests/notebooks/ (see SOURCES.md there) runs with nbclient
twice, in a folder of its own that holds a copy of it and its images: under
``python3`` and under ``remote-gpu`` against the real server on CPU slots.
The outputs of every cell, the widget states nbclient recorded (an Output
widget's captured outputs among them) and the messages a widget frontend
depends on (each comm_open's target and protocol version, whether an Output
widget's msg_id is the request it routes by) must be equal once what
legitimately differs is normalised (see notebook_runs.py). A cell that needs
a file next to the notebook gets it with ``%gpu upload`` on the remote
side, as a user would.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from notebook_runs import comparable, frontend_messages, run_notebook
from remote_kernels import install_kernelspec
from servers import ServerProcess

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PIP = "needs the network: %pip install ipywidgets (installed here already)"

#: notebook -> ({code cell index: why it is skipped}, cells the remote run does first)
CASES: dict[str, tuple[dict[int, str], tuple[str, ...]]] = {
    "Widget Basics": ({0: PIP}, ()),
    "Widget List": ({0: PIP}, ("%gpu upload images/WidgetArch.png",)),
    "Output Widget": ({0: PIP}, ()),
    "Using Interact": ({0: PIP}, ()),
    "Capturing Output": ({}, ()),
    "Updating Displays": ({}, ()),
    "Plotting in the Notebook": ({}, ()),
    "tqdm notebook": ({}, ()),
}


@pytest.fixture(scope="module")
def remote_env(server: ServerProcess, alice: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    prefix = tmp_path_factory.mktemp("prefix")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(install_kernelspec(prefix)))
        mp.setenv("RGPU_URL", server.url)
        mp.setenv("RGPU_TOKEN", alice)
        mp.setenv("RGPU_CONFIG", str(prefix / "no-client-config.json"))
        yield


def _folder(tmp: Path, name: str) -> Path:
    """A folder with the notebook and the files next to it, as a user has them."""
    tmp.mkdir()
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", tmp)
    shutil.copytree(NOTEBOOKS / "images", tmp / "images")
    return tmp


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_a_public_notebook_gives_the_same_outputs_remotely(name: str, remote_env: None, tmp_path: Path) -> None:
    skip, before = CASES[name]
    local = run_notebook(NOTEBOOKS / f"{name}.ipynb", "python3", _folder(tmp_path / "local", name), skip)
    remote = run_notebook(NOTEBOOKS / f"{name}.ipynb", "remote-gpu", _folder(tmp_path / "remote", name),
                          skip, before)
    local_cells, local_widgets = comparable(local)
    remote_cells, remote_widgets = comparable(remote)
    for (index, expected), (_, got) in zip(local_cells, remote_cells, strict=True):
        source = local.nb.cells[index].source
        assert got == expected, f"{name}, code cell {index}:\n{source}"
    assert remote_widgets == local_widgets
    assert frontend_messages(remote) == frontend_messages(local)
    opened = [m for _, m in remote.messages if m["msg_type"] == "comm_open"]
    assert all(m["metadata"].get("version", "").startswith("2.") for m in opened
               if m["content"].get("target_name") == "jupyter.widget")
