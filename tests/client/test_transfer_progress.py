"""A large push, pull, upload or download shows one line in its cell, updated in place, then what it did.

Through the ``%gpu`` magic in a real IPython kernel and through the Remote
GPU kernel, against the real server, across an emulated link of 160 Mbit/s
(``bench/link.py``) so that 32 MiB take about 1.7 s: long enough to be
shown (a link only ever makes a transfer slower, so that holds on a loaded
machine too). A small transfer, and a silent request, show nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernels import LocalKernel, kernel_with_magic
from remote_kernels import KernelDriver, kernel_env
from remote_kernels import remote_kernel as remote_kernel_of
from servers import ServerProcess, slow_link_url

#: 32 MiB of random float64 (nothing to compress, nothing cached yet), made by ``seed``.
BIG = "np.random.default_rng({seed}).random(4 << 20)"
RUNNING = re.compile(r"^Remote GPU: (push|pull|upload|download)ing [\d.]+ (bytes|KiB|MiB) of 32 MiB \(\d+ %\), [\d.]+ "
                     r"(bytes|KiB|MiB|GiB)/s, [\d.]+ (s|min \d+ s) left$")


@pytest.fixture(scope="module")
def link_url(server: ServerProcess) -> Iterator[str]:
    with slow_link_url(server.url) as url:
        yield url


@pytest.fixture(scope="module")
def magic(link_url: str, alice: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKernel]:
    env = kernel_env(tmp_path_factory.mktemp("magic"), link_url, alice)
    with kernel_with_magic(env) as kernel:
        assert kernel.run("%%gpu\nimport numpy as np").reply["status"] == "ok"  # the lease, out of the way
        assert kernel.run("import numpy as np").reply["status"] == "ok"
        yield kernel


@pytest.fixture(scope="module")
def remote_kernel(link_url: str, alice: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelDriver]:
    with remote_kernel_of(tmp_path_factory, link_url, alice, "import numpy as np",  # the lease, out of the way
                          "%%local\nimport numpy as np") as driver:
        yield driver


def one_line(displays: list[dict[str, Any]], updates: list[dict[str, Any]], verb: str) -> list[str]:
    """The texts of the one line a transfer showed: its display, then every update
    (all of the same ``display_id``), the last saying what it did."""
    assert len(displays) == 1, f"one display for the transfer, got {displays}"
    display_id = displays[0]["transient"]["display_id"]
    assert updates, "the line is updated in place at least once (its final text)"
    assert {u["transient"]["display_id"] for u in updates} == {display_id}
    texts = [displays[0]["data"]["text/plain"]] + [u["data"]["text/plain"] for u in updates]
    *running, final = texts
    assert running and all(RUNNING.match(t) and t.startswith(f"Remote GPU: {verb}ing") for t in running), texts
    assert re.match(rf"^Remote GPU: {verb}ed 32 MiB in [\d.]+ s, [\d.]+ MiB/s$", final), final
    return texts


def test_a_large_push_through_the_magic_shows_one_line_then_what_it_did(magic: LocalKernel) -> None:
    magic.run(f"big = {BIG.format(seed=1)}")
    run = magic.run("%gpu push big")
    assert run.reply["status"] == "ok", run.reply
    one_line(run.of_type("display_data"), run.of_type("update_display_data"), "push")
    assert run.stdout == run.stderr == "", "nothing printed per chunk"
    check = magic.run("%%gpu\nprint(round(float(big.sum()), 3))")
    assert check.stdout == magic.run("print(round(float(big.sum()), 3))").stdout


def test_a_cell_with_large_inputs_and_outputs_shows_a_line_for_each(magic: LocalKernel) -> None:
    magic.run(f"second = {BIG.format(seed=2)}")
    run = magic.run("%%gpu -i second -o twice\ntwice = second * 2")
    assert run.reply["status"] == "ok", run.reply
    displays, updates = run.of_type("display_data"), run.of_type("update_display_data")
    assert len(displays) == 2, displays
    for display, verb in zip(displays, ("push", "pull")):
        key = display["transient"]["display_id"]
        one_line([display], [u for u in updates if u["transient"]["display_id"] == key], verb)
    assert magic.run("print(bool((twice == second * 2).all()))").stdout == "True\n"


def test_a_small_transfer_shows_nothing(magic: LocalKernel) -> None:
    magic.run("small = np.arange(1 << 17, dtype=np.float64)")  # 1 MiB
    run = magic.run("%gpu push small")
    assert run.reply["status"] == "ok", run.reply
    assert run.of_type("display_data") == run.of_type("update_display_data") == []


def test_the_remote_gpu_kernel_shows_its_pushes_and_pulls_the_same_way(remote_kernel: KernelDriver) -> None:
    remote_kernel.run(f"%%local\nbig = {BIG.format(seed=3)}")
    run = remote_kernel.run("%gpu push big")
    assert run.status == "ok", run.reply
    one_line(run.of("display_data"), run.of("update_display_data"), "push")
    remote_kernel.run("again = big + 1")
    run = remote_kernel.run("%gpu pull again")
    assert run.status == "ok", run.reply
    one_line(run.of("display_data"), run.of("update_display_data"), "pull")
    assert remote_kernel.run("%%local\nprint(bool((again == big + 1).all()))").stdout == "True\n"


#: A local cell that moves into folder ``{folder}`` and writes 32 MiB of random
#: bytes (nothing to compress) into ``blob.bin`` there.
BLOB = "import os\nos.chdir({folder!r})\nwith open('blob.bin', 'wb') as f:\n    f.write(os.urandom(32 << 20))"


def file_lines(displays: list[dict[str, Any]], updates: list[dict[str, Any]], verb: str, name: str) -> None:
    """An upload's or download's progress line (as a push's), then the line that names its file."""
    said = re.compile(rf"^Remote GPU: {verb}ed (.*/)?{name} \(32 MiB\)$")
    summary = [d for d in displays if said.match(d["data"]["text/plain"])]
    assert len(summary) == 1, displays
    one_line([d for d in displays if d not in summary], updates, verb)


def test_a_large_upload_and_download_through_the_magic_show_their_progress(magic: LocalKernel,
                                                                          tmp_path: Path) -> None:
    assert magic.run(BLOB.format(folder=str(tmp_path))).reply["status"] == "ok"
    run = magic.run("%gpu upload blob.bin")
    assert run.reply["status"] == "ok", run.reply
    file_lines(run.of_type("display_data"), run.of_type("update_display_data"), "upload", "blob.bin")
    assert magic.run("%%gpu\nimport os; os.rename('blob.bin', 'back.bin')").reply["status"] == "ok"
    run = magic.run("%gpu download back.bin")
    assert run.reply["status"] == "ok", run.reply
    file_lines(run.of_type("display_data"), run.of_type("update_display_data"), "download", "back.bin")
    assert magic.run("print(open('back.bin', 'rb').read() == open('blob.bin', 'rb').read())").stdout == "True\n"


def test_the_remote_gpu_kernel_shows_its_uploads_and_downloads_the_same_way(remote_kernel: KernelDriver,
                                                                            tmp_path: Path) -> None:
    assert remote_kernel.run("%%local\n" + BLOB.format(folder=str(tmp_path))).status == "ok"
    run = remote_kernel.run("%gpu upload blob.bin")
    assert run.status == "ok", run.reply
    file_lines(run.of("display_data"), run.of("update_display_data"), "upload", "blob.bin")
    assert remote_kernel.run("import os; os.rename('blob.bin', 'back.bin')").status == "ok"
    run = remote_kernel.run("%gpu download back.bin")
    assert run.status == "ok", run.reply
    file_lines(run.of("display_data"), run.of("update_display_data"), "download", "back.bin")
    assert remote_kernel.run("%%local\nprint(open('back.bin', 'rb').read() == open('blob.bin', 'rb').read())"
                             ).stdout == "True\n"


def test_a_silent_request_shows_nothing(remote_kernel: KernelDriver) -> None:
    remote_kernel.run(f"%%local\nquiet = {BIG.format(seed=4)}")
    msg_id = remote_kernel.client.execute("%gpu push quiet", silent=True)
    run = remote_kernel.collect(msg_id)
    assert run.status == "ok", run.reply
    assert run.of("display_data") == run.of("update_display_data") == []
    assert remote_kernel.run("print(quiet.shape)").stdout == "(4194304,)\n"
