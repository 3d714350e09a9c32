"""Run a notebook with nbclient, record its messages, and make runs comparable.

:func:`run_notebook` executes a notebook's code cells (some skipped, some
extra cells first) in a kernel chosen by name, and keeps every IOPub message
nbclient processed, with the index of its cell. :func:`comparable` turns a
run into plain data in which what legitimately differs between two kernels
is normalised: widget model ids (numbered in the order their comms opened),
request ids an Output widget recorded, memory addresses, temporary file
names, timings and rates, execution counts, and the Remote GPU kernel's own
lease line.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.output_widget import OutputWidget

__all__ = ["NotebookRun", "comparable", "frontend_messages", "run_notebook"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TEXT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"0x[0-9a-fA-F]{6,}"), "0xADDR"),
    # display ids, element ids and other random ids
    (re.compile(r"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b"), "UUID"),
    (re.compile(r"ipykernel_\d+/\d+\.py"), "ipykernel_PID/N.py"),
    (re.compile(r"(Cell )?In\s*\[\d*\]"), "In[N]"),
    # tqdm: a bar of fixed ncols takes the room its rate's text leaves, so its
    # length follows the timing; the percentage and the count before it stay.
    (re.compile(r"(?<=%)\|(?:[\u2588-\u258f]*|#*\d?) *\|"), "|BAR|"),
    # tqdm: elapsed<remaining, rates
    (re.compile(r"\d\d:\d\d(:\d\d)?(,\d+)?"), "MM:SS"),
    (re.compile(r"\s*(\d+(\.\d+)?|\?)\s*(it|s|epoch)/(s|it)"), " RATE"),  # tqdm pads rates to a width
    # %%time
    (re.compile(r"\d+(\.\d+)?\s*(ns|µs|\u03bcs|us|ms|s)\b"), "TIME"),
]


def normalise_text(text: str) -> str:
    text = _ANSI.sub("", text)
    # A progress bar rewrites its line with \r: keep what the line shows last.
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    for pattern, replacement in _TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


@dataclasses.dataclass
class NotebookRun:
    nb: Any
    messages: list[tuple[int, dict[str, Any]]]
    widget_state: dict[str, dict[str, Any]]
    compared: list[int]  # the indexes of the notebook's own cells that ran

    def comm_order(self) -> list[str]:
        return [msg["content"]["comm_id"] for _, msg in self.messages if msg["msg_type"] == "comm_open"]


class _OutputView(OutputWidget):  # type: ignore[misc]
    """nbclient's stand-in for an Output widget's view, without writing back.

    nbclient routes the output whose parent is the widget's ``msg_id`` into
    the widget, as a frontend does, and then sends the new ``outputs`` back
    to the kernel while the cell runs. That write-back alone, with stock
    ipykernel 7.4 as well as with the Remote GPU kernel, now and then leaves
    a cell's reply unread until nbclient gives up; it changes nothing the
    comparison looks at, so it is left out.
    """

    def sync_state(self) -> None:
        pass


class _Recording(NotebookClient):  # type: ignore[misc]
    """Keeps every message nbclient processes."""

    recorded: list[tuple[int, dict[str, Any]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.widget_registry = {"@jupyter-widgets/output": {"OutputModel": _OutputView}}

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        self.recorded.append((cell_index, msg))
        return super().process_message(msg, cell, cell_index)


def run_notebook(path: Path, kernel_name: str, cwd: Path, skip: dict[int, str],
                 before: tuple[str, ...] = (), timeout: int = 120) -> NotebookRun:
    """Run the code cells of ``path`` whose index (among code cells) is not in
    ``skip``, after the extra cells ``before``, in a kernel started in ``cwd``."""
    original = nbformat.read(path, as_version=4)
    code = [c for c in original.cells if c.cell_type == "code"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in before] + code
    client = _Recording(nb, kernel_name=kernel_name, timeout=timeout, allow_errors=True,
                        resources={"metadata": {"path": str(cwd)}})
    client.recorded = []
    compared = [i for i in range(len(code)) if i not in skip]
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if index >= len(before) and index - len(before) not in compared:
                continue
            client.execute_cell(cell, index)
    recorded = [(i - len(before), msg) for i, msg in client.recorded if i >= len(before)]
    nb.cells = nb.cells[len(before):]
    return NotebookRun(nb, recorded, dict(client.widget_state), compared)


def _rename(value: Any, ids: dict[str, str]) -> Any:
    """Widget ids to their canonical names, request ids away, text normalised, recursively."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "msg_id" and isinstance(item, str):
                out[key] = "<request>" if item else ""
            elif key == "model_id" and isinstance(item, str):
                out[key] = ids.get(item, item)
            else:
                out[key] = _rename(item, ids)
        return out
    if isinstance(value, list):
        return [_rename(item, ids) for item in value]
    if isinstance(value, str):
        for real, canonical in ids.items():
            if real in value:
                value = value.replace(real, canonical)
        return normalise_text(value)
    return value


def _outputs(outputs: list[Any], ids: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for output in outputs:
        output = dict(output)
        output.pop("execution_count", None)
        text = output.get("data", {}).get("text/plain", "")
        if output["output_type"] == "display_data" and str(text).startswith("Remote GPU: "):
            continue  # the Remote GPU kernel's lease line
        if output["output_type"] == "stream":
            if out and out[-1]["output_type"] == "stream" and out[-1]["name"] == output["name"]:
                out[-1] = {**out[-1], "text": out[-1]["text"] + output["text"]}
                continue
        out.append(output)
    return [_rename(o, ids) for o in out]


def comparable(run: NotebookRun) -> tuple[list[tuple[int, list[dict[str, Any]]]], dict[str, Any]]:
    """``([(cell, outputs)...], widget states)``, normalised (see the module docstring)."""
    ids = {comm_id: f"widget-{n}" for n, comm_id in enumerate(run.comm_order())}
    cells = [(i, _outputs(run.nb.cells[i].outputs, ids)) for i in run.compared]
    states = {ids.get(comm_id, comm_id): _rename(state, ids) for comm_id, state in run.widget_state.items()}
    return cells, states


def frontend_messages(run: NotebookRun) -> list[tuple[Any, ...]]:
    """What a widget frontend depends on, per comm message, in order: the
    target and protocol version of each ``comm_open`` and its model, and for
    each ``comm_msg`` that sets an Output widget's ``msg_id``, whether that id
    is the request the message came with (the one the frontend routes by)."""
    ids = {comm_id: f"widget-{n}" for n, comm_id in enumerate(run.comm_order())}
    out: list[tuple[Any, ...]] = []
    for cell, msg in run.messages:
        content = msg["content"]
        if msg["msg_type"] == "comm_open":
            state = content.get("data", {}).get("state", {})
            out.append((cell, "open", content.get("target_name"), msg["metadata"].get("version"),
                        state.get("_model_name")))
        elif msg["msg_type"] == "comm_msg":
            state = content.get("data", {}).get("state", {})
            if state.get("msg_id"):
                out.append((cell, "capture", ids.get(content["comm_id"]),
                            state["msg_id"] == msg["parent_header"].get("msg_id")))
    return out
