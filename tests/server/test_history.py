"""The readings history the sidebar plots, and a CPU slot's memory share."""

from __future__ import annotations

import psutil

from nvml_double import FakeGpu, FakeNvml
from remote_gpu_core.ids import SlotId
from remote_gpu_server.gpus.discovery import Slot
from remote_gpu_server.gpus.history import HistoryPoint, ReadingHistory
from remote_gpu_server.gpus.readings import Readings

A, B = SlotId("a"), SlotId("b")


def test_points_older_than_the_window_are_forgotten() -> None:
    history = ReadingHistory([A, B], window=10.0)
    for t in range(0, 25, 3):
        history.add(A, HistoryPoint(1000.0 + t, float(t), t * 100))
    kept = history.points(A)
    assert [p.time for p in kept] == [1015.0, 1018.0, 1021.0, 1024.0]  # 1024 - 10 = 1014
    assert history.points(B) == []


def test_json_is_parallel_lists_oldest_first_with_gaps_as_null() -> None:
    history = ReadingHistory([A], window=60.0)
    history.add(A, HistoryPoint(1000.04, 12.5, 2**30))
    history.add(A, HistoryPoint(1003.0, None, None))  # the slot could not be read
    history.add(A, HistoryPoint(1006.0, 99.0, 2**31))
    assert history.as_json(A) == {"window": 60.0, "time": [1000.0, 1003.0, 1006.0],
                                  "utilization": [12.5, None, 99.0],
                                  "memory_used": [2**30, None, 2**31]}


def test_a_clock_set_back_starts_the_history_afresh() -> None:
    history = ReadingHistory([A], window=60.0)
    history.add(A, HistoryPoint(1000.0, 1.0, 1))
    history.add(A, HistoryPoint(1003.0, 2.0, 2))
    history.add(A, HistoryPoint(900.0, 3.0, 3))
    assert [p.time for p in history.points(A)] == [900.0]


def test_a_slot_that_joins_later_gets_its_own_history() -> None:
    # Slots of a Ray node that joins after start are not known up front.
    history = ReadingHistory([A])
    history.add(B, HistoryPoint(1.0, 1.0, 1))
    assert history.points(B) == [HistoryPoint(1.0, 1.0, 1)]
    assert history.points(A) == []


def test_every_reading_goes_into_the_history() -> None:
    gpu = FakeGpu("GPU-aaaa")
    readings = Readings([Slot(SlotId("gpu0"), "gpu", 0, "NVIDIA H100", "GPU-aaaa")],
                        lambda slot: [], nvml=FakeNvml([gpu]))
    for util in (10, 55, 90):
        gpu.utilization, gpu.memory_used = util, util * 2**20
        readings.read_now()
    points = readings.history.points(SlotId("gpu0"))
    assert [(p.utilization, p.memory_used) for p in points] == [(10.0, 10 * 2**20), (55.0, 55 * 2**20),
                                                               (90.0, 90 * 2**20)]
    assert points[0].time <= points[1].time <= points[2].time
    # A GPU's memory total is the GPU's, and it has no host share.
    latest = readings.latest(SlotId("gpu0"))
    assert latest.memory_total == 80 * 2**30 and latest.host_memory_total is None


def test_a_cpu_slot_may_use_its_share_of_the_host_memory() -> None:
    slots = [Slot(SlotId(f"cpu{i}"), "cpu", i, f"CPU slot {i}") for i in range(4)]
    readings = Readings(slots, lambda slot: [])
    readings.read_now()
    host = psutil.virtual_memory().total
    for slot in slots:
        r = readings.latest(slot.id)
        assert r.host_memory_total == host and r.memory_total == host // 4
        assert r.as_json()["host_memory_total"] == host
