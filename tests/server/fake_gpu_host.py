"""A stand-in for a GPU host's NVIDIA files, for tests on a machine without a GPU.

:func:`make_host` fills a folder that the server treats as ``/`` for NVIDIA's
files (``$RGPU_TEST_DEVICE_ROOT``, see :mod:`remote_gpu_server.isolation.devices`):
``dev/nvidia<minor>`` for each GPU (character devices of the NVIDIA major,
195, made with ``mknod``: root only; plain files with ``nodes=False``), the
control files, MIG capability files, and the driver's
``proc/driver/nvidia`` files that say which GPU has which minor number.
Opening one of the device files reaches no driver here: ``ENXIO``, where a
file that is not there gives ``ENOENT``.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CAPS_MAJOR", "NVIDIA_MAJOR", "UVM_MAJOR", "FakeGpuFiles", "make_host"]

NVIDIA_MAJOR = 195
#: Dynamic majors on a real host; any unused number does here.
UVM_MAJOR = 508
CAPS_MAJOR = 509


@dataclasses.dataclass(frozen=True)
class FakeGpuFiles:
    """One GPU: its PCI address (its place in PCI order is its index), minor number and
    UUID; ``mig``: its MIG instances' capability files, ``(gi1 or gi1/ci0, number)``."""

    pci: str
    minor: int
    uuid: str = ""
    mig: tuple[tuple[str, int], ...] = ()


def _node(path: Path, major: int, minor: int, nodes: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if nodes:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)  # whatever the umask
    else:
        path.touch()


def make_host(root: Path, gpus: Sequence[FakeGpuFiles], *, spare_minors: Sequence[int] = (),
              spare_caps: Sequence[int] = (), driver_files: bool = True, nodes: bool = True) -> Path:
    """Fill ``root`` (see the module docstring) and return it. ``spare_minors``:
    GPU device files no GPU of the list has (a GPU this server does not offer);
    ``spare_caps``: capability files of no listed instance; ``driver_files``:
    write the driver's ``proc`` files (they stand in for NVML where it is absent)."""
    dev = root / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    for minor in [g.minor for g in gpus] + list(spare_minors):
        _node(dev / f"nvidia{minor}", NVIDIA_MAJOR, minor, nodes)
    _node(dev / "nvidiactl", NVIDIA_MAJOR, 255, nodes)
    _node(dev / "nvidia-uvm", UVM_MAJOR, 0, nodes)
    _node(dev / "nvidia-uvm-tools", UVM_MAJOR, 1, nodes)
    caps = [number for g in gpus for _path, number in g.mig] + list(spare_caps)
    for number in caps:
        _node(dev / "nvidia-caps" / f"nvidia-cap{number}", CAPS_MAJOR, number, nodes)
    driver = root / "proc" / "driver" / "nvidia"
    for gpu in gpus:
        if driver_files:
            folder = driver / "gpus" / gpu.pci
            folder.mkdir(parents=True)
            (folder / "information").write_text(
                f"Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\nGPU UUID: \t {gpu.uuid or 'GPU-' + gpu.pci}\n"
                f"Video BIOS: \t ??.??.??.??.??\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n"
                f"Bus Location: \t {gpu.pci}\nDevice Minor: \t {gpu.minor}\nGPU Excluded:\t No\n")
        for path, number in gpu.mig:
            access = driver / "capabilities" / f"gpu{gpu.minor}" / "mig" / path / "access"
            access.parent.mkdir(parents=True, exist_ok=True)
            access.write_text(f"DeviceFileMinor: {number}\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
    for made in [root, *root.rglob("*")]:  # whoever serves from here reads it, as /proc is read
        if made.is_dir():
            os.chmod(made, 0o755)
        elif made.is_file():
            os.chmod(made, 0o644)
    return root
