from __future__ import annotations

import pytest

from remote_gpu_server.gpus.discovery import cuda_visible_devices, discover_slots


def test_cpu_slots() -> None:
    slots = discover_slots("cpu:3")
    assert [s.id for s in slots] == ["cpu0", "cpu1", "cpu2"]
    assert cuda_visible_devices(slots) == ""


@pytest.mark.parametrize("spec", ["cpu:0", "cpu:x", "a,b", ","])
def test_bad_slot_specs_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(ValueError, match="--slots"):
        discover_slots(spec)


def test_explicit_gpu_indices_without_nvml_keep_their_index(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nvml() -> None:
        raise ImportError("no NVML on this machine")

    monkeypatch.setattr("remote_gpu_server.gpus.discovery._nvml_gpus", no_nvml)
    slots = discover_slots("0,2")
    assert [(s.id, s.kind) for s in slots] == [("gpu0", "gpu"), ("gpu2", "gpu")]
    assert cuda_visible_devices(slots) == "0,2"
