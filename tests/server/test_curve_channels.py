"""The Jupyter channels of a worker on another host cross the network only
encrypted (CurveZMQ under a key pair made for that worker).

The worker is started by the local launcher's ``tcp`` transport, as a Ray
node's host actor starts it; the server reaches each of its channels
through a relay on loopback that keeps every byte it carries, both ways: a
cell's code and output, and the messages' JSON headers, must not be among
them. With the keys left out of the connection file (or a jupyter_client
or ipykernel too old to use them) they all are, in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

from remote_gpu_kernel.typing import SlotId
from remote_gpu_server.isolation import Tenant
from remote_gpu_server.launcher import WorkerSpec
from remote_gpu_server.local_launcher import LocalLauncher, LocalWorker, curve_problem
from remote_gpu_server.slots import Slot
from remote_gpu_server.worker import Worker

SLOT = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")
CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class Relay:
    """TCP forwarders on loopback that keep what they carry; call :meth:`close` at the end."""

    def __init__(self) -> None:
        self.carried = bytearray()
        self._servers: list[asyncio.Server] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def forward(self, port: int) -> int:
        """A new port on loopback whose connections go on to ``port``."""

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", port)
            self._writers.append(upstream)
            for source, sink in ((reader, upstream), (upstream_reader, writer)):
                pump = asyncio.ensure_future(self._pump(source, sink))
                self._pumps.add(pump)
                pump.add_done_callback(self._pumps.discard)

        server = await asyncio.start_server(connected, "127.0.0.1", 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(1 << 16):
                self.carried += data
                sink.write(data)
                await sink.drain()
        sink.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class RelayedLauncher:
    """The ``tcp`` launcher, whose workers' Jupyter channels the server reaches through ``relay``."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.inner = LocalLauncher(transport="tcp", ip="127.0.0.1")

    async def launch(self, spec: WorkerSpec) -> LocalWorker:
        process = await self.inner.launch(spec)
        for channel in CHANNELS:
            process.connection_info[channel] = await self.relay.forward(process.connection_info[channel])
        return process

    def release(self, tenant: Tenant | None) -> None:
        self.inner.release(tenant)

    async def close(self) -> None:
        await self.inner.close()


def test_a_cells_code_and_output_cross_between_hosts_only_encrypted() -> None:
    marker = f"in-clear-{secrets.token_hex(8)}"

    async def scenario() -> bytes:
        relay = Relay()
        launcher = RelayedLauncher(relay)
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
        finally:
            await launcher.close()
            await relay.close()
        return bytes(relay.carried)

    carried = asyncio.run(scenario())
    assert len(carried) > 4096  # the kernel's start, the cell and its output all went through the relay
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
