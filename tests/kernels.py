"""Drive a real local IPython kernel through jupyter_client, as a notebook does."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

__all__ = ["CellRun", "LocalKernel", "kernel_with_magic"]


@dataclasses.dataclass
class CellRun:
    reply: dict[str, Any]
    messages: list[tuple[float, dict[str, Any]]]  # (seconds since the request, iopub message)

    @property
    def stdout(self) -> str:
        return "".join(msg["content"]["text"] for _, msg in self.messages
                       if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(msg["content"]["text"] for _, msg in self.messages
                       if msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr")

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [msg["content"] for _, msg in self.messages if msg["msg_type"] == msg_type]


class LocalKernel:
    def __init__(self, env: dict[str, str], cwd: str | None = None) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, **({"cwd": cwd} if cwd is not None else {}))
        self.kc: BlockingKernelClient = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60, interrupt_after: float | None = None,
            on_message: Callable[[dict[str, Any]], None] | None = None) -> CellRun:
        """Run ``code``; ``on_message`` sees each of its output messages as it comes."""
        msg_id = self.kc.execute(code)
        start = time.monotonic()
        messages: list[tuple[float, dict[str, Any]]] = []
        interrupted = False
        deadline = start + timeout
        while True:
            if interrupt_after is not None and not interrupted and time.monotonic() - start > interrupt_after:
                self.km.interrupt_kernel()
                interrupted = True
            try:
                msg = self.kc.get_iopub_msg(timeout=0.1)
            except Exception:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cell did not finish in {timeout} s: {code!r}") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                if msg["content"]["execution_state"] == "idle":
                    break
                continue
            messages.append((time.monotonic() - start, msg))
            if on_message is not None:
                on_message(msg)
        # Skip stale replies: wait_for_ready may have sent several
        # kernel_info requests on a loaded machine, each answered later.
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return CellRun(reply["content"], messages)

    def close(self, now: bool = True) -> None:
        """Stop the kernel: killed (``now``), or asked to shut down as Jupyter asks."""
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=now)


@contextlib.contextmanager
def kernel_with_magic(env: dict[str, str]) -> Iterator[LocalKernel]:
    """A local kernel with ``%load_ext remote_gpu_kernel``; at the end it releases
    its GPU and is stopped, even when the release does not answer (a kernel
    left running would hold its lease for the rest of the test session)."""
    kernel = LocalKernel(env)
    try:
        run = kernel.run("%load_ext remote_gpu_kernel")
        assert run.reply["status"] == "ok", run.reply
        yield kernel
        kernel.run("%gpu release")
    finally:
        kernel.close()
