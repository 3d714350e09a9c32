"""Public example notebooks give the same outputs under the Remote GPU kernel
as under a local ipykernel, cell by cell.

Each notebook in tests/notebooks/ (see SOURCES.md there) runs with nbclient
twice, in a folder of its own that holds a copy of it and its images: under
``python3`` and under ``remote-gpu`` against the real server on CPU slots.
The outputs of every cell, the widget states nbclient recorded (an Output
widget's captured outputs among them) and the messages a widget frontend
depends on (each comm_open's target and protocol version, whether an Output
widget's msg_id is the request it routes by) must be equal once what
legitimately differs is normalised (see notebook_runs.py). A cell that opens
a file next to the notebook gets it from the notebook's folder on the
remote side with no ``%gpu upload``, as it would locally. A notebook's
``%pip install -q ipywidgets`` runs on both ends and says the same, but
for IPython's "you may need to restart the kernel", which the remote end
never says: the package imports at once there. A notebook of our own, run whole as ``jupyter
nbconvert --execute`` runs it, saves the same widget state under both.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from notebook_runs import comparable, frontend_messages, run_notebook
from remote_kernels import install_kernelspec
from servers import ServerProcess

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: What IPython's %pip prints after an install, where a restart may be needed.
RESTART_NOTE = "Note: you may need to restart the kernel to use updated packages.\n"

#: notebook -> ({code cell index: why it is skipped}, cells the remote run does first). The
#: widget notebooks begin with ``%pip install -q ipywidgets``, which both ends already have:
#: the cell runs, remotely into the user's own site, and says the same as it does locally.
CASES: dict[str, tuple[dict[int, str], tuple[str, ...]]] = {
    "Widget Basics": ({}, ()),
    "Widget List": ({}, ()),  # opens images/WidgetArch.png: fetched
    "Output Widget": ({}, ()),
    "Using Interact": ({}, ()),
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
        # The local kernel's %pip does not ask PyPI for a newer pip either (a worker never does).
        mp.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
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
        if "%pip install" in source:
            # Locally IPython says a restart may be needed; remotely the package imports at
            # once (it lands in the user's site, already on the worker's path), so nothing says so.
            assert RESTART_NOTE not in json.dumps(got), f"{name}, code cell {index}: {got}"
            expected = [o for o in expected if o.get("text") != RESTART_NOTE]
        assert got == expected, f"{name}, code cell {index}:\n{source}"
    assert remote_widgets == local_widgets
    assert frontend_messages(remote) == frontend_messages(local)
    opened = [m for _, m in remote.messages if m["msg_type"] == "comm_open"]
    assert all(m["metadata"].get("version", "").startswith("2.") for m in opened
               if m["content"].get("target_name") == "jupyter.widget")


#: An Output widget that an asyncio task fills after its cell ended: ipykernel
#: runs the task once the cell's idle status is out, so a notebook runner
#: (nbclient, papermill, nbconvert --execute) has moved on by then.
AFTER_THE_CELL = [
    "import asyncio\nimport ipywidgets as widgets\nout = widgets.Output()\ndisplay(out)\n"
    "async def later():\n    with out:\n        print('from a task')\n"
    "task = asyncio.ensure_future(later())",
    "await task\nprint('the task ran')",
]


@pytest.mark.timeout(300)
def test_an_output_widget_that_a_task_fills_after_its_cell_saves_the_same_state(
        remote_env: None, tmp_path: Path) -> None:
    """As ``jupyter nbconvert --execute`` runs it: the whole notebook, widget state saved."""
    import nbformat
    from nbclient import NotebookClient

    saved: dict[str, Any] = {}
    for kernel in ("python3", "remote-gpu"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(source) for source in AFTER_THE_CELL]
        (tmp_path / kernel).mkdir()
        NotebookClient(nb, kernel_name=kernel, timeout=120,
                       resources={"metadata": {"path": str(tmp_path / kernel)}}).execute()
        state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
        ids = {model_id: f"widget-{n}" for n, model_id in enumerate(state)}
        outputs = [[{k: v for k, v in o.items() if k != "execution_count"} for o in cell.outputs
                    if "Remote GPU: " not in str(o.get("data", {}).get("text/plain", ""))]
                   for cell in nb.cells]
        saved[kernel] = json.loads(_renamed(json.dumps([state, outputs]), ids))
    (local_state, local_outputs), (remote_state, remote_outputs) = saved["python3"], saved["remote-gpu"]
    outputs = [w["state"] for w in local_state.values() if w["model_name"] == "OutputModel"]
    assert [(o["outputs"], o["msg_id"]) for o in outputs] == [([], "")], "ipykernel: the task ran after the idle"
    assert remote_outputs == local_outputs
    assert list(remote_state) == list(local_state)
    for name, widget in local_state.items():
        theirs = remote_state[name]["state"]
        assert {k: theirs.get(k) for k in widget["state"] if theirs.get(k) != widget["state"][k]} == {}, \
            (name, widget["state"])
        assert remote_state[name] == widget


def _renamed(text: str, ids: dict[str, str]) -> str:
    for real, name in ids.items():
        text = text.replace(real, name)
    return text
