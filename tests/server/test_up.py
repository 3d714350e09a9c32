"""``rgpu up`` (what ``./run.sh`` runs) as a user meets it, in a real terminal.

``rgpu up`` runs in a pseudo-terminal (pexpect) with a real GPU server and
a real JupyterLab: the URL it prints is the server's real one, ``rgpu`` and
that URL are in JupyterLab's terminals, Ctrl-C leaves the answer to
JupyterLab's own "Shut down this Jupyter server (y/[n])?" while the GPU
server keeps serving, and the server stops after JupyterLab did. A port
that is taken is refused before anything starts, and a taken default gives
way to the next free port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import sysconfig
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_gpu_server import up as rgpu_up
from waiting import wait_for

from remote_gpu_kernel.cli import main


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port that another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_port_that_is_taken_is_refused_before_anything_starts(
        taken: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "client.json"))
    monkeypatch.delenv("RGPU_PORT", raising=False)
    assert main(["up", "--port", str(taken), "--db", str(tmp_path / "rgpu.sqlite3")]) == 1
    err = capsys.readouterr().err
    assert err == (f"rgpu up: port {taken} (--port) is in use by another program on 127.0.0.1; "
                   "choose another, or 0 for any free one\n")
    monkeypatch.setenv("RGPU_PORT", str(taken))
    assert main(["up", "--db", str(tmp_path / "rgpu.sqlite3")]) == 1
    assert f"port {taken} (RGPU_PORT) is in use" in capsys.readouterr().err
    monkeypatch.setenv("RGPU_PORT", "http")
    assert main(["up", "--db", str(tmp_path / "rgpu.sqlite3")]) == 1
    assert "RGPU_PORT='http' is not a port number" in capsys.readouterr().err
    assert not (tmp_path / "rgpu.sqlite3").exists() and not (tmp_path / "client.json").exists()


def test_a_taken_default_port_gives_way_to_the_next_free_one(taken: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rgpu_up, "DEFAULT_PORT", taken)
    port, note = rgpu_up.choose_port(None, environ={})
    assert port > taken and rgpu_up.port_is_free(port)
    assert note == f"port {taken} is in use by another program; the GPU server takes {port}"
    assert rgpu_up.choose_port(None, environ={"RGPU_PORT": "0"}) == (0, None)


def test_rgpu_serve_says_its_port_is_taken_in_one_line(taken: int, tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", str(taken),
                          "--db", str(tmp_path / "rgpu.sqlite3"), "--slots", "cpu:1", "--log-level", "warning"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"rgpu serve: port {taken} on 127.0.0.1 is in use by another program; choose another with --port "
        "(--port 0 picks a free one)")
    assert "Traceback" not in out.stderr


def _listened_on(port: int) -> bool:
    """Whether a connection to ``port`` on loopback is accepted (probing by binding
    would take the port from a server about to listen on it)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def _terminal(lab: str, token: str, command: str, until: str) -> str:
    """What a new JupyterLab terminal shows after ``command`` up to a line matching ``until``."""
    from websockets.sync.client import connect

    request = urllib.request.Request(f"{lab}/api/terminals?token={token}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        name = json.load(answer)["name"]
    shown = ""
    with connect(f"{lab.replace('http', 'ws')}/terminals/websocket/{name}?token={token}",
                 open_timeout=30) as ws:
        ws.send(json.dumps(["stdin", command + "\r"]))
        while not re.search(until, shown):
            kind, *rest = json.loads(ws.recv(timeout=60))
            if kind == "stdout":
                shown += rest[0]
    urllib.request.urlopen(urllib.request.Request(f"{lab}/api/terminals/{name}?token={token}",
                                                  method="DELETE"), timeout=30).close()
    return shown


def _spawn_up(tmp_path: Path, lab_token: str) -> Any:
    """``rgpu up`` in a pseudo-terminal, as a user in a fresh environment starts it:
    its scripts folder not on ``PATH``, a server and JupyterLab of the test's own."""
    import pexpect

    env = {k: v for k, v in os.environ.items() if not k.startswith("RGPU_") and k != "VIRTUAL_ENV"}
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != scripts)
    env.update(RGPU_CONFIG=str(tmp_path / "client.json"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), TERM="xterm", PYTHONUNBUFFERED="1")
    (tmp_path / "notebooks").mkdir()
    return pexpect.spawn(sys.executable, [
        "-m", "remote_gpu_kernel.cli", "up", "--port", "0", "--db", str(tmp_path / "rgpu.sqlite3"),
        "--slots", "cpu:1", "--", "--no-browser", f"--port={_free_port()}", "--ip=127.0.0.1",
        f"--IdentityProvider.token={lab_token}", f"--ServerApp.root_dir={tmp_path / 'notebooks'}",
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
    ], env=env, encoding="utf-8", timeout=180, dimensions=(50, 250), logfile=sys.stdout)


