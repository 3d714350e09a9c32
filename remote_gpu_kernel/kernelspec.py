"""The "Remote GPU" kernelspec, written the way ipykernel writes its own.

:func:`install` stages a kernelspec folder (``kernel.json`` and a logo) and
hands it to jupyter_client's :class:`KernelSpecManager`, which puts it in
the system, user (``user=True``) or ``prefix`` kernels folder, exactly where
``python -m ipykernel install`` would put ``python3``. The spec starts
``python -m remote_gpu_kernel.kernel -f {connection_file}`` with this
interpreter; ``url`` is written as ``RGPU_URL`` into the spec's ``env``,
``cafile`` (made absolute) as ``RGPU_CA`` and ``insecure`` as
``RGPU_INSECURE=1``. The token is never written there: the kernel reads
``RGPU_TOKEN`` or the file that ``rgpu login`` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["DISPLAY_NAME", "KERNEL_NAME", "install", "kernel_dict", "write_kernel_spec"]

KERNEL_NAME = "remote-gpu"
DISPLAY_NAME = "Remote GPU"

_LOGO_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">
<rect x="4" y="14" width="56" height="36" rx="5" fill="#2f6f3e"/>
<rect x="12" y="22" width="20" height="20" rx="2" fill="#e8f5e9"/>
<g fill="#e8f5e9"><rect x="38" y="22" width="14" height="4"/><rect x="38" y="30" width="14" height="4"/>
<rect x="38" y="38" width="14" height="4"/></g>
<g fill="#2f6f3e"><rect x="10" y="50" width="4" height="6"/><rect x="20" y="50" width="4" height="6"/>
<rect x="30" y="50" width="4" height="6"/><rect x="40" y="50" width="4" height="6"/>
<rect x="50" y="50" width="4" height="6"/></g>
</svg>
"""


def kernel_dict(display_name: str = DISPLAY_NAME, url: str | None = None,
                executable: str | None = None, lease: dict[str, str] | None = None) -> dict[str, Any]:
    """The contents of ``kernel.json``."""
    spec: dict[str, Any] = {
        "argv": [executable or sys.executable, "-m", "remote_gpu_kernel.kernel",
                 "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"remote_gpu": True},
        "kernel_protocol_version": "5.5",
    }
    env = dict(lease or {})
    if url:
        env["RGPU_URL"] = url
    if env:
        spec["env"] = env
    return spec


def write_kernel_spec(path: Path, display_name: str = DISPLAY_NAME, url: str | None = None,
                      lease: dict[str, str] | None = None) -> Path:
    """Write a kernelspec folder at ``path`` (created; must not exist)."""
    path.mkdir(parents=True)
    spec = kernel_dict(display_name, url, lease=lease)
    (path / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    (path / "logo-svg.svg").write_text(_LOGO_SVG)
    return path


def install(*, user: bool = False, prefix: str | None = None, kernel_name: str = KERNEL_NAME,
            display_name: str | None = None, url: str | None = None,
            kernel_spec_manager: Any = None, gpus: int | None = None,
            priority: str | None = None, pool: str | None = None,
            cafile: str | None = None, insecure: bool = False, env: str | None = None) -> str:
    """Install the kernelspec; return the folder it was installed to.

    ``gpus``, ``priority`` and ``pool`` go into the spec's environment
    (RGPU_GPUS, RGPU_PRIORITY, RGPU_POOL): what the kernel's lease asks for;
    ``cafile`` and ``insecure`` too (RGPU_CA, RGPU_INSECURE): how it reaches
    the server. ``env`` (RGPU_ENV): the Python environment its worker runs.

    As with ipykernel, a custom ``kernel_name`` without a ``display_name``
    is shown under its name. Raises ``OSError`` (``EACCES``) where the
    system folder is not writable: use ``user=True`` or a ``prefix``.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    if display_name is None:
        display_name = DISPLAY_NAME if kernel_name == KERNEL_NAME else kernel_name
    manager = kernel_spec_manager or KernelSpecManager()
    staging = Path(tempfile.mkdtemp(suffix="_kernels"))
    try:
        lease = {key: str(value) for key, value in
                 (("RGPU_GPUS", gpus), ("RGPU_PRIORITY", priority), ("RGPU_POOL", pool), ("RGPU_ENV", env),
                  ("RGPU_CA", os.path.abspath(os.path.expanduser(cafile)) if cafile else None),
                  ("RGPU_INSECURE", "1" if insecure else None)) if value}
        source = write_kernel_spec(staging / kernel_name, display_name, url, lease)
        return str(manager.install_kernel_spec(str(source), kernel_name=kernel_name,
                                               user=user, prefix=prefix))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
