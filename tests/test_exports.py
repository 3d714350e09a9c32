"""Every public module lists its public names in ``__all__``, and they exist; none is over 500 lines."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["remote_gpu_core", "remote_gpu_kernel", "remote_gpu_server", "remote_gpu_lab"]


def _modules() -> list[str]:
    """Every module of every package (a package's ``__init__`` included)."""
    found = []
    for top in PACKAGES:
        package = importlib.import_module(top)
        found.append(top)
        found += [info.name for info in pkgutil.walk_packages(package.__path__, top + ".")]
    return sorted(found)


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_the_package_exports_the_api_and_every_error() -> None:
    import remote_gpu_kernel
    from remote_gpu_core import errors

    for name in ("Client", "Session", "AsyncClient", "AsyncSession", "ExecuteResult",
                 "load_ipython_extension"):
        assert name in remote_gpu_kernel.__all__
    for name in errors.__all__:
        assert name in remote_gpu_kernel.__all__
        assert issubclass(getattr(errors, name), errors.RemoteGpuError)


def test_the_server_does_not_import_torch_or_initialise_cuda() -> None:
    import subprocess
    import sys

    code = ("import sys, remote_gpu_server.app, remote_gpu_server.workers.worker; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


#: The most lines a module of the packages may have: one that grows past it
#: holds more than one responsibility, and is split where they part.
MAX_LINES = 500


def test_no_module_is_over_500_lines() -> None:
    import inspect

    long = {}
    for name in MODULES:
        source = inspect.getsourcefile(importlib.import_module(name))
        assert source is not None
        with open(source, encoding="utf-8") as module:
            lines = sum(1 for _ in module)
        if lines > MAX_LINES:
            long[name] = lines
    assert not long, f"modules over {MAX_LINES} lines: {long}"
