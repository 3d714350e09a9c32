"""The Jupyter channels of a worker on another host cross the network only
encrypted (CurveZMQ under a key pair made for that worker).

The worker is started by the local launcher's ``tcp`` transport, as a Ray
node's host actor starts it; the server reaches each of its channels
through a proxy on loopback that keeps every byte it carries, both ways: a
cell's code and output, and the messages' JSON headers, must not be among
them. With the keys left out of the connection file (or a jupyter_client
or ipykernel too old to use them) they all are, in clear.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from remote_gpu_core.ids import SlotId
from remote_gpu_server.isolation.tenant import Tenant
from remote_gpu_server.workers.launcher import WorkerSpec
from remote_gpu_server.workers.local_launcher import LocalLauncher, LocalWorker, curve_problem
from remote_gpu_server.gpus.slots import Slot
from remote_gpu_server.workers.worker import Worker
from tcp_proxy import TcpProxy

SLOT = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")
CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class ProxiedLauncher:
    """The ``tcp`` launcher, whose workers' Jupyter channels the server reaches through
    proxies that keep what they carry; call :meth:`close` at the end."""

    def __init__(self) -> None:
        self.inner = LocalLauncher(transport="tcp", ip="127.0.0.1")
        self.proxies: list[TcpProxy] = []

    async def launch(self, spec: WorkerSpec) -> LocalWorker:
        process = await self.inner.launch(spec)
        for channel in CHANNELS:
            proxy = TcpProxy("127.0.0.1", process.connection_info[channel], keep=True)
            self.proxies.append(proxy)
            process.connection_info[channel] = proxy.port
        return process

    @property
    def carried(self) -> bytes:
        return b"".join(bytes(proxy.carried) for proxy in self.proxies)

    def release(self, tenant: Tenant | None) -> None:
        self.inner.release(tenant)

    async def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        await self.inner.close()


def test_a_cells_code_and_output_cross_between_hosts_only_encrypted() -> None:
    marker = f"in-clear-{secrets.token_hex(8)}"

    async def scenario() -> bytes:
        launcher = ProxiedLauncher()
        try:
            worker = await Worker.start(launcher, [SLOT], 120)
            try:
                printed: list[str] = []

                async def on_iopub(msg: dict[str, Any]) -> None:
                    if msg["msg_type"] == "stream":
                        printed.append(msg["content"]["text"])

                reply = await worker.execute(f"print({marker!r}.upper(), {marker!r})", on_iopub)
                assert reply["status"] == "ok", reply
                assert "".join(printed) == f"{marker.upper()} {marker}\n"
            finally:
                await worker.kill()
            return launcher.carried
        finally:
            await launcher.close()

    carried = asyncio.run(scenario())
    assert len(carried) > 4096  # the kernel's start, the cell and its output all went through the proxies
    for clear in (marker.encode(), marker.upper().encode(), b"execute_request", b"msg_type", b"hmac-sha256"):
        assert clear not in carried, clear
    assert b"CURVE" in carried  # the mechanism each channel's greeting names, in clear by design


def test_releases_that_would_run_the_channels_in_clear_are_refused() -> None:
    assert curve_problem() is None  # the installed ones encrypt
    assert curve_problem({"jupyter_client": "8.9.0", "ipykernel": "7.3.0"}) is None
    old = curve_problem({"jupyter_client": "8.6.3", "ipykernel": "6.29.5"})
    assert old is not None and "jupyter_client 8.6.3 and ipykernel 6.29.5 would run" in old
    assert "in clear" in old and "jupyter_client 8.9 and ipykernel 7.3 or later" in old
    assert curve_problem({"jupyter_client": "8.10.0", "ipykernel": "7.2.1"}) is not None
