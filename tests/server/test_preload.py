"""What a warm worker imports before its lease (``rgpu serve --preload``).

A user's first cell should not wait for torch: by default a warm worker
imports it (where it is installed) before anyone leases it. ``--preload``
names other modules, or ``none``; a name that cannot be imported is said in
the server's log and the worker still starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

from remote_gpu_kernel import Client
from servers import ServerProcess

#: A standard module that neither ipykernel nor the worker imports on their own.
STDLIB_MODULE = "wave"
CHECK = "import sys; print(sorted(name for name in ('torch', 'wave') if name in sys.modules))"


def first_cell(server: ServerProcess) -> str:
    with Client(server.url, server.token("alice")).session() as session:
        return session.execute(CHECK).stdout.strip()


def test_by_default_a_warm_worker_has_imported_torch_before_its_lease(torch: ModuleType, tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "cpu:1", preload=None) as server:
        assert first_cell(server) == "['torch']"


def test_preload_names_the_modules_and_a_missing_one_is_said_not_fatal(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "cpu:1", preload=f"{STDLIB_MODULE},no_such_module_for_rgpu") as server:
        assert first_cell(server) == "['wave']"
        server.wait_for_log(r"could not preload no_such_module_for_rgpu: No module named")


def test_preload_none_imports_nothing_and_a_cell_imports_torch_itself(torch: ModuleType, tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "cpu:1", preload="none") as server:
        assert first_cell(server) == "[]"


def test_a_preload_that_is_not_a_module_name_stops_the_server_saying_why(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", "0", "--db",
                          str(tmp_path / "rgpu.sqlite3"), "--preload", "torch,os; rm -rf /"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "rgpu serve: --preload: os; rm -rf / is not a module name" in out.stderr
