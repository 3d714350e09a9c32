"""Cells, leases and transfers over emulated network links, beside ipyparallel over the same links.

    python bench/bench_network.py [--links 0/0 1/10000 20/1000 80/100] [--mib 100] [--rounds 3]
                                  [--warmup 1] [--cells 20] [--leases 5] [--smoke]

Our users reach the GPUs across 1–80 ms and 0.1–10 Gbit/s, not loopback.
Each ``--links`` entry, ``RTT_MS/MBIT_S`` (0 for no delay or no cap;
``0/0`` is the proxy alone, the baseline), is emulated by a link process
(``link.py``: a delay line and a rate cap with a bounded queue, each way)
in front of what stands on the far side, on this machine:

* a server of three CPU slots (``rgpu serve``, ws://), whose websocket the
  link taps to count messages each way;
* a server with ``--tls self-signed`` (wss://), for the lease over TLS;
* an ipyparallel controller with one engine: each port of its client
  connection file (registration, control, mux, task, iopub, notification,
  broadcast) gets a proxy of its own on the one link, and the client is
  given the connection file with the proxies' ports (ZMTP, tapped).

The clients stand on the near side: the blocking API, an IPython shell in
this process that runs ``%%gpu`` cells, the Remote GPU kernel started by
jupyter_client with ``RGPU_URL`` at the link, and an ipyparallel client.
On each link, ours and ipyparallel's take turns, the order rotating every
round (``rounds.interleaved``):

============================  ===========================================  ===============================
what                          ours                                         ipyparallel
============================  ===========================================  ===============================
trivial cell (API)            ``session.execute("1+1")``                   ``view.execute("1+1")``
trivial cell (kernel)         the Remote GPU kernel: reply and idle        (no such kernel)
``%%gpu -i a -o b``           the magic in the shell: ``b = a + 1``        push ``a``, execute, pull ``b``
lease (warm)                  ``Client(url).session()``, ws:// and wss://  ``ipp.Client(connection file)``
push                          a fresh ``--mib`` MiB float32 array          ``view.push``
push again                    the same array once more                     the same
pull                          a fresh array made remotely                  ``view.pull``
file read                     a ``%%gpu`` cell opens a ``--mib`` MiB file  (none)
                              that only the notebook's folder holds
============================  ===========================================  ===============================

Each is reported as its median and p90, as a multiple of the link's round
trip, and where it moves a payload as a multiple of the link's transfer
time (the payload's bytes at the link's rate), with the bytes and the
messages (websocket or ZMTP; none counted through TLS) that crossed the
link each way, medians per op. Before that, each link is probed with a
TCP echo (``link_probe.py``): its round trip, a new connection's first
exchange (the TCP handshake included) and its bulk rate, as emulated.

The notebook's files on demand are measured only where the server offers
them: where a ``%%gpu`` cell can open a file that lies only in the
notebook's folder (this process's working folder, named by
``JPY_SESSION_NAME``); otherwise the row says n/a.

Targets (issue 19), judged on a full run, never asserted: over 20 ms and
1 Gbit/s, a ``%%gpu -i a -o b`` cell ≤ 1.3 round trips, a warm lease over
TLS ≤ 3, and the second push of the same array ≤ 5 % of the first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench_kernel import cell_seconds, started
from link import Link, LinkProcess
from link_probe import EchoServer, bulk_rate, first_exchange, round_trips
from reporting import finish, parse_args, table
from rounds import Op, Spread, interleaved
from warm_server import WarmServer

from remote_kernels import install_kernelspec, kernel_env  # noqa: E402  (tests/, put on the path by warm_server)
from tls_certs import self_signed_cert  # noqa: E402

from remote_gpu_core.sizes import format_size

MIB = 1 << 20
SMOKE = {"links": ["2/1000"], "mib": 1, "rounds": 1, "warmup": 0, "cells": 2, "leases": 1}
OURS, OURS_TLS, PEER = "ours", "ours, TLS", "ipyparallel"
#: The ports of ipyparallel's client connection file.
IPP_PORTS = ("registration", "control", "mux", "task", "iopub", "notification", "broadcast")
#: The link the issue's targets are set on.
TARGET_LINK = Link(0.020, 1e9)


def link_spec(text: str) -> Link:
    """``"20/1000"`` → 20 ms round trip, 1,000 Mbit/s each way; 0 for no delay or no cap."""
    try:
        rtt_ms, mbit_s = (float(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--links {text!r}: write RTT_MS/MBIT_S, like 20/1000 (20 ms, 1 Gbit/s; "
                         "0 for no delay or no cap)") from None
    return Link(rtt_ms / 1000, mbit_s * 1e6 if mbit_s else None)


def label(link: Link) -> str:
    return "loopback (the proxy alone)" if link.rtt == 0 and link.rate is None else link.label


# -- what stands on each side of the link ------------------------------------


@contextlib.contextmanager
def ipyparallel_controller() -> Iterator[Callable[[], dict[str, Any]]]:
    """A one-engine ipyparallel cluster on this machine, started in a thread
    while the caller goes on; yields what waits for it and returns its
    client connection file's content (the controller's ports, its key)."""
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, log_level=40)

    def start() -> dict[str, Any]:
        rc = cluster.start_and_connect_sync()
        try:
            rc.wait_for_engines(1, timeout=180)
        finally:
            rc.close()
        path = Path(cluster.profile_dir) / "security" / f"ipcontroller-{cluster.cluster_id}-client.json"
        info: dict[str, Any] = json.loads(path.read_text())
        return info

    with concurrent.futures.ThreadPoolExecutor(1) as starter:
        starting = starter.submit(start)
        try:
            yield starting.result
        finally:
            try:
                starting.result()
            finally:
                cluster.stop_cluster_sync()


def across(net: LinkProcess, info: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """ipyparallel's connection info with every port behind the link, and those ports."""
    host = info["interface"].removeprefix("tcp://")
    ports = {key: net.proxy(host, int(info[key]), tap="zmtp") for key in IPP_PORTS}
    return dict(info, **ports), tuple(ports.values())


