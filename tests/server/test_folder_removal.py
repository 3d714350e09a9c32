"""Session folders are deleted by a thread of their own, never on the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from remote_gpu_server.isolation.folder_removal import TRASH, FolderRemover


def make_folder(parent: Path, name: str = "session", files: int = 20) -> Path:
    folder = parent / name
    (folder / "sub").mkdir(parents=True)
    for i in range(files):
        (folder / "sub" / f"{i}.txt").write_text("x")
    return folder


def test_remove_returns_at_once_and_the_loop_runs_while_a_deletion_is_held(tmp_path: Path) -> None:
    started, go_on = threading.Event(), threading.Event()
    deleted: list[Path] = []

    def held_delete(folder: Path) -> None:  # a deletion that takes as long as the test says
        started.set()
        go_on.wait(30)
        deleted.append(folder)

    remover = FolderRemover(held_delete)
    folder = make_folder(tmp_path)

    async def main() -> None:
        remover.remove(folder)
        assert await asyncio.to_thread(started.wait, 30)
        # The deletion is held, and the loop still runs other work.
        ran = asyncio.get_running_loop().create_task(asyncio.sleep(0, result="ran"))
        assert await ran == "ran"
        assert remover.pending == 1

    asyncio.run(main())
    assert not folder.exists()  # renamed into the trash before it is deleted
    [moved] = (tmp_path / TRASH).iterdir()
    assert moved.name.startswith("session-") and (moved / "sub" / "0.txt").exists()
    go_on.set()
    assert remover.wait(30) and deleted == [moved]
    remover.close()


def test_folders_are_deleted_without_following_links(tmp_path: Path) -> None:
    outside = make_folder(tmp_path, "outside")
    folder = make_folder(tmp_path, "session")
    (folder / "link").symlink_to(outside)
    remover = FolderRemover()
    remover.remove(folder)
    assert remover.wait(30)
    assert not folder.exists() and os.listdir(tmp_path / TRASH) == []
    assert len(list((outside / "sub").iterdir())) == 20
    remover.close()


def test_what_a_stopped_server_left_in_the_trash_goes_at_the_next_start(tmp_path: Path) -> None:
    left = make_folder(tmp_path / TRASH, "session-1234abcd")
    remover = FolderRemover()
    remover.sweep(tmp_path)
    remover.sweep(tmp_path / "no-such-folder")
    assert remover.wait(30) and not left.exists()
    remover.close()
    remover.remove(make_folder(tmp_path, "late"))  # after close: left for the next start
    assert (tmp_path / "late").exists()
