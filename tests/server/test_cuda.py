"""On a machine with CUDA: GPU slots from NVML, pinning, CUDA tensors both ways.

Skipped (with the reason) where torch.cuda.is_available() is false.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_kernel import Client
from servers import ServerProcess
from waiting import wait_for

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("gpu"), "auto").start()
    yield proc
    proc.stop()


def test_auto_slots_are_gpus_and_workers_are_pinned(gpu_server: ServerProcess) -> None:
    with Client(gpu_server.url, gpu_server.token()).session() as s:
        assert s.slots[0].startswith("gpu")
        s.execute("import os, torch\ncvd = os.environ['CUDA_VISIBLE_DEVICES']\nn = torch.cuda.device_count()",
                  on_output=lambda _: None)
        got = s.pull("cvd", "n")
        assert got["n"] == 1 and got["cvd"]


def test_cuda_tensor_goes_in_and_comes_back_as_a_cpu_tensor(gpu_server: ServerProcess) -> None:
    with Client(gpu_server.url, gpu_server.token()).session() as s:
        s.push(x=torch.arange(1 << 20, dtype=torch.float32))
        result = s.execute("y = (x.cuda() * 2)\nassert y.is_cuda", on_output=lambda _: None)
        assert result.ok, result.error
        y = s.pull("y")["y"]
        assert y.device.type == "cpu"
        assert torch.equal(y, torch.arange(1 << 20, dtype=torch.float32) * 2)


def test_gpu_memory_is_freed_when_the_lease_ends(gpu_server: ServerProcess, tmp_path: Path) -> None:
    import pynvml

    pynvml.nvmlInit()
    try:
        s = Client(gpu_server.url, gpu_server.token()).session()
        s.execute("import os, torch\nblock = torch.empty(2 << 30, dtype=torch.uint8, device='cuda')\n"
                  "pid = os.getpid()", on_output=lambda _: None)
        pid = s.pull("pid")["pid"]
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def pids() -> set[int]:
            return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}

        assert pid in pids()
        s.release()
        wait_for(lambda: pid not in pids(), 20, f"the worker's pid {pid} to leave the GPU", every=0.2)
    finally:
        pynvml.nvmlShutdown()


def test_a_device_side_assert_restarts_the_worker_and_says_so(gpu_server: ServerProcess) -> None:
    notices: list[str] = []
    with Client(gpu_server.url, gpu_server.token()).session(on_notice=notices.append) as s:
        s.execute("keep = 1", on_output=lambda _: None)
        # An index out of range in a CUDA kernel: a device-side assert.
        result = s.execute("import torch\nt = torch.zeros(4, device='cuda')\nt[torch.tensor([10], device='cuda')] = 1\n"
                           "torch.cuda.synchronize()", on_output=lambda _: None)
        assert result.status == "error" and result.error is not None
        assert "device-side assert triggered" in result.error.evalue
        after = s.execute("print('keep' in globals())", on_output=lambda _: None)
        assert after.stdout == "False\n"  # the poisoned process was replaced
        assert any("CUDA error that leaves the process unusable" in n and "device-side assert" in n
                   for n in notices)
        assert s.execute("import torch\nprint(torch.ones(2, device='cuda').sum().item())",
                         on_output=lambda _: None).stdout == "2.0\n"


def test_cuda_out_of_memory_fails_the_cell_says_what_is_held_and_the_session_goes_on(
        gpu_server: ServerProcess) -> None:
    with Client(gpu_server.url, gpu_server.token()).session() as s:
        s.execute("import torch\nkeep = torch.empty(1 << 30, dtype=torch.uint8, device='cuda')",
                  on_output=lambda _: None)
        result = s.execute("huge = torch.empty(1 << 50, dtype=torch.uint8, device='cuda')",
                           on_output=lambda _: None)
        assert result.status == "error" and result.error is not None
        assert result.error.ename == "OutOfMemoryError"
        message = result.error.evalue
        assert re.search(r"this session holds [\d.]+ GiB of GPU 0 \(PyTorch's cache included\); "
                         r"[\d.]+ [GM]iB of [\d.]+ GiB are free on it", message), message
        assert "The session goes on" in message
        assert s.execute("print(keep.numel())", on_output=lambda _: None).stdout == f"{1 << 30}\n"
