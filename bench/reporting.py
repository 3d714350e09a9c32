"""What every benchmark shares at its edges: ``--smoke``, the machine line, tables.

``--smoke`` runs a benchmark in seconds (a few rounds, small sizes) to
show that it still runs; its figures mean nothing and no target is
judged. The tests run each benchmark this way (``tests/test_bench_smoke.py``),
so a change that breaks a benchmark fails them.

Every full run ends with :func:`machine`: date, CPUs, load average and
versions, so that a table pasted into ``bench/RESULTS.md`` says where and
under what load it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["SMOKE_NOTE", "finish", "machine", "parse_args", "table"]

SMOKE_NOTE = "smoke run (--smoke): a few rounds of small sizes to show the benchmark runs; the figures mean nothing"


def parse_args(parser: argparse.ArgumentParser, smoke: Mapping[str, Any]) -> argparse.Namespace:
    """Parse with a ``--smoke`` flag added; with it, ``smoke``'s values replace the parsed ones."""
    parser.add_argument("--smoke", action="store_true",
                        help="a few rounds of small sizes, to check that the benchmark runs (no "
                             "figure is meaningful, no target is judged): "
                             + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in smoke.items()))
    args = parser.parse_args()
    if args.smoke:
        for name, value in smoke.items():
            if not hasattr(args, name):
                raise AssertionError(f"--smoke sets {name}, which the benchmark does not have")
            setattr(args, name, value)
    return args


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def machine(packages: Sequence[str] = ()) -> str:
    """One line: UTC time, host, CPUs and their model, load average, memory, Python and ``packages``."""
    now = datetime.datetime.now(datetime.UTC)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f"{pages / (1 << 30):.0f} GiB"
    except (ValueError, OSError):
        memory = "? GiB"
    versions = "".join(f", {p} {_version(p)}" for p in packages)
    return (f"{now:%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), "
            f"{memory}, load average {load} (1/5/15 min), uid {os.geteuid()}, "
            f"Python {platform.python_version()}{versions}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with two decimals, columns after the first right-aligned."""
    def cell(value: object) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |",
             "| --- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(args: argparse.Namespace, packages: Sequence[str] = ()) -> None:
    """The last lines of every run: the machine, and what a smoke run's figures are worth."""
    print(f"\n{machine(packages)}; {' '.join(sys.argv[1:]) or 'defaults'}")
    if getattr(args, "smoke", False):
        print(SMOKE_NOTE)
