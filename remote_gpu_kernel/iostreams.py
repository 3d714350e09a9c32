"""ipykernel output streams, made cheaper to flush when there is nothing to flush.

Used by the Remote GPU kernel and by every worker.
"""

from __future__ import annotations

from typing import Any

__all__ = ["skip_empty_flushes"]


def skip_empty_flushes(stream: Any) -> None:
    """Make ``stream.flush()`` return at once when nothing was written since the last one.

    ipykernel flushes stdout and stderr four times per request, and each
    flush of its ``OutStream`` waits for a round trip through the IOPub
    thread: most requests write nothing (a remote cell writes nothing to the
    Remote GPU kernel's streams, a trivial cell nothing to a worker's), so
    those waits are pure latency. A stream with text buffered still flushes
    fully, so output still comes before the reply. Streams that are not
    ipykernel's are left alone.
    """
    buffers = getattr(stream, "_buffers", None)
    if not isinstance(buffers, dict):
        return
    flush = stream.flush

    def flush_if_written() -> None:
        if stream._buffers or getattr(stream, "_flush_pending", True):
            flush()

    stream.flush = flush_if_written