def _lab_listening(up: Any) -> tuple[str, int]:
    """JupyterLab's URL and port, once it listens there. Jupyter moves on to the
    next port if another program took the one asked for since it was found free,
    and it prints its URL first and binds its port on its event loop's first turn."""
    up.expect(r"Jupyter Server [\d.]+ is running at")
    up.expect(r"(http://127\.0\.0\.1:(\d+))/lab\?token=")
    lab, port = up.match.group(1), int(up.match.group(2))
    wait_for(lambda: _listened_on(port), what=f"JupyterLab to listen on port {port}")
    return lab, port


@pytest.mark.timeout(600)
def test_rgpu_up_wires_jupyterlab_to_its_server_and_ctrl_c_is_jupyterlabs(tmp_path: Path) -> None:
    import pexpect

    lab_token = os.urandom(8).hex()
    scripts = sysconfig.get_path("scripts")
    up = _spawn_up(tmp_path, lab_token)
    try:
        up.expect(r"GPU server on (ws://127\.0\.0\.1:(\d+));")
        url, port = up.match.group(1), int(up.match.group(2))
        assert port != 0
        saved = json.loads((tmp_path / "client.json").read_text())
        assert saved["url"] == url
        lab, _ = _lab_listening(up)

        # JupyterLab's terminal has this environment's rgpu, and the server's real URL.
        shown = _terminal(lab, lab_token, 'echo "rgpu=$(command -v rgpu) url=$RGPU_URL"', r"url=ws://\S+")
        assert f"rgpu={os.path.join(scripts, 'rgpu')} url={url}" in shown, shown

        # Ctrl-C: JupyterLab asks, and the GPU server still serves meanwhile.
        status = urllib.request.Request(url.replace("ws://", "http://") + "/api/status",
                                        headers={"Authorization": f"Bearer {saved['token']}"})
        for _ in range(3):  # JupyterLab gives up waiting for an answer after 5 s
            up.sendintr()
            up.expect(r"Shut down this Jupyter server \(y/\[n\]\)\?")
            with urllib.request.urlopen(status, timeout=2) as answer:
                assert answer.status == 200, "Ctrl-C reached the GPU server"
            up.send("y\r")
            if up.expect([r"Shutdown confirmed", r"resuming operation"]) == 0:
                break
        else:
            pytest.fail("JupyterLab never took the answer")
        up.expect(r"rgpu up: JupyterLab has stopped; stopping the GPU server")
        up.expect(r"INFO shutting down")  # the server's own log, after JupyterLab's
        up.expect(pexpect.EOF)
    finally:
        up.close(force=True)
    assert up.exitstatus == 0
    assert rgpu_up.port_is_free(port), "the GPU server outlived rgpu up"


@pytest.mark.timeout(600)
def test_a_killed_rgpu_up_leaves_neither_its_server_nor_jupyterlab_running(tmp_path: Path) -> None:
    import signal

    up = _spawn_up(tmp_path, os.urandom(8).hex())
    try:
        up.expect(r"GPU server on ws://127\.0\.0\.1:(\d+);")
        port = int(up.match.group(1))
        _, lab_port = _lab_listening(up)
        os.kill(up.pid, signal.SIGKILL)  # no handler runs: the kernel must end its children
        wait_for(lambda: not _listened_on(port), what="the GPU server to stop after rgpu up was killed")
        wait_for(lambda: not _listened_on(lab_port), what="JupyterLab to stop after rgpu up was killed")
    finally:
        up.close(force=True)
