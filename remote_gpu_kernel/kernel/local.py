"""The Remote GPU kernel's local namespace: where ``%%local`` cells run.

:class:`LocalNamespace` owns an IPython ``InteractiveShell`` in the kernel's
own process, made on first use (it costs ~0.1 s). Its rich displays and
results go to the notebook through ipykernel's ZMQ display publisher and
display hook, its prints through the kernel's stdout/stderr streams, and
its errors through ``on_error``. History is off: the kernel keeps its own.
Call :meth:`LocalNamespace.run` from the kernel's main thread only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["LocalNamespace", "LocalResult"]

#: ``on_error(ename, evalue, traceback)``; what it returns is not used.
ErrorHandler = Callable[[str, str, list[str]], object]


class LocalResult:
    """What a local cell did: ``ok``, or the error's name, value and traceback."""

    def __init__(self, ename: str = "", evalue: str = "", traceback: list[str] | None = None) -> None:
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback or []

    @property
    def ok(self) -> bool:
        return not self.ename


def _shell_class() -> Any:
    from ipykernel.displayhook import ZMQShellDisplayHook
    from ipykernel.zmqshell import ZMQDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class _LocalShell(InteractiveShell):
        displayhook_class = ZMQShellDisplayHook
        display_pub_class = ZMQDisplayPublisher
        on_error: ErrorHandler | None = None
        last_error: tuple[str, str, list[str]] | None = None

        def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
            name = getattr(etype, "__name__", str(etype))
            self.last_error = (name, str(evalue), list(stb))
            if self.on_error is not None:
                self.on_error(name, str(evalue), list(stb))

        def init_virtualenv(self) -> None:
            """The kernel runs in its own environment: nothing to warn about."""

    return _LocalShell


class LocalNamespace:
    """See the module docstring; ``session`` and ``iopub`` are the kernel's."""

    def __init__(self, session: Any, iopub: Any, topic: Callable[[str], bytes]) -> None:
        self._session = session
        self._iopub = iopub
        self._topic = topic
        self._shell: Any = None

    @property
    def shell(self) -> Any:
        """The InteractiveShell, made on first use."""
        if self._shell is None:
            from traitlets.config import Config

            config = Config()
            config.HistoryManager.enabled = False
            shell = _shell_class().instance(config=config)
            shell.displayhook.session = self._session
            shell.displayhook.pub_socket = self._iopub
            shell.displayhook.topic = self._topic("execute_result")
            shell.display_pub.session = self._session
            shell.display_pub.pub_socket = self._iopub
            self._shell = shell
        return self._shell

    @property
    def user_ns(self) -> dict[str, Any]:
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    def run(self, code: str, parent: dict[str, Any], execution_count: int, *,
            silent: bool = False, store_history: bool = True,
            on_error: ErrorHandler | None = None) -> LocalResult:
        """Run ``code``; outputs are sent as replies to ``parent``."""
        shell = self.shell
        shell.displayhook.set_parent(parent)
        shell.display_pub.set_parent(parent)
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "set_parent"):
                stream.set_parent(parent)
        shell.execution_count = execution_count
        shell.on_error, shell.last_error = on_error, None
        try:
            result = shell.run_cell(code, store_history=store_history, silent=silent)
        finally:
            shell.on_error = None
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        if result.success:
            return LocalResult()
        if shell.last_error is not None:
            return LocalResult(*shell.last_error)
        error = result.error_before_exec or result.error_in_exec
        return LocalResult(type(error).__name__, str(error), [])

    def complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        """A ``complete_reply`` content from the local namespace."""
        text, matches = self.shell.complete("", code, cursor_pos)
        return {"matches": list(matches), "cursor_end": cursor_pos,
                "cursor_start": cursor_pos - len(text), "metadata": {}, "status": "ok"}

    def inspect(self, code: str, cursor_pos: int, detail_level: int = 0) -> dict[str, Any]:
        """An ``inspect_reply`` content from the local namespace."""
        from IPython.utils.tokenutil import token_at_cursor

        name = token_at_cursor(code, cursor_pos)
        reply: dict[str, Any] = {"status": "ok", "data": {}, "metadata": {}, "found": False}
        try:
            reply["data"] = self.shell.object_inspect_mime(name, detail_level=detail_level)
            reply["found"] = True
        except KeyError:
            pass
        return reply
