"""Drive the Remote GPU kernel through jupyter_client, as JupyterLab does.

:func:`install_kernelspec` installs the kernelspec into a temporary prefix
and returns the folder to put in ``JUPYTER_PATH``. :class:`KernelDriver`
starts the kernel with a ``KernelManager`` by kernel name and runs cells:
each :meth:`KernelDriver.run` waits for the shell reply and the IOPub idle
status of its request, answers ``input_request``\\ s from a list, and
returns every IOPub message of the request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

__all__ = ["KernelDriver", "Run", "install_kernelspec", "kernel_env"]


def install_kernelspec(prefix: Path, url: str | None = None) -> Path:
    """Install the "Remote GPU" kernelspec under ``prefix``; return its JUPYTER_PATH entry."""
    from remote_gpu_kernel.kernelspec import install

    install(prefix=str(prefix), url=url)
    return prefix / "share" / "jupyter"


def kernel_env(tmp: Path, url: str | None, token: str | None) -> dict[str, str]:
    """The kernel's environment: no stray client config, the given server."""
    env = dict(os.environ, RGPU_CONFIG=str(tmp / "no-client-config.json"), PYTHONUNBUFFERED="1")
    for name, value in (("RGPU_URL", url), ("RGPU_TOKEN", token)):
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


@dataclasses.dataclass
class Run:
    """One request's reply content and its IOPub messages (status excluded)."""

    reply: dict[str, Any]
    messages: list[dict[str, Any]]
    seconds: float

    @property
    def status(self) -> str:
        return str(self.reply["status"])

    def of(self, msg_type: str) -> list[dict[str, Any]]:
        return [msg["content"] for msg in self.messages if msg["msg_type"] == msg_type]

    @property
    def types(self) -> list[str]:
        return [msg["msg_type"] for msg in self.messages]

    @property
    def stdout(self) -> str:
        return "".join(c["text"] for c in self.of("stream") if c["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(c["text"] for c in self.of("stream") if c["name"] == "stderr")

    def text(self, msg_type: str = "execute_result") -> list[str]:
        return [c["data"].get("text/plain", "") for c in self.of(msg_type)]


class KernelDriver:
    """One kernel: ``start()``, ``run()`` cells, ``shutdown()``."""

    def __init__(self, env: dict[str, str], kernel_name: str = "remote-gpu") -> None:
        self.env = env
        self.km = KernelManager(kernel_name=kernel_name)
        self.kc: BlockingKernelClient | None = None

    def start(self, timeout: float = 60, cwd: Path | None = None) -> KernelDriver:
        self.km.start_kernel(env=self.env, **({"cwd": str(cwd)} if cwd is not None else {}))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=timeout)
        return self

    @property
    def client(self) -> BlockingKernelClient:
        assert self.kc is not None
        return self.kc

    def collect(self, msg_id: str, timeout: float = 60, inputs: list[str] | None = None,
                on_message: Callable[[dict[str, Any]], None] | None = None,
                reply_channel: str = "shell") -> Run:
        """Wait for ``msg_id``'s reply and idle status; answer input requests from ``inputs``."""
        kc = self.client
        started = time.monotonic()
        deadline = started + timeout
        messages: list[dict[str, Any]] = []
        reply: dict[str, Any] | None = None
        idle = False
        answers = list(inputs or [])
        while not (idle and reply is not None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply/idle for {msg_id} in {timeout} s; got {messages}")
            if answers and kc.stdin_channel.msg_ready():
                request = kc.get_stdin_msg(timeout=1)
                if request["msg_type"] == "input_request":
                    kc.input(answers.pop(0))
            if reply is None:
                channel = kc.shell_channel if reply_channel == "shell" else kc.control_channel
                if channel.msg_ready():
                    msg = channel.get_msg(timeout=1)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        reply = msg["content"]
            try:
                msg = kc.get_iopub_msg(timeout=0.02)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                idle = idle or msg["content"]["execution_state"] == "idle"
                continue
            messages.append(msg)
            if on_message is not None:
                on_message(msg)
        return Run(reply, messages, time.monotonic() - started)

    def run(self, code: str, timeout: float = 60, allow_stdin: bool = False,
            inputs: list[str] | None = None,
            on_message: Callable[[dict[str, Any]], None] | None = None) -> Run:
        msg_id = self.client.execute(code, allow_stdin=allow_stdin or bool(inputs), stop_on_error=False)
        return self.collect(msg_id, timeout, inputs, on_message)

    def request(self, msg_type: str, content: dict[str, Any], timeout: float = 30) -> Run:
        """Send any shell request and wait for its reply and idle."""
        msg = self.client.session.msg(msg_type, content)
        self.client.shell_channel.send(msg)
        return self.collect(msg["header"]["msg_id"], timeout)

    def send_comm(self, msg_type: str, content: dict[str, Any]) -> str:
        """Send a comm message as the notebook's widget manager does; return its id."""
        msg = self.client.session.msg(msg_type, content)
        self.client.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def iopub_for(self, msg_id: str, until: Callable[[list[dict[str, Any]]], bool],
                  timeout: float = 30) -> list[dict[str, Any]]:
        """IOPub messages with parent ``msg_id`` until ``until(messages)`` holds."""
        deadline = time.monotonic() + timeout
        messages: list[dict[str, Any]] = []
        while not until(messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f"IOPub for {msg_id}: condition not met; got {messages}")
            try:
                msg = self.client.get_iopub_msg(timeout=0.1)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] != "status":
                messages.append(msg)
        return messages

    def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


@contextlib.contextmanager
def remote_kernel(tmp_path_factory: pytest.TempPathFactory, url: str, token: str,
                  *setup: str) -> Iterator[KernelDriver]:
    """The Remote GPU kernel, started by kernel name against ``url`` as ``token``'s user,
    each ``setup`` cell run (and asserted ok) first; its GPU released at the end."""
    path = install_kernelspec(tmp_path_factory.mktemp("prefix"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(path))  # where the manager finds the kernelspec
        driver = KernelDriver(kernel_env(tmp_path_factory.mktemp("kernel"), url, token)).start()
    try:
        for code in setup:
            assert driver.run(code).status == "ok", code
        yield driver
    finally:
        driver.run("%gpu release")
        driver.shutdown()
