"""Files between a client and its session's folder, against the real server.

A server of the test's own (``--session-root``, a small ``--max-upload``) so the
session folders and the limit can be checked. Paths are confined on the
worker: a hostile symbolic link made by the user's own cell is refused.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_kernel import AsyncClient, AsyncSession, Client, ConnectionLost, FileTransferError, WorkerDied
from remote_gpu_kernel.sync import run
from remote_gpu_core.protocol import messages as m
from servers import ServerProcess
from waiting import wait_for

LIMIT = 3 << 20


@pytest.fixture
def files_server(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[ServerProcess]:
    fresh_server.args = ["--session-root", str(tmp_path / "work"), "--max-upload", "3M"]
    fresh_server.start()
    yield fresh_server
    fresh_server.stop()


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The client's working folder, with a file and a folder to send."""
    local = tmp_path / "local"
    (local / "images").mkdir(parents=True)
    (local / "images" / "a.png").write_bytes(b"\x89PNG" + os.urandom(2000))
    (local / "images" / "b.txt").write_text("bee")
    (local / "data.csv").write_text("x,y\n1,2\n")
    monkeypatch.chdir(local)
    return local


def test_upload_run_download_in_the_sessions_own_folder(files_server: ServerProcess, here: Path,
                                                        tmp_path: Path) -> None:
    client = Client(files_server.url, files_server.token("alice"))
    with client.session() as session:
        progress: list[tuple[int, int]] = []
        sent = session.upload("data.csv", "images", on_progress=lambda d, t: progress.append((d, t)))
        assert sent == [("data.csv", 8), ("images/a.png", 2004), ("images/b.txt", 3)]
        assert progress and progress[-1][0] == progress[-1][1]
        run = session.execute("import os\nprint(os.getcwd())\n"
                              "print(open('data.csv').read().splitlines()[1], open('images/b.txt').read())\n"
                              "os.makedirs('out', exist_ok=True)\nopen('out/r.txt', 'w').write('result')",
                              on_output=lambda _: None)
        cwd, line = run.stdout.splitlines()
        # In the session root; as root, in alice's own disk there (see user_disks).
        assert tmp_path / "work" in Path(cwd).parents and line == "1,2 bee"
        got = session.download("out", into=tmp_path / "back")
        assert got == [(str(tmp_path / "back" / "out" / "r.txt"), 6)]
        assert (tmp_path / "back" / "out" / "r.txt").read_text() == "result"
        # Files outlive a worker's death within the session, not the session.
        with pytest.raises(WorkerDied):
            session.execute("import os; os._exit(1)", on_output=lambda _: None)
        again = session.execute("import os; print(os.getcwd(), open('data.csv').read().count(','))",
                                on_output=lambda _: None)
        assert again.stdout == f"{cwd} 2\n"
    wait_for(lambda: not Path(cwd).exists(), what="the folder to go with the session")


def test_a_relative_file_not_found_remotely_names_upload(files_server: ServerProcess, here: Path) -> None:
    client = Client(files_server.url, files_server.token("alice"))
    with client.session() as session:
        run = session.execute("open('images/none.png', 'rb')", on_output=lambda _: None)
        assert run.error is not None and run.error.ename == "FileNotFoundError"
        assert "%gpu upload" in run.error.traceback[-1]
        session.notebook_files = None  # images/a.png is here, and is not fetched with fetching off
        off = session.execute("open('images/a.png', 'rb')", on_output=lambda _: None)
        assert off.error is not None and off.error.ename == "FileNotFoundError"
        assert "%gpu upload" in off.error.traceback[-1]
        absolute = session.execute("open('/no/such/file')", on_output=lambda _: None)
        assert absolute.error is not None and "%gpu upload" not in absolute.error.traceback[-1]


def test_hostile_links_and_paths_out_of_the_folder_are_refused(files_server: ServerProcess, here: Path,
                                                             tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("do not read")
    client = Client(files_server.url, files_server.token("alice"))
    with client.session() as session:
        session.execute(f"import os\nos.symlink({str(secret)!r}, 'out')\n"
                        f"os.symlink({str(secret / 'key')!r}, 'key')\nos.mkdir('inner')",
                        on_output=lambda _: None)
        for path in ("key", "out/key", "out", "../secret/key", "/etc/hostname"):
            with pytest.raises(FileTransferError, match="absolute|goes up|leads out"):
                session.download(path, into=tmp_path / "got")
        assert not (tmp_path / "got").exists()
        (here / "evil.txt").write_text("evil")
        # The client keeps only a name for paths that go up; a raw upload
        # that names a path through the link is refused by the worker.
        with pytest.raises(FileTransferError, match="leads out"):
            run(_raw_upload(session._session, ["out/planted.txt"]))
        with pytest.raises(FileTransferError, match="goes up"):
            run(_raw_upload(session._session, ["inner/../../planted.txt"]))
        assert sorted(p.name for p in secret.iterdir()) == ["key"], "nothing was written out there"
        assert session.upload("evil.txt") == [("evil.txt", 4)]  # the session is still usable


async def _raw_upload(session: AsyncSession, paths: list[str]) -> None:
    """An Upload as a hostile client would send it."""
    async with session._exchange(lambda r: m.Upload(r, paths, tuple(b"x" for _ in paths))) as receive:
        await session._expect(receive, m.UploadDone)


def test_missing_and_oversized_uploads_fail_clearly_and_lose_nothing(files_server: ServerProcess,
                                                                     here: Path) -> None:
    client = Client(files_server.url, files_server.token("alice"))
    with client.session() as session:
        assert session.max_upload == LIMIT
        with pytest.raises(FileTransferError, match="no such file here"):
            session.upload("data.csv", "nope.csv")
        (here / "big.bin").write_bytes(b"\0" * (LIMIT + 1))
        with pytest.raises(FileTransferError, match="over the GPU server's limit of 3 MiB"):
            session.upload("big.bin")
        listing = session.execute("import os; print(sorted(os.listdir('.')))", on_output=lambda _: None)
        assert listing.stdout == "[]\n", "nothing of a refused upload was written"
        with pytest.raises(FileTransferError, match="no file 'missing.txt'"):
            session.download("missing.txt")
        assert session.upload("data.csv") == [("data.csv", 8)]


def test_the_server_refuses_an_upload_over_its_limit_itself(files_server: ServerProcess, here: Path) -> None:
    # A client that does not check first: the server refuses the upload by its
    # header and, since its bytes are still on the way, closes the connection
    # saying why (see test_limits). Whichever the client reads first, the
    # refusal or the close, names the limit; the session, resumed, holds no file.
    token = files_server.token("alice")

    async def run() -> None:
        async with AsyncClient(files_server.url, token).session() as session:
            big = b"\0" * (LIMIT + 1)
            session._link.limits = {}
            with pytest.raises((FileTransferError, ConnectionLost), match="max-upload"):
                async with session._exchange(lambda r: m.Upload(r, ["big.bin"], (big,))) as receive:
                    await session._expect(receive, m.UploadDone)
            async with AsyncClient(files_server.url, token).session(resume=session.id) as again:
                result = await again.execute("import os; print(os.listdir('.'))", on_output=lambda _: None)
                assert result.stdout == "[]\n"

    asyncio.run(run())
