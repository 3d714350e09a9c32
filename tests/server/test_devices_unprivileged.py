"""The GPUs fenced on a server that is not root: each bubblewrap sandbox binds its own GPUs' files only.

The real server runs as a bare unprivileged uid (see ``unprivileged.py``)
with two GPU slots and no NVML: the driver's ``/proc`` files of a stand-in
host (:mod:`fake_gpu_host`, device files made with ``mknod``) say which
minor number each GPU has, and index and minor differ.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator

import pytest

from fake_gpu_host import FakeGpuFiles, make_host
from remote_gpu_kernel import Client
from remote_gpu_server.isolation.devices import TEST_ROOT_VAR
from servers import ServerProcess
from test_gpu_fence import BASE_DEV, devices_of
from test_isolation import run
from unprivileged import launcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the server as another uid; mknod: run as root")

GPUS = [FakeGpuFiles("0000:17:00.0", 1, "GPU-1111"), FakeGpuFiles("0000:3b:00.0", 0, "GPU-2222")]
SPARE_MINOR = 2


def expected(slot: str) -> dict[str, list[int]]:
    minor = GPUS[int(slot.removeprefix("gpu"))].minor
    return {"nvidiactl": [195, 255], "nvidia-uvm": [508, 0], "nvidia-uvm-tools": [508, 1],
            f"nvidia{minor}": [195, minor]}


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    tmp = tmp_path_factory.mktemp("sandboxed-gpus")
    host = make_host(tmp / "host", GPUS, spare_minors=[SPARE_MINOR])  # inside what the server may reach
    server = ServerProcess(tmp, "0,1", "--worker-memory", "1G", launcher=launcher(str(tmp)),
                           env={TEST_ROOT_VAR: str(host)})
    server.tokens = {user: server.token(user) for user in ("alice", "bob")}  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


def test_a_sandbox_holds_its_own_gpus_files_only_whatever_a_cell_does(sandboxed: ServerProcess) -> None:
    assert any("isolated in bubblewrap sandboxes" in line for line in sandboxed.log)
    tokens = sandboxed.tokens  # type: ignore[attr-defined]
    with Client(sandboxed.url, tokens["bob"]).session() as b, Client(sandboxed.url, tokens["alice"]).session() as a:
        run(b, "b_secret = 'sealed'")
        for session in (a, b):
            seen = devices_of(session)
            assert seen["nvidia"] == expected(session.slots[0])
            assert seen["dev"] == sorted(BASE_DEV + list(seen["nvidia"]))
        mine = next(n for n in expected(a.slots[0]) if n[len("nvidia"):].isdigit())
        others = [f"nvidia{m}" for m in (0, 1, SPARE_MINOR) if f"nvidia{m}" != mine]
        stand_in = sandboxed.tmp / "host" / "dev"
        out = run(a, f"""
import os, subprocess, sys
for path in {['/dev/' + n for n in others] + [str(stand_in / n) for n in others]!r}:
    try:
        open(path)
        print('OPENED', path)
    except OSError as exc:
        print(exc.errno)
try:
    open('/dev/{mine}')
except OSError as exc:
    print('own', exc.errno)
print(subprocess.run([sys.executable, '-c', "import os; print(sorted(n for n in os.listdir('/dev') if 'nvidia' in n))"],
                     env=dict(os.environ, CUDA_VISIBLE_DEVICES='0,1,2'), capture_output=True, text=True).stdout)
""")
        lines = out.strip().splitlines()
        assert lines[:2 * len(others)] == [str(errno.ENOENT)] * (2 * len(others)), out
        assert lines[2 * len(others)] == f"own {errno.ENXIO}"  # there: only the driver is missing here
        assert lines[-1] == str(sorted(expected(a.slots[0])))  # CUDA_VISIBLE_DEVICES opens nothing more
        assert run(b, "print(b_secret)") == "sealed\n"
        assert devices_of(b)["nvidia"] == expected(b.slots[0])
