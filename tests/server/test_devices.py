"""Which device files a worker gets: its GPUs' by minor number, the control files, nothing on CPU slots.

The host is a stand-in folder (:mod:`fake_gpu_host`, plain files: these tests
need no root); the GPUs' minor numbers come from the NVML double or the
driver's ``/proc`` files, never from the index.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_gpu_host import FakeGpuFiles, make_host
from nvml_double import FakeGpu, FakeNvml
from remote_gpu_server.isolation.devices import DeviceFile, DeviceTree
from remote_gpu_server.isolation.modes import IsolationMode
from remote_gpu_server.isolation.policy import Isolation, IsolationConfig
from remote_gpu_server.isolation.sandbox import SandboxLayout, bubblewrap_argv

CONTROL = ["nvidia-uvm", "nvidia-uvm-tools", "nvidiactl"]
#: Index (PCI order) → minor: not the identity, as on hosts whose driver numbered them otherwise.
GPUS = [FakeGpuFiles("0000:17:00.0", 2, "GPU-aaaa"), FakeGpuFiles("0000:3b:00.0", 0, "GPU-bbbb"),
        FakeGpuFiles("0000:86:00.0", 3, "GPU-cccc", mig=(("gi1", 12), ("gi1/ci0", 13)))]


def names(files: tuple[DeviceFile, ...]) -> list[str]:
    return sorted(f.name for f in files)


def control_and(*gpu_files: str) -> list[str]:
    return sorted([*CONTROL, *gpu_files])


def nvml() -> FakeNvml:
    return FakeNvml([FakeGpu(g.uuid, minor=g.minor) for g in GPUS])


@pytest.fixture
def host(tmp_path: Path) -> Path:
    # The driver's files list the GPUs in another order than NVML would, so a
    # test can tell which source was used.
    return make_host(tmp_path / "host", GPUS, spare_minors=[1], spare_caps=[21], nodes=False)


def test_a_gpu_gets_its_file_by_minor_number_with_the_control_files(host: Path) -> None:
    tree = DeviceTree.probe(host, nvml())
    assert tree.source == "NVML"
    assert names(tree.for_worker("0")) == control_and("nvidia2")
    assert names(tree.for_worker("1")) == control_and("nvidia0")
    assert names(tree.for_worker("GPU-bbbb")) == control_and("nvidia0")  # by UUID, as local slots name them
    assert names(tree.for_worker("0,1")) == control_and("nvidia0", "nvidia2")
    assert all(f.source == host / "dev" / f.name for f in tree.for_worker("0,1"))


def test_a_worker_without_gpus_gets_no_file_at_all(host: Path) -> None:
    assert DeviceTree.probe(host, nvml()).for_worker("") == ()


def test_a_mig_gpu_brings_its_instances_capability_files_and_no_others(host: Path) -> None:
    tree = DeviceTree.probe(host, nvml())
    assert names(tree.for_worker("2")) == control_and("nvidia-caps/nvidia-cap12", "nvidia-caps/nvidia-cap13",
                                           "nvidia3")
    assert "nvidia-caps/nvidia-cap21" not in names(tree.for_worker("0,1,2"))


def test_without_nvml_the_driver_files_say_which_minor_each_gpu_has(host: Path) -> None:
    tree = DeviceTree.probe(host, FakeNvml([], library=False))
    assert tree.source == "the driver's /proc files"
    assert [(g.index, g.minor, g.uuid) for g in tree.gpus] == [(0, 2, "GPU-aaaa"), (1, 0, "GPU-bbbb"),
                                                               (2, 3, "GPU-cccc")]
    assert names(tree.for_worker("1")) == control_and("nvidia0")


def test_a_gpu_whose_file_is_unknown_is_not_given_and_the_log_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = make_host(tmp_path / "host", GPUS, driver_files=False, nodes=False)
    caplog.set_level(logging.WARNING, "remote_gpu_server")
    tree = DeviceTree.probe(host, FakeNvml([], library=False))
    assert tree.gpus == () and "neither NVML" in caplog.text
    assert names(tree.for_worker("0")) == control_and()
    assert "names '0', a GPU whose device file is not known here" in caplog.text
    assert names(DeviceTree.probe(host, nvml()).for_worker("7")) == control_and()


@pytest.fixture
def keep_umask() -> Iterator[None]:
    """A uid-mode start sets this process's umask for good: later tests get theirs back."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.mark.usefixtures("keep_umask")
def test_each_isolated_worker_is_prepared_with_its_own_gpus_files(host: Path, tmp_path: Path) -> None:
    for mode in (IsolationMode.UIDS, IsolationMode.BUBBLEWRAP):
        isolation = Isolation(IsolationConfig(mode=mode, worker_memory="none", device_root=host,
                                              session_root=tmp_path / "sessions"), tmp_path / "db", nvml=nvml())
        isolation.start(3)
        try:
            runtime = tmp_path / f"runtime-{mode.value}"
            runtime.mkdir()
            worker = isolation.prepare("w1", 1, runtime, gpus="1")
            assert names(worker.devices) == control_and("nvidia0")
            # CUDA counts only the GPUs it can open: an index would name none of them.
            assert worker.cuda_visible_devices == "GPU-bbbb"
            assert isolation.prepare("w2", 1, runtime, gpus="0,2").cuda_visible_devices == "GPU-aaaa,GPU-cccc"
            cpu = isolation.prepare("w3", 1, runtime, gpus="")
            assert cpu.devices == () and cpu.cuda_visible_devices == ""
        finally:
            isolation.close()
    alone = Isolation(IsolationConfig(mode=IsolationMode.NONE, worker_memory="none", device_root=host,
                                      session_root=tmp_path / "sessions"), tmp_path / "db", nvml=nvml())
    alone.start(3)
    try:  # not isolated: nothing is fenced, nothing is renamed
        unfenced = alone.prepare("w4", 1, tmp_path, gpus="1")
        assert unfenced.devices == () and unfenced.cuda_visible_devices == "1"
    finally:
        alone.close()


def test_a_sandbox_binds_only_the_files_it_is_given(host: Path, tmp_path: Path) -> None:
    given = ((host / "dev" / "nvidiactl", Path("/dev/nvidiactl")), (host / "dev" / "nvidia0", Path("/dev/nvidia0")))
    argv = bubblewrap_argv("bwrap", SandboxLayout(writable=(tmp_path,), devices=given, readable=()))
    binds = [argv[i + 1:i + 3] for i, arg in enumerate(argv) if arg == "--dev-bind"]
    assert binds == [[str(host / "dev" / "nvidiactl"), "/dev/nvidiactl"], [str(host / "dev" / "nvidia0"),
                                                                            "/dev/nvidia0"]]
    assert bubblewrap_argv("bwrap", SandboxLayout(writable=(tmp_path,), readable=())).count("--dev-bind") == 0
