"""An ipykernel application that reads its shell socket on the main loop.

Used by the Remote GPU kernel and by every worker on the GPU server.
"""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp

__all__ = ["MainLoopKernelApp"]


class MainLoopKernelApp(IPKernelApp):  # type: ignore[misc]
    """IPKernelApp without the shell-channel thread.

    ipykernel 7 receives shell messages on a thread of their own and passes
    each one, and each reply, through an inproc socket to and from the main
    thread: two thread hops per request that serve only kernel subshells,
    which neither the Remote GPU kernel nor a worker offers. Without that
    thread the shell socket is read on the main loop, as in ipykernel 6.
    """

    def init_sockets(self) -> None:
        super().init_sockets()
        thread, self.shell_channel_thread = self.shell_channel_thread, None
        if thread is not None:
            thread.io_loop.close()
