"""The Remote GPU kernel's input history, for ``history_request``.

The kernel keeps the history itself rather than asking the worker: it sees
every cell (``%%local`` ones too, and those run before a worker was
replaced), and answering needs no GPU. Entries are ``(session, line,
input)`` or, with ``output``, ``(session, line, (input, None))``, as
IPython's history manager answers; this kernel's session number is 1.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

__all__ = ["History"]

SESSION = 1


class History:
    """Inputs by execution count; see the module docstring."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, str]] = []

    def append(self, line: int, code: str) -> None:
        self._entries.append((line, code))

    def __len__(self) -> int:
        return len(self._entries)

    def query(self, access: str, output: bool = False, start: int | None = None, stop: int | None = None,
              n: int | None = None, pattern: str | None = None, unique: bool = False) -> list[Any]:
        """Answer a ``history_request``: ``access`` is ``tail``, ``range`` or ``search``."""
        if access == "tail":
            entries = self._entries[-n:] if n else list(self._entries)
        elif access == "range":
            lo = start or 0
            entries = [e for e in self._entries if e[0] >= lo and (stop is None or e[0] < stop)]
        elif access == "search":
            regex = fnmatch.translate(pattern or "*")
            matcher = re.compile(regex, re.DOTALL)
            entries = [e for e in self._entries if matcher.match(e[1])]
            if unique:
                seen: set[str] = set()
                kept = []
                for entry in reversed(entries):
                    if entry[1] not in seen:
                        seen.add(entry[1])
                        kept.append(entry)
                entries = kept[::-1]
            if n:
                entries = entries[-n:]
        else:
            entries = []
        if output:
            return [(SESSION, line, (code, None)) for line, code in entries]
        return [(SESSION, line, code) for line, code in entries]