def quietly(call: Callable[..., object], *args: Any) -> None:
    """``call(*args)`` with what it prints to stdout (the magic's notices) dropped."""
    with contextlib.redirect_stdout(io.StringIO()):
        call(*args)


def magic_shell() -> Any:
    """An IPython shell in this process with ``%load_ext remote_gpu_kernel``."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "remote_gpu_kernel")
    return shell


@contextlib.contextmanager
def notebook_folder(folder: Path) -> Iterator[Path]:
    """Work in ``folder`` as a notebook's kernel does: it is the working folder,
    and ``JPY_SESSION_NAME`` names a notebook in it."""
    before, name = Path.cwd(), os.environ.get("JPY_SESSION_NAME")
    os.chdir(folder)
    os.environ["JPY_SESSION_NAME"] = str(folder / "bench_network.ipynb")
    try:
        yield folder
    finally:
        os.chdir(before)
        if name is None:
            os.environ.pop("JPY_SESSION_NAME", None)
        else:
            os.environ["JPY_SESSION_NAME"] = name


class NotebookFiles:
    """A ``%%gpu`` cell that reads a file which only the notebook's folder holds.

    :meth:`offered` says whether the server offers the notebook's files on
    demand (the cell's ``open`` finds the file); :meth:`prepare` writes a
    fresh file of ``nbytes`` (a new name and new bytes, so that nothing of
    it is already on the far side) and :meth:`read` reads it remotely.
    """

    def __init__(self, shell: Any, folder: Path, nbytes: int) -> None:
        self.shell = shell
        self.folder = folder
        self.nbytes = nbytes
        self._count = 0
        self._name = ""

    def _cell(self, name: str) -> None:
        self.shell.run_cell_magic("gpu", "", f"_bench_read = len(open({name!r}, 'rb').read())")

    def offered(self) -> bool:
        probe = self.folder / "bench-network-probe.txt"
        probe.write_text("this file lies only in the notebook's folder\n")
        try:
            self._cell(probe.name)
        except Exception as exc:
            if getattr(exc, "ename", None) == "FileNotFoundError":
                return False
            raise
        finally:
            probe.unlink()
        return True

    def prepare(self) -> None:
        if self._name:
            (self.folder / self._name).unlink()
        self._count += 1
        self._name = f"bench-network-{self._count}.bin"
        (self.folder / self._name).write_bytes(os.urandom(self.nbytes))

    def read(self) -> None:
        self._cell(self._name)


# -- measuring -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One side's op of one kind: ``prepare`` runs before it and ``after``
    (given what ``run`` returned) after it, both untimed; what crosses
    ``ports`` of the link meanwhile is counted, messages only where ``tapped``."""

    run: Callable[[], Any]
    ports: tuple[int, ...]
    prepare: Callable[[], object] | None = None
    after: Callable[[Any], object] | None = None
    tapped: bool = True


@dataclasses.dataclass(frozen=True)
class Crossed:
    """What crossed the link during one op: bytes and messages, up (to the far side) and down."""

    bytes_up: int
    bytes_down: int
    messages_up: int
    messages_down: int


class Recorder:
    """Runs the steps for :func:`rounds.interleaved` and keeps what crossed the link in each."""

    def __init__(self, net: LinkProcess, steps: dict[str, dict[str, Step]]) -> None:
        self.net = net
        self.steps = steps
        self.crossed: dict[str, dict[str, list[Crossed]]] = {k: {s: [] for s in v} for k, v in steps.items()}

    def ops(self) -> dict[str, dict[str, Op]]:
        return {kind: {side: step.run for side, step in sides.items()} for kind, sides in self.steps.items()}

    def measure(self, kind: str, side: str, op: Op) -> float:
        step = self.steps[kind][side]
        if step.prepare is not None:
            step.prepare()
        before = self.net.traffic()
        started_at = time.perf_counter()
        value = op()
        seconds = time.perf_counter() - started_at
        after = self.net.traffic()
        if step.after is not None:
            step.after(value)
        sums = [0, 0, 0, 0]
        for port in step.ports:
            (up0, down0), (up1, down1) = before.get(port, (None, None)), after[port]
            sums[0] += up1.bytes - (up0.bytes if up0 else 0)
            sums[1] += down1.bytes - (down0.bytes if down0 else 0)
            sums[2] += up1.messages - (up0.messages if up0 else 0)
            sums[3] += down1.messages - (down0.messages if down0 else 0)
        self.crossed[kind][side].append(Crossed(*sums))
        return seconds

    def median_crossed(self, kind: str, side: str, warmup: int) -> Crossed:
        kept = self.crossed[kind][side][warmup:]
        return Crossed(*(int(statistics.median(getattr(c, f.name) for c in kept))
                         for f in dataclasses.fields(Crossed)))


@dataclasses.dataclass(frozen=True)
class Probe:
    """The link as emulated: its round trip, a new connection's first exchange, its bulk rate."""

    rtt: float
    first: float
    rate: float


def probe(net: LinkProcess, echo: EchoServer, link: Link, mib: int) -> Probe:
    port = net.proxy("127.0.0.1", echo.port)
    rtt = statistics.median(round_trips(port, 10))
    first = statistics.median(first_exchange(port) for _ in range(3))
    # About half a second of the link, at most --mib.
    nbytes = max(MIB, min(mib * MIB, int((link.bytes_per_second or 2e9) / 2)))
    return Probe(rtt, first, bulk_rate(port, nbytes, link.rtt))


@dataclasses.dataclass
class Row:
    """One kind and side on one link: its times, and what crossed in the median op."""

    kind: str
    side: str
    spread: Spread | None  # None: not measured (n/a)
    payload: int = 0
    crossed: Crossed | None = None
    tapped: bool = True
    note: str = ""


@dataclasses.dataclass
class LinkResult:
    link: Link
    probe: Probe
    rows: list[Row]


@dataclasses.dataclass(frozen=True)
class Far:
    """What every link reaches (the servers, ipyparallel's controller, the echo
    server) and what stays on the near side across links (the magic's shell,
    the notebook's folder, the temporary folder)."""

    plain: WarmServer
    tls: WarmServer
    ipp_info: dict[str, Any]
    echo: EchoServer
    shell: Any
    notebook: Path
    tmp: Path


def measure_link(link: Link, far: Far, args: argparse.Namespace) -> LinkResult:
    """Everything on one link: a link process, proxies, clients; cells, then transfers, then leases."""
    import ipyparallel as ipp

    def say(text: str) -> None:
        print(f"[{label(link)}] {text}", file=sys.stderr, flush=True)

    nbytes = args.mib * MIB
    rows: list[Row] = []
    with LinkProcess(link) as net, contextlib.ExitStack() as stack:
        found = probe(net, far.echo, link, args.mib)
        say(f"probed: round trip {found.rtt * 1000:.2f} ms, first exchange {found.first * 1000:.2f} ms, "
            f"bulk {found.rate / 1e6:,.0f} Mbit/s")
        plain_port = net.proxy("127.0.0.1", int(far.plain.url.rsplit(":", 1)[1]), tap="websocket")
        tls_port = net.proxy("127.0.0.1", int(far.tls.url.rsplit(":", 1)[1]))
        plain_url, tls_url = f"ws://127.0.0.1:{plain_port}", f"wss://127.0.0.1:{tls_port}"
        ours = (plain_port,)
        ipp_info, peer_ports = across(net, far.ipp_info)

        # The near side's clients, each with its lease taken and its imports done.
        session = far.plain.client(plain_url).session()
        stack.callback(session.release)
        session.execute("import numpy", on_output=lambda _: None)
        quietly(far.shell.run_line_magic, "gpu", f"connect {plain_url} --token {far.plain.token}")
        quietly(far.shell.run_cell_magic, "gpu", "", "pass")
        stack.callback(lambda: quietly(far.shell.run_line_magic, "gpu", "release"))
        kernel = stack.enter_context(started("remote-gpu", kernel_env(far.tmp, plain_url, far.plain.token)))
        cell_seconds(kernel, "1+1")
        rc = ipp.Client(ipp_info)
        stack.callback(rc.close)
        view = rc[0]
        view.block = True
        view.execute("import numpy")
        say("clients ready")

        small = np.arange(10, dtype=np.float32)
        far.shell.user_ns["a"] = small

        def ipp_magic_equivalent() -> None:
            view.push({"a": small})
            view.execute("b = a + 1")
            view.pull("b")

        cells = {
            "trivial cell (API)": {OURS: Step(lambda: session.execute("1+1", on_output=lambda _: None), ours),
                                   PEER: Step(lambda: view.execute("1+1"), peer_ports)},
            "trivial cell (kernel)": {OURS: Step(lambda: cell_seconds(kernel, "1+1"), ours)},
            "%%gpu -i a -o b": {OURS: Step(lambda: far.shell.run_cell_magic("gpu", "-i a -o b", "b = a + 1"), ours),
                                PEER: Step(ipp_magic_equivalent, peer_ports)},
        }
        recorder = Recorder(net, cells)
        cell_warmup = args.warmup + 1
        timings = interleaved(recorder.ops(), args.cells, cell_warmup, recorder.measure)
        rows += [Row(kind, side, spread, 0, recorder.median_crossed(kind, side, cell_warmup))
                 for kind, by_side in timings.items() for side, spread in by_side.items()]
        say("cells done")

        # Transfers: each round pushes a fresh array, then the same once more, then pulls a fresh remote one.
        rng = np.random.default_rng(0)
        arrays: dict[str, Any] = {}

        def fresh(side: str) -> Callable[[], None]:
            return lambda: arrays.__setitem__(side, rng.random(nbytes // 4, dtype=np.float32))

        make_w = f"w = numpy.random.default_rng().random({nbytes // 4}, dtype=numpy.float32)"
        transfers = {
            "push": {OURS: Step(lambda: session.push(v=arrays[OURS]), ours, prepare=fresh(OURS)),
                     PEER: Step(lambda: view.push({"v": arrays[PEER]}), peer_ports, prepare=fresh(PEER))},
            "push again (the same array)": {OURS: Step(lambda: session.push(v=arrays[OURS]), ours),
                                            PEER: Step(lambda: view.push({"v": arrays[PEER]}), peer_ports)},
            "pull": {OURS: Step(lambda: session.pull("w"), ours,
                                prepare=lambda: session.execute(make_w, on_output=lambda _: None)),
                     PEER: Step(lambda: view.pull("w"), peer_ports, prepare=lambda: view.execute(make_w))},
        }
        files = NotebookFiles(far.shell, far.notebook, nbytes)
        offered = files.offered()
        if offered:
            transfers["file read (notebook's folder)"] = {OURS: Step(files.read, ours, prepare=files.prepare)}
        recorder = Recorder(net, transfers)
        timings = interleaved(recorder.ops(), args.rounds, args.warmup, recorder.measure)
        rows += [Row(kind, side, spread, nbytes, recorder.median_crossed(kind, side, args.warmup))
                 for kind, by_side in timings.items() for side, spread in by_side.items()]
        if not offered:
            rows.append(Row("file read (notebook's folder)", OURS, None, nbytes,
                            note="n/a: the server does not offer the notebook's files (the cell's open() "
                                 "raised FileNotFoundError)"))
        arrays.clear()
        say("transfers done")

        # Leases: every client of ours gone, every slot warm before each lease.
        stack.close()
        leases = {"lease (warm)": {
            OURS: Step(lambda: far.plain.client(plain_url).session(), ours,
                       prepare=far.plain.wait_warm, after=lambda s: s.release()),
            OURS_TLS: Step(lambda: far.tls.client(tls_url).session(), (tls_port,),
                           prepare=far.tls.wait_warm, after=lambda s: s.release(), tapped=False),
            PEER: Step(lambda: ipp.Client(ipp_info), peer_ports, after=lambda c: c.close()),
        }}
        recorder = Recorder(net, leases)
        lease_warmup = min(1, args.warmup)
        timings = interleaved(recorder.ops(), args.leases, lease_warmup, recorder.measure)
        rows += [Row(kind, side, spread, 0, recorder.median_crossed(kind, side, lease_warmup),
                     tapped=leases[kind][side].tapped)
                 for kind, by_side in timings.items() for side, spread in by_side.items()]
        say("leases done")
    return LinkResult(link, found, rows)


# -- reporting -------------------------------------------------------------------


def ratio(seconds: float, unit: float) -> str:
    return f"{seconds / unit:,.2f}" if unit > 0 else "—"


def link_table(result: LinkResult) -> str:
    link = result.link
    out = []
    for row in result.rows:
        if row.spread is None:
            out.append([row.kind, row.side, "n/a", "", "", "", "", "", ""])
            continue
        s, c = row.spread, row.crossed
        assert c is not None
        messages = f"{c.messages_up} / {c.messages_down}" if row.tapped else "(TLS)"
        out.append([row.kind, row.side, f"{s.median * 1000:,.1f}", f"{s.p90 * 1000:,.1f}",
                    ratio(s.median, link.rtt), ratio(s.median, link.transfer_time(row.payload)),
                    format_size(c.bytes_up), format_size(c.bytes_down), messages])
    return table(["what", "side", "median ms", "p90 ms", "× RTT", "× transfer time", "bytes up",
                  "bytes down", "messages up / down"], out)


def summary_table(results: list[LinkResult]) -> str:
    """Per kind and side, each link's multiple: of the round trip for cells and
    leases, of the transfer time for payloads (milliseconds on loopback)."""
    headers = ["what", "side"] + [label(r.link) for r in results]
    keys = list(dict.fromkeys((row.kind, row.side) for r in results for row in r.rows))
    out = []
    for kind, side in keys:
        cells = []
        for result in results:
            row = next((x for x in result.rows if (x.kind, x.side) == (kind, side)), None)
            link = result.link
            if row is None or row.spread is None:
                cells.append("n/a")
            elif row.payload and link.rate is not None:
                cells.append(f"{row.spread.median / link.transfer_time(row.payload):.2f} × transfer")
            elif link.rtt > 0:
                cells.append(f"{row.spread.median / link.rtt:.2f} RTT")
            else:
                cells.append(f"{row.spread.median * 1000:.1f} ms")
        out.append([kind, side, *cells])
    return table(headers, out)


def verdicts(result: LinkResult) -> list[str]:
    """The issue's targets on its (20 ms, 1 Gbit/s) link."""
    def get(kind: str, side: str) -> Spread:
        row = next(r for r in result.rows if (r.kind, r.side) == (kind, side))
        assert row.spread is not None
        return row.spread

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rtt = result.link.rtt
    cell = get("%%gpu -i a -o b", OURS).median / rtt
    lease = get("lease (warm)", OURS_TLS).median / rtt
    again = get("push again (the same array)", OURS).median / get("push", OURS).median
    return [f"`%%gpu -i a -o b` ≤ 1.3 round trips: {cell:.2f} — {met(cell <= 1.3)}",
            f"a warm lease over TLS ≤ 3 round trips: {lease:.2f} — {met(lease <= 3)}",
            f"the second push of the same array ≤ 5 % of the first: {again:.0%} — {met(again <= 0.05)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", nargs="+", default=["0/0", "1/10000", "20/1000", "80/100"],
                        metavar="RTT_MS/MBIT_S",
                        help="the links to emulate (default: 0/0 1/10000 20/1000 80/100; 0 for no delay or cap)")
    parser.add_argument("--mib", type=int, default=100, help="MiB of each push, pull and file (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="transfer rounds kept per link (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="transfer and lease rounds run first and dropped (cells: one more; default 1)")
    parser.add_argument("--cells", type=int, default=20, help="cell rounds per link (default 20)")
    parser.add_argument("--leases", type=int, default=5, help="leases per side and link (default 5)")
    args = parse_args(parser, SMOKE)
    try:
        links = [link_spec(text) for text in args.links]
    except ValueError as exc:
        parser.error(str(exc))

    results: list[LinkResult] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rgpu-bench-network-")))
        notebook = tmp / "notebook"
        notebook.mkdir()
        plain = WarmServer(tmp / "plain", "cpu:3")
        tls = WarmServer(tmp / "tls", "cpu:1", "--tls", "self-signed")
        tls.cafile = self_signed_cert(tls.process)
        ipp_info = stack.enter_context(ipyparallel_controller())  # starts while the servers do
        for server in (plain, tls):
            stack.callback(server.stop)
            server.launch()
        os.environ["JUPYTER_PATH"] = str(install_kernelspec(tmp / "prefix"))
        echo = stack.enter_context(EchoServer())
        shell = magic_shell()
        stack.enter_context(notebook_folder(notebook))
        for server in (plain, tls):
            server.wait_warm()
        far = Far(plain, tls, ipp_info(), echo, shell, notebook, tmp)
        for link in links:
            results.append(measure_link(link, far, args))

    for result in results:
        p = result.probe
        print(f"\n## {label(result.link)}\n")
        print(f"As emulated (a TCP echo through the link): round trip {p.rtt * 1000:.2f} ms, a new "
              f"connection's first exchange {p.first * 1000:.2f} ms"
              + (f" ({p.first / result.link.rtt:.2f} round trips)" if result.link.rtt else "")
              + f", bulk {p.rate / 1e6:,.0f} Mbit/s"
              + (f" ({p.rate / result.link.rate:.0%} of the link's rate)" if result.link.rate else "") + ".\n")
        print(link_table(result))
        for row in result.rows:
            if row.note:
                print(f"\n{row.kind}, {row.side}: {row.note}")
    print(f"\n## Summary: multiples of the round trip (cells, leases) and of the transfer time of "
          f"{args.mib} MiB (transfers)\n")
    print(summary_table(results))
    target = next((r for r in results if r.link == TARGET_LINK), None)
    if target is not None and not args.smoke:
        print(f"\n## Targets over {TARGET_LINK.label}\n")
        for line in verdicts(target):
            print(f"- {line}")
    finish(args, ("websockets", "ipykernel", "jupyter_client", "ipyparallel", "pyzmq", "numpy"))


if __name__ == "__main__":
    main()
