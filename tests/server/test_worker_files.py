"""The worker's side of file transfers, without a worker: paths, sinks, the hint."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from remote_gpu_server.worker_process.files import (
    HINT, FileSink, Folder, PathRefused, disk_full_hint, file_not_found_hint
)


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    root = tmp_path / "session"
    root.mkdir()
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("a")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("k")
    os.symlink(outside, root / "escape")            # a folder link that leads out
    os.symlink(outside / "key", root / "key-link")  # a file link that leads out
    os.symlink(root / "data" / "a.txt", root / "inside-link")  # a link that stays in
    return Folder(root)


@pytest.mark.parametrize("path, reason", [
    ("/etc/passwd", "absolute path"),
    ("../secret/key", "goes up"),
    ("data/../../secret/key", "goes up"),
    ("escape/key", "leads out"),
    ("key-link", "leads out"),
    ("escape", "leads out"),
    ("", "not a file name"),
    ("a\x00b", "not a file name"),
])
def test_paths_out_of_the_folder_are_refused(folder: Folder, path: str, reason: str) -> None:
    with pytest.raises(PathRefused, match=reason):
        folder.resolve(path)


def test_paths_inside_resolve_and_folders_list_their_files(folder: Folder) -> None:
    assert folder.resolve("data/a.txt") == folder.root / "data" / "a.txt"
    assert folder.resolve("inside-link") == folder.root / "data" / "a.txt"
    assert folder.resolve("new/dir/file.bin") == folder.root / "new" / "dir" / "file.bin"
    assert [name for name, _ in folder.files(["data"])] == ["data/a.txt"]
    with pytest.raises(FileNotFoundError, match="no file 'missing.txt'"):
        folder.files(["missing.txt"])
    names, buffers = folder.read(["data/a.txt", "inside-link"])
    assert names == ["data/a.txt", "inside-link"] and [bytes(b) for b in buffers] == [b"a", b"a"]


def test_a_folder_walk_refuses_a_link_inside_it_that_leads_out(folder: Folder) -> None:
    os.symlink(folder.root.parent / "secret" / "key", folder.root / "data" / "sneaky")
    with pytest.raises(PathRefused, match="leads out"):
        folder.files(["data"])


def test_a_sink_writes_files_in_place_only_when_complete(tmp_path: Path) -> None:
    targets = [tmp_path / "x" / "one.bin", tmp_path / "empty", tmp_path / "two.bin"]
    sink = FileSink(targets, [5, 0, 3])
    for piece in (b"12", b"345ab", b"c"):
        sink.add(piece)
    assert sink.done
    assert not targets[0].exists(), "nothing is in place before the end"
    sink.finish()
    assert [t.read_bytes() for t in targets] == [b"12345", b"", b"abc"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["empty", "one.bin", "two.bin"]
    with pytest.raises(ValueError, match="more bytes"):
        FileSink([tmp_path / "y"], [1]).add(b"12")


def test_a_refused_or_short_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    refused = FileSink([], [4], PathRefused("no"))
    refused.add(b"data")  # read and dropped
    with pytest.raises(PathRefused):
        refused.finish()
    short = FileSink([tmp_path / "half.bin"], [10])
    short.add(b"12345")
    with pytest.raises(ConnectionError, match="before all its bytes"):
        short.finish()
    assert list(tmp_path.iterdir()) == []


def test_the_hint_names_upload_for_relative_paths_only() -> None:
    assert file_not_found_hint(FileNotFoundError(2, "No such file", "images/x.png")) == HINT
    assert "%gpu upload" in HINT
    assert file_not_found_hint(FileNotFoundError(2, "No such file", "/abs/x.png")) is None
    assert file_not_found_hint(FileNotFoundError("made up")) is None


def test_the_disk_hint_comes_under_writes_that_found_no_space_in_the_session_folders() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    hint = disk_full_hint(full, "16 MiB")
    assert hint is not None and "share 16 MiB of disk (rgpu serve --session-disk)" in hint
    assert disk_full_hint(OSError(errno.EFBIG, "File too large", "big.bin"), "16 MiB") == hint
    assert disk_full_hint(OSError(errno.ENOSPC, "No space left on device", "/tmp/x"), "16 MiB") is None
    assert disk_full_hint(OSError(errno.EACCES, "Permission denied"), "16 MiB") is None
    assert disk_full_hint(full, None) is None  # no limit: nothing to explain
