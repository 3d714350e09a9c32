"""The notebook's files on demand, against the real server: a remote cell opens
a file beside the notebook and reads it, with no ``%gpu upload``.

One server for the module, with two users' sessions (alice's and bob's),
each with a notebook folder of its own (``Session.notebook_files``). The
readers are the libraries' own (numpy, pandas, PIL, torch: each skipped
where it is not installed). Hostile cells forge fetch requests on the
worker's comm, as code in a worker can, to show that the client is the
fence: nothing outside its notebook's folder is sent, and another user's
cell never reaches your client.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_core.protocol import messages as m
from remote_gpu_kernel import Client
from remote_gpu_kernel.notebook_files import NotebookFolder
from remote_gpu_kernel.sync import Session, run as run_async
from servers import ServerProcess
from waiting import wait_for

#: The largest file the test's clients send (their RGPU_FETCH_MAX).
MAX = 64 << 10
#: The server's --max-upload and each user's --session-disk.
MAX_UPLOAD, DISK = 24 << 20, 16 << 20

#: A hostile cell's way to ask the client for any path: the worker's own fetch,
#: called by hand, past the audit hook's checks. Prints the outcome.
FORGE = """
import gc
from remote_gpu_server.worker_process import fetch as _f
def forge(name):
    fetcher = next(o for o in gc.get_objects() if type(o).__name__ == "Fetcher")
    with fetcher._lock:
        fetcher._count += 1
        fetcher.comm.send({"op": "fetch", "fetch": fetcher._count, "path": name})
        try:
            fetcher._receive(_f.fetch_tid(fetcher._count), "forged.out", "forged.out")
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    import os
    return "written" if os.path.exists("forged.out") else "nothing"
