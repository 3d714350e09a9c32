"""What the client sends of its notebook's folder, and what it refuses: no server.

The end-to-end path (a remote cell opens the file) is in
tests/server/test_fetch.py; here every refusal is checked on the
function that decides, with the message the cell will show.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from remote_gpu_core.protocol import messages as m
from remote_gpu_core.errors import FetchRefused
from remote_gpu_kernel.notebook_files import DEFAULT_MAX_SIZE, NotebookFolder, fetched_note, fetching, folder_for


@pytest.fixture
def folder(tmp_path: Path) -> NotebookFolder:
    nb = tmp_path / "nb"
    (nb / "sub").mkdir(parents=True)
    (nb / "data.csv").write_text("x,y\n1,2\n")
    (nb / "sub" / "inner.txt").write_text("inner")
    (nb / "empty.txt").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("outside")
    (nb / "out").symlink_to(tmp_path / "secret.txt")
    (nb / "out_dir").symlink_to(tmp_path)
    (nb / "alias.csv").symlink_to(nb / "data.csv")  # a link that stays inside is followed
    (nb / ".env").write_text("TOKEN=1")
    (nb / "big.bin").write_bytes(b"\0" * 2048)
    os.mkfifo(nb / "fifo")
    return NotebookFolder(nb, max_size=1024)


def _read(folder: NotebookFolder, name: str, limit: int = 0) -> bytes:
    data, size = folder.open(name, limit)
    try:
        return bytes(data[:size])
    finally:
        if hasattr(data, "close"):
            data.close()


def _refusal(folder: NotebookFolder, name: str, limit: int = 0) -> FetchRefused:
    with pytest.raises(FetchRefused) as info:
        folder.open(name, limit)
    return info.value


def test_files_inside_the_folder_are_sent(folder: NotebookFolder) -> None:
    assert _read(folder, "data.csv") == b"x,y\n1,2\n"
    assert _read(folder, "sub/inner.txt") == b"inner"
    assert _read(folder, "./sub//inner.txt") == b"inner"
    assert _read(folder, "alias.csv") == b"x,y\n1,2\n"
    assert _read(folder, "empty.txt") == b""
    assert fetched_note("data.csv", 2_200_000) == "fetched data.csv, 2.1 MiB, from your notebook's folder"


def test_a_file_sent_that_changes_or_goes_is_named_once_by_the_next_cell(folder: NotebookFolder) -> None:
    _read(folder, "data.csv")
    _read(folder, "sub/inner.txt")
    assert fetching(folder) == {"fetch": True, "refetch": []}, "nothing changed"
    (folder.root / "data.csv").write_text("x,y\n3,4\n5,6\n")
    (folder.root / "sub" / "inner.txt").unlink()
    assert sorted(fetching(folder)["refetch"]) == ["data.csv", "sub/inner.txt"]
    assert fetching(folder)["refetch"] == [], "named once: the next open sends it again"
    _read(folder, "data.csv")
    assert fetching(folder)["refetch"] == []
    assert fetching(None) == {"fetch": False, "refetch": []}
    assert "refetch" not in m.Execute(1, "1").fields()
    assert m.Execute(1, "1", refetch=["data.csv"]).fields()["refetch"] == ["data.csv"]


@pytest.mark.parametrize(("name", "says"), [
    ("../secret.txt", "goes up with '..'"),
    ("sub/../../secret.txt", "goes up with '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("out", "leads out of your notebook's folder through a symbolic link"),
    ("out_dir/secret.txt", "leads out of your notebook's folder through a symbolic link"),
    (".env", "hidden"),
    ("sub/.git/config", "hidden"),
    ("fifo", "not a regular file"),
    ("sub", "not a regular file"),
    ("big.bin", "over the limit of files sent from your notebook's folder (RGPU_FETCH_MAX) of 1 KiB"),
    ("", "not a file name"),
    ("a\x00b", "not a file name"),
])
def test_every_way_out_of_the_folder_is_refused(folder: NotebookFolder, name: str, says: str) -> None:
    refused = _refusal(folder, name)
    assert refused.refusal == m.FetchRefusal.REFUSED.value
    assert says in str(refused)


def test_a_device_in_the_folder_is_refused(folder: NotebookFolder) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(folder.root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert "not a regular file" in str(_refusal(folder, "null"))


def test_a_missing_file_and_the_servers_own_limit(folder: NotebookFolder) -> None:
    missing = _refusal(folder, "nope.csv")
    assert missing.refusal == m.FetchRefusal.MISSING.value and "no file 'nope.csv'" in str(missing)
    assert "GPU server's upload limit of 4 bytes" in str(_refusal(folder, "data.csv", limit=4))
    assert _read(folder, "data.csv", limit=100) == b"x,y\n1,2\n"


def test_the_environment_turns_it_off_and_sets_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RGPU_FETCH", raising=False)
    monkeypatch.delenv("RGPU_FETCH_MAX", raising=False)
    assert NotebookFolder.from_environ(None) == NotebookFolder(tmp_path, DEFAULT_MAX_SIZE)
    notebook = tmp_path / "work" / "analysis.ipynb"
    notebook.parent.mkdir()
    assert NotebookFolder.from_environ(str(notebook)) == NotebookFolder(notebook.parent, DEFAULT_MAX_SIZE)
    # Jupyter's path relative to its root is no folder here: the working folder is the notebook's.
    assert NotebookFolder.from_environ("work/analysis.ipynb") == NotebookFolder(tmp_path, DEFAULT_MAX_SIZE)
    monkeypatch.setenv("RGPU_FETCH_MAX", "200M")
    assert NotebookFolder.from_environ(None) == NotebookFolder(tmp_path, 200 << 20)
    monkeypatch.setenv("RGPU_FETCH_MAX", "lots")
    with pytest.raises(ValueError, match="lots"):
        NotebookFolder.from_environ(None)
    monkeypatch.setenv("RGPU_FETCH_MAX", "1K")
    for off in ("0", "off", "No", "false"):
        monkeypatch.setenv("RGPU_FETCH", off)
        assert NotebookFolder.from_environ(None) is None
        assert folder_for(None, None) is None
        assert folder_for(True, None) == NotebookFolder(tmp_path, 1 << 10)  # %gpu fetch on wins
    monkeypatch.setenv("RGPU_FETCH", "1")
    assert folder_for(False, None) is None
