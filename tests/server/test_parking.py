"""Parking sessions on a real server with CPU slots: park, resume, quotas, restarts, expiry."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from remote_gpu_kernel import Client, ConnectionLost, ParkError, SessionReleased
from remote_gpu_kernel.api import ApiClient
from remote_gpu_server.isolation.user_sites import SITE_PREFIX
from postgres import BACKENDS
from servers import ServerProcess
from stores import BlockingStore, execute_raw
from waiting import wait_for

#: A notebook's worth of state: arrays, tensors, a model, a function, and an
#: object that cannot be pickled (a generator).
STATE = """
import numpy as np, torch
arr = np.arange(2_000_000, dtype=np.float64)
same = arr
tensor = torch.arange(12.0).reshape(3, 4)
row = tensor[1]
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
factor = 3
def triple(x):
    return x * factor
numbers = (i for i in range(3))
"""
#: Prints what the state above holds, as the next cell would use it.
CHECK = ("print(arr.sum(), same is arr, tensor.sum().item(), row.untyped_storage().data_ptr() == "
         "tensor.untyped_storage().data_ptr(), opt.param_groups[0]['params'][0] is model.weight, "
         "round(model(torch.ones(4)).sum().item(), 4), triple(2))")


def quiet(_: Any) -> None:
    pass



def session_folders(server: ServerProcess) -> list[Path]:
    """The session folders in the server's session root (as root, in each user's own disk;
    their own packages' sites are there too, and stay)."""
    found = []
    for entry in (server.tmp / "sessions").iterdir():
        if entry.name.startswith("u-"):  # a user's folder (their disk, as root): their folders are in it
            found += [f for f in entry.iterdir() if not f.name.startswith((".", SITE_PREFIX))
                      and f.name != "lost+found"]
        elif not entry.name.startswith("."):
            found.append(entry)
    return sorted(found)


def no_session_folders(server: ServerProcess) -> None:
    """Wait until the session folders are gone (they are deleted in the background)."""
    wait_for(lambda: session_folders(server) == [], what="the session folders to be deleted")


def expected_check(session: Any) -> str:
    """What CHECK prints for STATE, computed by the same session before it parks."""
    result = session.execute(CHECK, on_output=quiet)
    assert result.ok, result.error
    return result.stdout


def test_a_session_folder_is_measured_without_following_links(tmp_path: Path) -> None:
    from remote_gpu_server.sessions.parking import tree_size

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / ".rgpu-parked").mkdir()
    (tmp_path / ".rgpu-parked" / "blobs.bin").write_bytes(b"y" * 300)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"z" * 5000)
    (tmp_path / "link").symlink_to(outside)
    (tmp_path / "file-link").symlink_to(outside / "big.bin")
    assert tree_size(tmp_path) == 1300
    assert tree_size(tmp_path, skip=".rgpu-parked") == 1000
    assert tree_size(tmp_path / "link") == 0  # a link is not a session folder
    assert tree_size(tmp_path / "missing") == 0