"""


def quiet(_: object) -> None:
    pass


@dataclasses.dataclass
class User:
    session: Session
    folder: Path
    notes: list[str]

    def run(self, code: str) -> str:
        """What the cell printed; it must not fail."""
        result = self.session.execute(code, on_output=quiet, on_fetched=self.notes.append)
        assert result.ok, result.error
        return "".join(o.content.get("text", "") for o in result.outputs if o.msg_type == "stream")

    def fail(self, code: str) -> tuple[str, str]:
        """``(ename, evalue)`` of a cell that must fail."""
        result = self.session.execute(code, on_output=quiet, on_fetched=self.notes.append)
        assert result.error is not None, "the cell should have failed"
        return result.error.ename, result.error.evalue


@dataclasses.dataclass
class World:
    server: ServerProcess
    alice: User
    bob: User


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fetch")
    server = ServerProcess(tmp, "cpu:2", "--max-upload", "24M", "--session-disk", "16M")
    tokens = server.token("alice"), server.token("bob")
    server.start()
    try:
        with Client(server.url, tokens[0]).session() as a, Client(server.url, tokens[1]).session() as b:
            users = []
            for name, session in (("alice", a), ("bob", b)):
                folder = tmp / f"{name}-notebook"
                folder.mkdir()
                session.notebook_files = NotebookFolder(folder, MAX)
                users.append(User(session, folder, []))
            yield World(server, *users)
    finally:
        server.stop()


@pytest.fixture
def alice(world: World) -> Iterator[User]:
    world.alice.notes.clear()
    world.alice.session.notebook_files = NotebookFolder(world.alice.folder, MAX)
    yield world.alice


def _csv(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("x,y\n1,2\n3,4\n")
    return path


def test_open_reads_a_file_beside_the_notebook_and_says_so(alice: User) -> None:
    _csv(alice.folder, "plain.csv")
    (alice.folder / "sub").mkdir()
    (alice.folder / "sub" / "inner.txt").write_text("inner")
    out = alice.run("print(open('plain.csv').read().split())\nprint(open('sub/inner.txt', 'rb').read())")
    assert out == "['x,y', '1,2', '3,4']\nb'inner'\n"
    assert alice.notes == ["fetched plain.csv, 12 bytes, from your notebook's folder",
                           "fetched sub/inner.txt, 5 bytes, from your notebook's folder"]


def test_numpy_reads_it(alice: User) -> None:
    np = pytest.importorskip("numpy")
    np.save(alice.folder / "array.npy", np.arange(10))
    assert alice.run("import numpy as np\nprint(np.load('array.npy').sum())") == "45\n"
    assert [n.split(",")[0] for n in alice.notes] == ["fetched array.npy"]


def test_pandas_reads_it(alice: User) -> None:
    pytest.importorskip("pandas")
    _csv(alice.folder, "frame.csv")
    assert alice.run("import pandas as pd\nprint(pd.read_csv('frame.csv')['y'].sum())") == "6\n"
    assert [n.split(",")[0] for n in alice.notes] == ["fetched frame.csv"]


def test_pil_reads_it(alice: User) -> None:
    image = pytest.importorskip("PIL.Image")
    image.new("RGB", (3, 2), (255, 0, 0)).save(alice.folder / "red.png")
    out = alice.run("from PIL import Image\nim = Image.open('red.png')\nprint(im.size, im.getpixel((0, 0)))")
    assert out == "(3, 2) (255, 0, 0)\n"


def test_torch_reads_it(alice: User) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.arange(4)}, alice.folder / "weights.pt")
    assert alice.run("import torch\nprint(int(torch.load('weights.pt')['w'].sum()))") == "6\n"
    assert [n.split(",")[0] for n in alice.notes] == ["fetched weights.pt"]


def test_a_thread_of_the_cell_reads_it_while_the_cell_awaits_and_a_push_and_pull_follow(alice: User) -> None:
    # The cell's own thread fetches while the kernel's main loop runs (the
    # cell awaits), and that loop also watches the data channel for the
    # server's operations: the fetch's notes are the thread's alone, and
    # the channel serves the push and pull that come after.
    (alice.folder / "beside.txt").write_text("read in a thread")
    cell = ("import asyncio, threading\n"
            "got = {}\n"
            "reader = threading.Thread(target=lambda: got.update(text=open('beside.txt').read()))\n"
            "reader.start()\n"
            "while reader.is_alive():\n"
            "    await asyncio.sleep(0.001)\n"
            "print(got['text'])")
    assert alice.run(cell) == "read in a thread\n"
    alice.session.push(after=[1, 2])
    assert alice.session.pull("after") == {"after": [1, 2]}


def test_a_file_in_the_session_folder_is_not_fetched_again(alice: User, monkeypatch: pytest.MonkeyPatch) -> None:
    _csv(alice.folder, "once.csv")
    assert alice.run("print(len(open('once.csv').read()))") == "12\n"
    assert alice.run("print(len(open('once.csv').read()))") == "12\n"  # unchanged: the session's copy
    assert len(alice.notes) == 1
    uploaded = _csv(alice.folder, "uploaded.csv")
    monkeypatch.chdir(alice.folder)
    alice.session.upload(uploaded.name)
    assert alice.run("print(len(open('uploaded.csv').read()))") == "12\n"
    assert len(alice.notes) == 1


def test_a_file_that_changed_beside_the_notebook_is_fetched_again(alice: User) -> None:
    path = _csv(alice.folder, "edited.csv")
    assert alice.run("print(open('edited.csv').read().split())") == "['x,y', '1,2', '3,4']\n"
    path.write_text("x,y\n5,6\n")
    assert alice.run("print(open('edited.csv').read().split())") == "['x,y', '5,6']\n"
    assert alice.notes == ["fetched edited.csv, 12 bytes, from your notebook's folder",
                           "fetched edited.csv, 8 bytes, from your notebook's folder"]
    # A copy the cell wrote to is the cell's own: it stays, though the notebook's changed too.
    alice.run("open('edited.csv', 'a').write('remote\\n')")
    path.write_text("x,y\n7,8\n9,0\n")
    assert alice.run("print(open('edited.csv').read().split())") == "['x,y', '5,6', 'remote']\n"
    # One removed beside the notebook is gone for the next cell too, as it would be locally.
    gone = _csv(alice.folder, "gone.csv")
    alice.run("open('gone.csv').read()")
    gone.unlink()
    assert alice.fail("open('gone.csv')")[0] == "FileNotFoundError"
    assert len(alice.notes) == 3


def test_a_client_cannot_make_the_worker_drop_a_file_it_did_not_fetch(alice: User) -> None:
    """A hostile client names files the worker never fetched as changed: they stay."""
    alice.run("import os\nos.makedirs('kept', exist_ok=True)\nopen('made-here.txt', 'w').write('the cell wrote this')\n"
              "open('kept/too.txt', 'w').write('and this')")
    folder = alice.session.notebook_files
    assert folder is not None
    for name in ("made-here.txt", "kept/too.txt", "kept", "../made-here.txt", "/etc/hostname", "."):
        folder.served[name] = (0, 0, 0)  # as if sent, and changed since
    assert alice.run("print(open('made-here.txt').read(), open('kept/too.txt').read())") == \
        "the cell wrote this and this\n"
    assert folder.served == {}, "each was named once"


def test_writing_is_not_intercepted(alice: User) -> None:
    (alice.folder / "result.txt").write_text("the notebook's own")
    assert alice.run("open('result.txt', 'w').write('remote')\nprint(open('result.txt').read())") == "remote\n"
    assert alice.run("import os\nfd = os.open('made.txt', os.O_WRONLY | os.O_CREAT)\nos.close(fd)\n"
                     "print(os.path.getsize('made.txt'))") == "0\n"
    assert alice.notes == []
    assert (alice.folder / "result.txt").read_text() == "the notebook's own"


def test_source_that_a_traceback_looks_for_is_not_fetched(alice: User) -> None:
    """Compiled modules name their source relatively (zmq/backend/cython/_zmq.py):
    a traceback's lookups through linecache are not the cell's reads."""
    (alice.folder / "pkg").mkdir()
    (alice.folder / "pkg" / "mod.py").write_text("x = 1\n")
    (alice.folder / "<frozen os>").write_text("not a file anyone means")
    assert alice.run("import linecache\nprint(linecache.getlines('pkg/mod.py'))\n"
                     "try:\n    open('<frozen os>')\nexcept FileNotFoundError:\n    print('not fetched')") \
        == "[]\nnot fetched\n"
    assert alice.notes == []
    assert alice.run("print(open('pkg/mod.py').read(), end='')") == "x = 1\n"
    assert len(alice.notes) == 1


def test_a_file_nowhere_and_fetching_off_fail_as_before(alice: User) -> None:
    ename, evalue = alice.fail("open('nowhere.csv')")
    assert ename == "FileNotFoundError" and "nowhere.csv" in evalue
    _csv(alice.folder, "off.csv")
    alice.session.notebook_files = None
    result = alice.session.execute("open('off.csv')", on_output=quiet)
    assert result.error is not None and result.error.ename == "FileNotFoundError"
    assert "fetching is off" in result.error.traceback[-1] and "%gpu upload" in result.error.traceback[-1]
    assert alice.notes == []


def test_every_way_out_of_the_notebooks_folder_is_refused(alice: User, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the notebook's folder")
    folder = alice.folder
    (folder / "link_out").symlink_to(secret)
    (folder / "big.bin").write_bytes(b"\0" * (MAX + 1))
    os.mkfifo(folder / "fifo")
    (folder / ".hidden").write_text("hidden")
    try:
        # The cell's own opens: refused with the client's reason.
        for path, says in (("link_out", "leads out"), ("big.bin", "over the limit"),
                           ("fifo", "not a regular file"), (".hidden", "hidden")):
            ename, evalue = alice.fail(f"open({path!r}, 'rb')")
            assert ename == "FetchRefused" and says in evalue, (path, evalue)
        ename, evalue = alice.fail(f"open('../{secret.name}')")
        assert ename == "FetchRefused" and "goes up" in evalue
        # Forged requests, as hostile code in the worker can send them.
        forged = alice.run(FORGE + "for name in ('/etc/passwd', '../secret.txt', 'link_out/x', 'fifo', "
                                   "'x' * 5000):\n    print(forge(name))")
        lines = forged.splitlines()
        assert len(lines) == 5 and all(line.startswith("FetchRefused") for line in lines), lines
        assert "absolute path" in lines[0] and "goes up" in lines[1] and "5000 characters" in lines[4]
        assert alice.notes == []
        assert alice.run("import os\nprint(sorted(n for n in os.listdir() if n in "
                         "('link_out', 'big.bin', 'fifo', '.hidden', 'secret.txt', 'forged.out')))") == "[]\n"
        # The session goes on.
        _csv(folder, "after.csv")
        assert alice.run("print(open('after.csv').read().count(','))") == "3\n"
    finally:
        for name in ("link_out", "big.bin", "fifo", ".hidden"):
            (folder / name).unlink()


def test_another_users_cell_never_reaches_your_client(world: World) -> None:
    alice, bob = world.alice, world.bob
    alice.notes.clear()
    bob.notes.clear()
    _csv(alice.folder, "alices.csv")
    started = threading.Event()
    # Alice's cell runs (her client serves files) while bob's cells attack.
    out = alice.run("import os\nprint(os.getcwd())")
    go = Path(out.strip()) / "go"
    result: list[str] = []

    def alices_cell() -> None:
        started.set()
        result.append(alice.run("import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.02)\n"
                                "print('alice done')"))

    thread = threading.Thread(target=alices_cell)
    thread.start()
    try:
        started.wait()
        ename, _ = bob.fail("open('alices.csv')")
        assert ename == "FileNotFoundError"
        assert bob.run(FORGE + "print(forge('alices.csv'))\nprint(forge('../alice-notebook/alices.csv'))"
                       ).splitlines()[0] == "nothing"
        # Bob's client answering fetches nobody asked of it (alice's numbers) writes nothing anywhere.
        for fetch in range(1, 6):
            run_async(_answer(bob.session, fetch))
        assert bob.run("import os\nprint(os.path.exists('alices.csv'), os.path.exists('planted.csv'))") \
            == "False False\n"
    finally:
        go.write_text("")
        thread.join()
    assert result == ["alice done\n"]
    assert alice.notes == [] and bob.notes == []
    assert alice.run("import os\nprint(os.path.exists('planted.csv'))") == "False\n"


async def _answer(session: Session, fetch: int) -> None:
    """An answer to fetch ``fetch`` that no cell of this connection asked for."""
    link = session._session._link
    req, _ = link.open()
    try:
        await link.send(m.Upload(req, ["planted.csv"], (b"planted",), fetch=fetch))
        await link.send(m.FetchRefused(req, fetch, "missing", "forged"))
    finally:
        link.done(req)


def test_the_worker_asks_only_while_its_cell_runs(alice: User) -> None:
    _csv(alice.folder, "later.csv")
    folder = Path(alice.run("import os\nprint(os.getcwd())").strip())
    # A thread that opens the file once its cell has ended gets no file; the session goes on.
    alice.run("import os, threading, time\ndef later():\n"
              "    while not os.path.exists('trigger'):\n        time.sleep(0.02)\n"
              "    try:\n        open('later.csv')\n        found = 'read'\n"
              "    except FileNotFoundError:\n        found = 'not found'\n"
              "    open('found.txt', 'w').write(found)\n"
              "threading.Thread(target=later).start()")
    (folder / "trigger").write_text("")
    found = wait_for(lambda: (folder / "found.txt").exists() and (folder / "found.txt").read_text(),
                     what="the thread's open")
    assert found == "not found"
    assert alice.notes == []
    assert alice.run("print(open('later.csv').read().count(','))") == "3\n"


def test_the_uploads_limit_and_the_users_disk_apply(alice: User) -> None:
    alice.session.notebook_files = NotebookFolder(alice.folder)  # 1 GiB: the server's limits decide
    (alice.folder / "over-upload.bin").write_bytes(b"\1" * (MAX_UPLOAD + 1))
    ename, evalue = alice.fail("open('over-upload.bin', 'rb')")
    assert ename == "FetchRefused" and "over the GPU server's upload limit of 24 MiB" in evalue
    (alice.folder / "over-disk.bin").write_bytes(b"\1" * (DISK + (1 << 20)))
    result = alice.session.execute("open('over-disk.bin', 'rb')", on_output=quiet, on_fetched=alice.notes.append)
    assert result.error is not None and result.error.ename == "OSError", result.error
    assert "No space left" in result.error.evalue and "share 16 MiB of disk" in result.error.traceback[-1]
    # The client sent it (and says so); the server's disk limit then stopped it, as the error says.
    assert alice.notes == ["fetched over-disk.bin, 17 MiB, from your notebook's folder"]
    # Nothing of either is left in the session's folder, and it goes on.
    assert alice.run("import os\nprint([n for n in os.listdir() if 'over-' in n or n.startswith('.upload-')])") \
        == "[]\n"
    _csv(alice.folder, "small.csv")
    assert alice.run("print(open('small.csv').read().count(','))") == "3\n"


def test_an_interrupt_in_the_middle_of_a_fetch_leaves_the_session_whole(alice: User) -> None:
    np = pytest.importorskip("numpy")
    alice.session.notebook_files = NotebookFolder(alice.folder)
    size = 12 << 20
    (alice.folder / "slow.bin").write_bytes(b"\2" * size)
    # The cell interrupts itself once the file has begun to arrive (its temporary file is
    # there): mostly while the rest still streams, else in the wait after the read.
    ename, _ = alice.fail("import os, signal, threading, time\n"
                          "def stop():\n"
                          "    while not any(n.startswith('.upload-') for n in os.listdir()):\n"
                          "        time.sleep(0.002)\n"
                          "    os.kill(os.getpid(), signal.SIGINT)\n"
                          "threading.Thread(target=stop).start()\n"
                          "data = open('slow.bin', 'rb').read()\n"
                          "threading.Event().wait()")
    assert ename == "KeyboardInterrupt"
    # The temporary file goes once the rest of the cut transfer has drained, which may
    # be after the next cell begins: wait for that, then nothing of it may be left.
    wait_for(lambda: alice.run("import os\nprint([n for n in os.listdir() if n.startswith('.upload-')])")
             == "[]\n", timeout=30, what="the interrupted fetch's temporary file to be removed")
    # The data channel is in step: a push and a pull right after carry their own bytes.
    array = np.arange(3 << 20, dtype=np.int64)
    alice.session.push(pushed=array)
    assert np.array_equal(alice.session.pull("pushed")["pushed"], array)
    assert alice.run("print(len(open('slow.bin', 'rb').read()))") == f"{size}\n"

