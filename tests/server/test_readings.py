"""Slot readings and health: NVML paths through ``FakeNvml``, CPU paths with real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nvml_double import FakeGpu, FakeNvml
from remote_gpu_core.ids import SlotId
from remote_gpu_server.gpus.discovery import Slot
from remote_gpu_server.gpus.readings import ProcessReading, Readings, SlotReading
from waiting import async_wait_for, wait_for

GPU0 = Slot(SlotId("gpu0"), "gpu", 0, "NVIDIA H100", "GPU-aaaa")
GPU1 = Slot(SlotId("gpu1"), "gpu", 1, "NVIDIA H100", "GPU-bbbb")
CPU0 = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")


def no_pids(slot: SlotId) -> list[int]:
    return []


def gpus() -> tuple[FakeNvml, FakeGpu, FakeGpu]:
    first, second = FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb")
    return FakeNvml([first, second]), first, second


def test_gpu_readings_from_nvml() -> None:
    nvml, first, _ = gpus()
    first.utilization, first.memory_used, first.temperature, first.power_mw = 87, 3 * 2**30, 71, 412_500
    first.processes = [(4242, 2**30), (4343, 2 * 2**30)]
    readings = Readings([GPU0, GPU1], lambda slot: [4242] if slot == GPU0.id else [], nvml=nvml)
    assert readings.read_now() == {}
    r = readings.latest(GPU0.id)
    assert (r.utilization, r.memory_used, r.memory_total, r.temperature) == (87.0, 3 * 2**30, 80 * 2**30, 71.0)
    assert r.power == pytest.approx(412.5)  # NVML's milliwatts as watts
    # 4343 is no worker of this server: another program, or a leftover holding memory.
    assert r.processes == (ProcessReading(4242, 2**30, True), ProcessReading(4343, 2 * 2**30, False))
    assert r.healthy and readings.healthy(GPU1.id)
    assert r.as_json()["processes"] == [{"pid": 4242, "memory": 2**30, "worker": True},
                                        {"pid": 4343, "memory": 2 * 2**30, "worker": False}]


@pytest.mark.parametrize("fault, words", [
    ({"ecc_uncorrected": 2}, "2 uncorrected ECC error(s)"),
    ({"retired_pending": True}, "page retirement is pending"),
    ({"remap_pending": True}, "remapping is pending: the GPU needs a reset"),
    ({"remap_failed": True}, "remapping failed"),
    ({"lost": True}, "NVML cannot read this GPU"),
])
def test_a_faulty_gpu_is_unhealthy_until_it_recovers(fault: dict[str, object], words: str) -> None:
    nvml, first, second = gpus()
    readings = Readings([GPU0, GPU1], no_pids, nvml=nvml)
    readings.read_now()
    for name, value in fault.items():
        setattr(second, name, value)
    changed = readings.read_now()
    assert set(changed) == {GPU1.id}
    healthy, problem = changed[GPU1.id]
    assert healthy is False and problem is not None and words in problem
    assert readings.healthy(GPU0.id) and not readings.healthy(GPU1.id)
    assert readings.read_now() == {}  # no change, no news
    for name in fault:
        setattr(second, name, getattr(FakeGpu("x"), name))  # after a GPU reset
    assert readings.read_now() == {GPU1.id: (True, None)}
    assert readings.healthy(GPU1.id)


def test_a_gpu_without_ecc_support_is_healthy_with_readings() -> None:
    nvml, first, _ = gpus()
    first.ecc_uncorrected = None  # NVMLError_NotSupported, as on consumer GPUs
    readings = Readings([GPU0], no_pids, nvml=nvml)
    readings.read_now()
    assert readings.healthy(GPU0.id) and readings.latest(GPU0.id).temperature == 35.0


def test_without_nvml_gpu_readings_are_off_not_fatal() -> None:
    readings = Readings([GPU0], no_pids, nvml=FakeNvml([], library=False))
    assert readings.read_now() == {}
    assert readings.latest(GPU0.id).utilization is None and readings.healthy(GPU0.id)


def test_health_changes_reach_the_callback_from_the_background_task() -> None:
    nvml, first, _ = gpus()
    seen: list[tuple[SlotId, bool, str | None]] = []

    async def scenario() -> None:
        readings = Readings([GPU0], no_pids, nvml=nvml, period=0.05,
                            on_health=lambda *change: seen.append(change))
        readings.start()
        await async_wait_for(lambda: first.process_reads, 10, "the first reading")
        first.ecc_uncorrected = 1
        await async_wait_for(lambda: len(seen) == 1, 10, "the news that GPU0 is faulty")
        first.ecc_uncorrected = 0
        await async_wait_for(lambda: len(seen) == 2, 10, "the news that GPU0 recovered")
        reads = first.process_reads
        await async_wait_for(lambda: first.process_reads > reads + 2, 10, "more readings")  # and no more news
        await readings.close()

    asyncio.run(scenario())
    assert [(slot, healthy) for slot, healthy, _ in seen] == [(GPU0.id, False), (GPU0.id, True)]
    assert nvml.initialised == 0  # shut down on close


@pytest.fixture
def busy_tree() -> Iterator[subprocess.Popen[bytes]]:
    """A process that spins and holds a child that holds ~50 MB."""
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import time; b = bytearray(50_000_000); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(60)'])\n"
        "end = time.time() + 60\n"
        "while time.time() < end: pass\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    yield proc
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_cpu_slots_read_their_workers_process_trees(busy_tree: subprocess.Popen[bytes]) -> None:
    readings = Readings([CPU0], lambda slot: [busy_tree.pid], nvml=None)

    def busy() -> SlotReading | None:
        readings.read_now()
        reading = readings.latest(CPU0.id)
        return reading if (reading.memory_used or 0) > 50_000_000 and (reading.utilization or 0) > 20 else None

    r = wait_for(busy, 30, "the busy tree's memory and CPU in the slot's reading", every=0.5)
    assert r.processes[0].pid == busy_tree.pid and r.processes[0].memory == r.memory_used
    assert r.memory_total is not None and r.memory_total > r.memory_used
    assert r.healthy and r.temperature is None and r.power is None


def test_cpu_slot_with_no_worker_reads_zero() -> None:
    readings = Readings([CPU0], no_pids)
    readings.read_now()
    r = readings.latest(CPU0.id)
    assert (r.utilization, r.memory_used, r.processes) == (0.0, 0, ())


def test_a_vanished_process_is_skipped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    readings = Readings([CPU0], lambda slot: [proc.pid])
    readings.read_now()
    assert readings.latest(CPU0.id).processes == ()