def test_park_gives_the_slot_back_and_the_next_cell_restores_everything(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    alice, bob = fresh_server.token("alice"), fresh_server.token("bob")
    notices: list[str] = []
    s = Client(fresh_server.url, alice).session(on_notice=notices.append)
    assert s.execute(STATE, on_output=quiet).ok
    before = expected_check(s)
    where = s.execute("import os\nopen('notes.txt', 'w').write('kept')\nprint(os.getuid(), os.getcwd())",
                      on_output=quiet).stdout

    parked = s.park()
    assert s.parked
    uid, cwd = where.split()
    saved = Path(cwd) / ".rgpu-parked"
    assert saved.stat().st_uid == int(uid) and (os.geteuid() != 0 or int(uid) != 0)  # the user's files
    if os.geteuid() == 0:  # while parked, out of reach of the user's other sessions (same uid)
        assert (Path(cwd).stat().st_uid, Path(cwd).stat().st_mode & 0o777) == (0, 0o700)
    assert {"arr", "same", "tensor", "row", "model", "opt", "factor", "triple"} <= set(parked.names)
    assert set(parked.unsaved) == {"numbers"} and "generator" in parked.unsaved["numbers"]
    assert "gave cpu0 back" in parked.text and "numbers (cannot pickle 'generator' object)" in parked.text
    assert parked.nbytes >= 16_000_000

    status = ApiClient(fresh_server.url, alice).status()
    assert status["slots"][0]["holder"] is None and status["sessions"] == []
    [entry] = status["parked"]
    assert entry["id"] == s.id and entry["mine"] and entry["nbytes"] == parked.nbytes and entry["gpus"] == 1
    other = ApiClient(fresh_server.url, bob).status()["parked"][0]
    assert other["user"] == "alice" and other["id"] is None and other["names"] is None
    metrics = ApiClient(fresh_server.url, alice).metrics()
    assert 'rgpu_sessions_parked{pool="default"} 1.0' in metrics
    assert 'rgpu_leases_active{' not in metrics and 'rgpu_slots_free{pool="default"} 1.0' in metrics

    # The scheduler counts the parked session as holding nothing: bob gets the only slot.
    b = Client(fresh_server.url, bob).session()
    assert b.slots == ["cpu0"]
    positions: list[int] = []
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.setdefault("result", s.execute(
        CHECK, on_output=quiet, on_queue=positions.append)))
    runner.start()
    wait_for(lambda: positions == [1], what="alice's restore to wait in the queue")
    b.release()
    runner.join(120)
    result = done["result"]
    assert result.ok, result.error
    assert result.stdout == before
    assert s.execute("print('numbers' in globals())", on_output=quiet).stdout == "False\n"
    assert s.execute("print(os.getuid(), os.getcwd(), open('notes.txt').read())",
                     on_output=quiet).stdout == f"{uid} {cwd} kept\n"  # the same session folder
    [restored] = [n for n in notices if n.startswith("Restored")]
    assert f"{len(parked.names)} name(s)" in restored and "on cpu0" in restored and "numbers" in restored
    assert not s.parked and s.slots == ["cpu0"]
    assert ApiClient(fresh_server.url, alice).status()["parked"] == []
    assert not (Path(cwd) / ".rgpu-parked").exists()  # the files go once restored
    s.release()
    no_session_folders(fresh_server)


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_a_parked_session_survives_a_restart_of_the_server(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    token = fresh_server.token()
    client = Client(fresh_server.url, token)
    s = client.session()
    assert s.execute(STATE, on_output=quiet).ok
    before = expected_check(s)
    s.execute("print('before the park')", on_output=quiet)
    s.park()
    s.close()
    fresh_server.stop()
    restarted = ServerProcess(fresh_server.tmp, "cpu:1", db=fresh_server.db).start()
    try:
        restarted.wait_for_log("found 1 parked session")
        notices: list[str] = []
        again = Client(restarted.url, token).session(resume=s.id, on_notice=notices.append)
        assert again.resumed and again.parked and again.id == s.id
        result = again.execute(CHECK, on_output=quiet)
        assert result.ok, result.error
        assert result.stdout == before
        assert any(n.startswith("Restored the session parked") for n in notices)
        printed = [o.content.get("text") for o in again.replay(0) if o.msg_type == "stream"]
        assert printed.count("before the park\n") == 1  # the journal goes on, nothing overwritten
        again.release()
    finally:
        restarted.stop()
    with BlockingStore(fresh_server.db) as store:
        usage = store.gpu_seconds_by_user()
    rows = execute_raw(fresh_server.db, "SELECT id, released, parked FROM sessions ORDER BY id")
    assert [r[0] for r in rows] == [s.id, f"{s.id}/1"] and all(r[1] is not None for r in rows)
    assert usage["alice"] < 600  # the restart's time parked is not GPU time


def test_park_quota(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--park-quota", "12M"]
    fresh_server.start()
    token = fresh_server.token()
    small = Client(fresh_server.url, token).session()
    small.execute("import numpy as np\nx = np.ones(1_000_000)", on_output=quiet)  # 8 MB
    small.park()
    big = Client(fresh_server.url, token).session()
    big.execute("import numpy as np\ny = np.ones(1_000_000)\nkept = 'yes'", on_output=quiet)
    with pytest.raises(ParkError, match=r"left of your park quota \(--park-quota 12 MiB; your other parked "
                                        r"sessions hold 7.6\d MiB\).*nothing was lost"):
        big.park()
    assert not big.parked
    assert big.execute("print(y.sum(), kept)", on_output=quiet).stdout == "1000000.0 yes\n"
    folders = [f for f in session_folders(fresh_server) if (f / ".rgpu-parked").exists()]
    assert len(folders) == 1  # the refused park left nothing behind
    big.release()
    small.release()  # released while parked: its files go with it
    no_session_folders(fresh_server)


def test_idle_sessions_are_parked_and_disconnected_ones_too(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--park-after", "1", "--grace", "1"]
    fresh_server.start()
    token = fresh_server.token()
    client = Client(fresh_server.url, token)
    s = client.session()
    s.execute("value = 41", on_output=quiet)
    wait_for(lambda: s.parked, what="the idle session to be parked")
    assert s.park_info is not None and "idle for more than 1 s, --park-after" in s.park_info.text
    assert s.execute("print(value + 1)", on_output=quiet).stdout == "42\n"

    other = client.session()
    other.execute("kept = 'after the grace period'", on_output=quiet)
    other.close()  # the client goes away: past --grace, the session is parked, not released
    api = ApiClient(fresh_server.url, token)
    wait_for(lambda: any(p["id"] == other.id for p in api.status()["parked"]), what="a parked session")
    back = client.session(resume=other.id)
    assert back.parked and back.pull("kept") == {"kept": "after the grace period"}
    back.release()
    s.release()


#: A cell whose worker never answers the server's operations again (as one
#: whose thread keeps the GIL in native code would not), then goes idle.
DEAF = """\
import gc
from remote_gpu_server.worker_process.operations import Listener
[o for o in gc.get_objects() if isinstance(o, Listener)][0].serve = lambda data: None
"""


def test_an_idle_park_its_worker_does_not_answer_holds_the_gpu_no_longer_than_the_idle_timeout(
        fresh_server: ServerProcess) -> None:
    fresh_server.slots = "cpu:1"
    fresh_server.args = ["--park-after", "1", "--idle-timeout", "4"]
    fresh_server.start()
    s = Client(fresh_server.url, fresh_server.token()).session()
    assert s.execute(DEAF, on_output=quiet).ok
    wait_for(lambda: s.released, what="the release of the session whose park got no answer")
    assert str(s.released).endswith("idle for more than 1 s (--park-after); its variables were not saved: the park "
                                    "got no answer before the idle timeout (4 s, --idle-timeout)")
    other = Client(fresh_server.url, fresh_server.token("bob")).session()  # the one slot is free again
    assert other.execute("print(1)", on_output=quiet).stdout == "1\n"
    other.release()


def test_a_park_after_the_client_left_that_gets_no_answer_holds_the_gpu_no_longer_than_the_idle_timeout(
        fresh_server: ServerProcess) -> None:
    """The client went away (its laptop closed): past --grace its session is parked,
    and a park that gets no answer, from a deaf worker or behind a cell that never
    ends, gives the GPU back at the idle timeout, as an idle park does."""
    fresh_server.slots = "cpu:1"
    fresh_server.args = ["--park-after", "600", "--grace", "1", "--idle-timeout", "4"]
    fresh_server.start()
    s = Client(fresh_server.url, fresh_server.token()).session()
    assert s.execute(DEAF, on_output=quiet).ok
    s.close()
    reason = ("the client disconnected and did not come back within 1 s; its variables were not saved: the park "
              "got no answer before the idle timeout (4 s, --idle-timeout)")
    wait_for(lambda: any(reason in line for line in fresh_server.log), 30, "the release of the session")
    other = Client(fresh_server.url, fresh_server.token("bob")).session()  # the one slot is free again
    assert other.execute("print(1)", on_output=quiet).stdout == "1\n"
    other.release()


def test_a_client_that_came_back_keeps_its_running_cell_past_the_idle_timeout(fresh_server: ServerProcess) -> None:
    """The park that its absence started waits for the running cell; the client came
    back meanwhile, so the idle timeout does not end that cell, nor is the session
    parked once it has ended."""
    fresh_server.slots = "cpu:1"
    fresh_server.args = ["--park-after", "600", "--grace", "1", "--idle-timeout", "5"]
    fresh_server.start()
    client = Client(fresh_server.url, fresh_server.token())
    s = client.session()
    printed = threading.Event()
    closing = threading.Thread(target=lambda: printed.wait(30) and s.close())
    closing.start()
    with pytest.raises(ConnectionLost):  # the connection drops once the cell has begun
        s.execute("import time\nprint('begun', flush=True)\ntime.sleep(9)\nfinished = True",
                  on_output=lambda _: printed.set())
    closing.join()
    wait_for(lambda: any("its client stayed away 1 s; it is parked once" in line for line in fresh_server.log), 10,
             "the park the client's absence started")
    again = client.session(resume=s.id)
    assert again.pull("finished") == {"finished": True}  # in turn: once the cell ended, 9 s after it began
    assert not again.released and not again.parked
    assert not any("parked session" in line for line in fresh_server.log)
    again.release()


def test_parked_sessions_are_released_after_park_keep(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--park-keep", str(3 / 86400)]  # 3 s
    fresh_server.start()
    s = Client(fresh_server.url, fresh_server.token()).session()
    s.execute("x = 1", on_output=quiet)
    s.park()
    wait_for(lambda: s.released, what="the parked session's release")
    assert "parked for more than" in str(s.released) and "--park-keep" in str(s.released)
    no_session_folders(fresh_server)
    with pytest.raises(SessionReleased):
        s.execute("x")


def test_an_interrupt_stops_waiting_and_the_session_stays_parked(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    alice, bob = fresh_server.token("alice"), fresh_server.token("bob")
    s = Client(fresh_server.url, alice).session()
    s.execute("x = 'still here'", on_output=quiet)
    s.park()
    b = Client(fresh_server.url, bob).session()
    positions: list[int] = []
    failed: dict[str, BaseException] = {}

    def run() -> None:
        try:
            s.execute("x", on_output=quiet, on_queue=positions.append)
        except ParkError as exc:
            failed["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    wait_for(lambda: positions == [1], what="the restore to wait in the queue")
    s.interrupt()
    runner.join(30)
    assert "stays parked" in str(failed["error"])
    status = ApiClient(fresh_server.url, alice).status()
    assert status["queue"] == [] and [p["id"] for p in status["parked"]] == [s.id]
    b.release()
    assert s.pull("x") == {"x": "still here"}  # any request restores it
    s.release()


def test_a_namespace_whose_files_are_gone_restarts_clean_and_says_so(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    notices: list[str] = []
    s = Client(fresh_server.url, fresh_server.token()).session(on_notice=notices.append)
    s.execute("x = 1", on_output=quiet)
    s.park()
    [folder] = session_folders(fresh_server)
    (folder / ".rgpu-parked" / "manifest.json").unlink()
    result = s.execute("print('x' in globals())", on_output=quiet)
    assert result.stdout == "False\n"
    assert any("Could not restore" in n and "variables are gone" in n for n in notices)
    s.release()


@pytest.mark.gpu
def test_tensors_are_back_on_cuda_after_a_resume(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "auto").start()
    try:
        s = Client(server.url, server.token()).session()
        s.execute("import torch\ng = torch.arange(10.0, device='cuda:0')\n"
                  "model = torch.nn.Linear(4, 4).to('cuda:0')", on_output=quiet)
        s.park()
        result = s.execute("print(g.device, model.weight.device, g.sum().item())", on_output=quiet)
        assert result.stdout == "cuda:0 cuda:0 45.0\n"
        s.release()
    finally:
        server.stop()
