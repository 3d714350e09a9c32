"""Session folders are deleted off the event loop, by one thread of their own.

A session folder can hold gigabytes in millions of files; deleting it takes
as long as the disk needs, and the server must answer everyone meanwhile.
:meth:`FolderRemover.remove` only queues the folder and returns at once.
The remover's thread first renames it into a trash folder beside it
(:data:`TRASH`, on the same filesystem, so the rename is one step: the
folder's name is gone for good), then deletes it there. What a server that
stopped left in a trash folder is deleted once :meth:`FolderRemover.sweep`
names it at the next start.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["TRASH", "FolderRemover"]

log = logging.getLogger("remote_gpu_server")

#: The trash folder's name, beside the folders it takes.
TRASH = ".rgpu-trash"


class FolderRemover:
    """Deletes folders in a thread of its own; see the module docstring.

    ``delete`` deletes one folder (never following links); ``shutil.rmtree``
    unless a test needs to hold a deletion. Call :meth:`close` at the end.
    """

    def __init__(self, delete: Callable[[Path], None] | None = None) -> None:
        self._delete = delete or _rmtree
        self._queue: collections.deque[Path] = collections.deque()
        self._changed = threading.Condition()
        self._busy = 0  # folders queued or being deleted
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Folders queued or being deleted now."""
        return self._busy

    def remove(self, folder: Path) -> None:
        """Delete ``folder`` (and what is in it) soon; returns at once."""
        with self._changed:
            if self._closed:
                log.warning("not deleting %s: the server is stopping (its trash is emptied at the next start)",
                            folder)
                return
            self._queue.append(folder)
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rgpu-folder-removal", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def sweep(self, parent: Path) -> None:
        """Delete what an earlier run left in ``parent``'s trash folder."""
        trash = parent / TRASH
        try:
            names = os.listdir(trash)
        except OSError:
            return
        for name in names:
            self.remove(trash / name)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every folder queued so far is deleted; False if ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._busy == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Take no more folders, and wait up to ``timeout`` for those queued; what is
        left then stays in its trash folder for the next start's :meth:`sweep`."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if not self.wait(timeout):
            log.warning("%d session folder(s) are still being deleted as the server stops; the rest "
                        "is deleted at the next start", self._busy)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                folder = self._queue.popleft()
            log.debug("deleting %s", folder)
            try:
                self._delete(_into_trash(folder))
            except Exception:
                log.exception("could not delete %s", folder)
            finally:
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()


def _into_trash(folder: Path) -> Path:
    """``folder``, renamed into the trash beside it (itself if it is there already,
    or if it cannot be moved: a mount point, another filesystem)."""
    if folder.parent.name == TRASH:
        return folder
    trash = folder.parent / TRASH
    try:
        trash.mkdir(mode=0o700, exist_ok=True)
        moved = trash / f"{folder.name}-{secrets.token_hex(4)}"
        os.rename(folder, moved)
    except FileNotFoundError:
        return folder
    except OSError as exc:
        log.debug("deleting %s in place: %s", folder, exc)
        return folder
    return moved


def _rmtree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
