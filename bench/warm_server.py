"""A server for a benchmark, ready when its HTTP API says so.

Every benchmark that needs a GPU server starts it here::

    with WarmServer(folder, "cpu:1", "--no-isolation") as server:
        session = server.client().session()
        ...
        session.release()
        server.wait_warm()   # the released slot's fresh worker has started

The process is the tests' :class:`servers.ServerProcess` (``rgpu serve
--port 0`` on loopback with a SQLite file in ``folder``, or the store
``db`` names), started without waiting for any line of its log beyond the
one that gives its URL, which the whole test suite reads too. Readiness
comes from ``GET /api/status``: :meth:`WarmServer.wait_warm` returns once
every slot has a started worker waiting on it (``"warm": true``), so a
timed lease never takes a cold slot, whatever the log says and however the
log's words change. A server that exits while it is waited on fails at
once, with the end of its log.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess  # noqa: E402

from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient

__all__ = ["WarmServer"]

#: Seconds between two readings of ``/api/status`` while waiting.
POLL = 0.1


class WarmServer:
    """Call :meth:`start` (or use ``with``), then :meth:`stop`.

    ``slots`` and ``args`` go to ``rgpu serve``; ``user`` is whom the
    token made at the start belongs to (:attr:`token`).
    """

    def __init__(self, folder: Path, slots: str = "cpu:1", *args: str, db: str | None = None,
                 user: str = "bench") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.process = ServerProcess(folder, slots, *args, db=db, preload=None)
        self.user = user
        self.token = ""
        #: The certificate to trust for a ``--tls`` server the system does not
        #: (for ``--tls self-signed``: ``tls_certs.self_signed_cert(server.process)``); set it before starting.
        self.cafile: Path | None = None
        self._api: ApiClient | None = None

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int:
        assert self.process.proc is not None, "call start() first"
        return self.process.proc.pid

    @property
    def api(self) -> ApiClient:
        assert self._api is not None, "call start() first"
        return self._api

    def launch(self, timeout: float = 180) -> WarmServer:
        """Start the process and wait for its URL only; :meth:`wait_warm` next
        (several servers may warm up at once this way)."""
        if self.process.process is not None:
            raise RuntimeError("this server was started already: start it once, with `with` or start(), not both")
        self.token = self.process.token(self.user)
        self.process.start(wait_warm=False, timeout=timeout)
        self._api = ApiClient(self.url, self.token, cafile=self._cafile)
        return self

    def start(self, timeout: float = 180) -> WarmServer:
        """:meth:`launch`, then :meth:`wait_warm`."""
        self.launch(timeout)
        try:
            self.wait_warm(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def _cafile(self) -> str | None:
        return str(self.cafile) if self.cafile is not None else None

    def client(self, url: str | None = None) -> Client:
        """A client of this server as :attr:`user`; ``url``: reach it there instead (a proxy)."""
        return Client(url or self.url, self.token, cafile=self._cafile)

    def status(self) -> dict[str, Any]:
        return self.api.status()

    @property
    def isolation(self) -> str:
        """How its workers are isolated, as ``/api/status`` says (``uids``, ``bubblewrap``, ``none``)."""
        return str(self.status()["isolation"]["mode"])

    def wait_warm(self, timeout: float = 180) -> None:
        """Return once the server lists a slot and every slot it lists has a warm worker.

        A slot that a session holds has none, so call this with no session
        open; a slot that stays unhealthy or draining past ``timeout`` fails
        it, naming the slot.
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.proc.poll() if self.process.proc is not None else None
            if code is not None:
                raise RuntimeError(f"the server exited with {code} while its warm workers were awaited:\n"
                                   + "".join(self.process.log[-40:]))
            slots = self.status()["slots"]
            if slots and "warm" not in slots[0]:
                raise RuntimeError("this server's /api/status says nothing of warm workers ('warm' of "
                                   "each slot): it is older than these benchmarks")
            cold = [s for s in slots if not s["warm"]]
            if slots and not cold:
                return
            if time.monotonic() > deadline:
                what = ", ".join(f"{s['id']} (healthy {s['healthy']}, held {s['holder'] is not None}, "
                                 f"problem {s['problem']})" for s in cold) or "no slot listed"
                raise TimeoutError(f"no warm worker within {timeout:g} s on: {what}\n"
                                   + "".join(self.process.log[-30:]))
            time.sleep(POLL)

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> WarmServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
