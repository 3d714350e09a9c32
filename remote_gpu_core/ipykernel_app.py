"""ipykernel, adjusted for the Remote GPU kernel and for every worker.

:class:`MainLoopKernelApp` reads the shell socket on the main loop;
:class:`CommsBesideCells` fixes the parent of requests that follow a comm
message handled while a cell ran; :func:`skip_empty_flushes` makes output
streams cheap to flush when nothing was written.

Both the client's kernel and the code that runs inside a worker import
this module; it needs ipykernel, which nothing else in this package does.
"""

from __future__ import annotations

import asyncio
import threading
from contextvars import copy_context
from typing import Any

from ipykernel.kernelapp import IPKernelApp

__all__ = ["CommsBesideCells", "MainLoopKernelApp", "MainLoopShell", "skip_empty_flushes"]

_COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})


class CommsBesideCells:
    """A mixin for an ipykernel ``Kernel``: comm messages that come while a
    cell runs are handled beside it, each in a context of its own.

    ipykernel 7 does the same, and afterwards puts back the request it found
    current when the comm message came. When the comm message takes longer
    than its cell (it goes over the network to a worker), that is an older
    cell than the one running by then, whose idle status then goes out under
    the older cell's id: the frontend never sees that cell end. Here nothing
    is put back: the comm message's parent lives in its own context.
    """

    async def shell_main(self, subshell_id: str | None, msg: Any) -> None:
        kernel: Any = self
        if subshell_id is None and kernel._main_asyncio_lock.locked() and kernel.session is not None:
            try:
                _, frames = kernel.session.feed_identities(msg, copy=False)
                msg_type = kernel.session.deserialize(frames, content=False, copy=False)["header"]["msg_type"]
            except Exception:
                msg_type = ""
            if msg_type in _COMM_TYPES:
                await asyncio.create_task(kernel.dispatch_shell(msg, subshell_id=None, concurrent=True),
                                          context=copy_context())
                return
        await super().shell_main(subshell_id, msg)  # type: ignore[misc]


class _NoShellChannelThread:
    """Stands in for ipykernel's shell-channel thread where there is none.

    ipykernel asks it, for a cell with a top-level ``await``, which thread
    runs cells (``parent_thread``: the main thread here), to decide whether
    SIGINT cancels the awaited cell; without it such a cell failed inside
    ipykernel and was never answered. It is falsy: there is no thread.
    """

    parent_thread = threading.main_thread()

    def __bool__(self) -> bool:
        return False


class MainLoopShell:
    """A mixin for the kernel class of a :class:`MainLoopKernelApp`: its shell
    socket is read on the main loop, so it offers no subshells."""

    @property
    def _supports_kernel_subshells(self) -> bool:
        return False


class MainLoopKernelApp(IPKernelApp):
    """IPKernelApp without the shell-channel thread.

    ipykernel 7 receives shell messages on a thread of their own and passes
    each one, and each reply, through an inproc socket to and from the main
    thread: two thread hops per request that serve only kernel subshells,
    which neither the Remote GPU kernel nor a worker offers. Without that
    thread the shell socket is read on the main loop, as in ipykernel 6.
    Its kernel class includes :class:`MainLoopShell`.
    """

    def init_sockets(self) -> None:
        super().init_sockets()  # type: ignore[no-untyped-call, unused-ignore]
        thread, self.shell_channel_thread = self.shell_channel_thread, _NoShellChannelThread()
        if thread is not None:
            thread.io_loop.close()

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
