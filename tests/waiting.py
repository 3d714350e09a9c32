"""Waiting in tests for something that happens in another process (or task)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["async_wait_for", "wait_for", "wait_for_cpu"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60, what: str = "a condition",
             every: float = 0.1) -> T:
    """The first true value of ``predicate()``, asked every ``every`` seconds;
    AssertionError naming ``what`` if none comes within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


async def async_wait_for(predicate: Callable[[], T], timeout: float = 60, what: str = "a condition",
                         every: float = 0.05) -> T:
    """:func:`wait_for` on an event loop: the loop runs on between the asks (the
    server under test may be on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def wait_for_cpu(pid: int, seconds: float, what: str, timeout: float = 30) -> None:
    """Return once process ``pid`` has used ``seconds`` more CPU time (user and
    system, all its threads) than when called: the one sign that a process
    which holds its GIL and spins (and so can tell nobody) has got that far."""
    import psutil

    process = psutil.Process(pid)

    def spent() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    start = spent()
    wait_for(lambda: spent() >= start + seconds, timeout, what, every=0.02)
