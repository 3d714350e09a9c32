"""TLS end to end: ``rgpu serve`` with a self-signed certificate and with a CA's.

The Python API and ``rgpu`` (its HTTP API client and its websocket job
submission) reach a real server over wss:// and https:// when told to trust
its certificate, and refuse it with one clear line when not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from remote_gpu_kernel import Client, TlsError, UntrustedCertificate
from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.cli import main
from remote_gpu_server.certificates import VALIDITY, fingerprint, self_signed
from servers import ServerProcess
from tls_certs import Issued, issue, self_signed_cert, self_signed_server


def _port(server: ServerProcess) -> int:
    port = urlsplit(server.url).port
    assert port is not None
    return port


def _presented_fingerprint(port: int) -> str:
    """The SHA-256 fingerprint of the certificate the server presents, read off the wire."""
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


@pytest.fixture(scope="module")
def ca_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Issued, str]]:
    """A server with a certificate for ``localhost`` only, from a test CA."""
    tmp = tmp_path_factory.mktemp("ca-server")
    issued = issue(tmp / "pki", "localhost")
    proc = ServerProcess(tmp, "cpu:1", "--certfile", str(issued.cert), "--keyfile", str(issued.key))
    token = proc.token("alice")
    proc.start()
    yield proc, issued, token
    proc.stop()


def test_self_signed_is_made_once_printed_and_served(tmp_path: Path) -> None:
    server = self_signed_server(tmp_path, wait_warm=False)
    try:
        cert = self_signed_cert(server)
        assert stat.S_IMODE(cert.with_name("key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
        assert "made now" in server.wait_for_log(r"TLS: self-signed certificate")
        printed = server.wait_for_log(r"SHA-256 fingerprint is ").split()[-1]
        assert printed == fingerprint(cert.read_bytes()) == _presented_fingerprint(_port(server))
        assert server.url.startswith("wss://127.0.0.1:")
    finally:
        server.stop()
    # The next start on the same data folder serves the same certificate.
    again = self_signed_server(tmp_path, wait_warm=False)
    try:
        assert "made earlier, reused" in again.wait_for_log(r"TLS: self-signed certificate")
        assert _presented_fingerprint(_port(again)) == printed
    finally:
        again.stop()


def test_self_signed_files_are_replaced_only_when_expired(tmp_path: Path) -> None:
    first = self_signed(tmp_path / "tls", "gpu-box.example")
    assert first.created and "gpu-box.example" in first.names and "localhost" in first.names
    assert self_signed(tmp_path / "tls").fingerprint == first.fingerprint
    # A key left readable by others is made private again.
    os.chmod(first.keyfile, 0o644)
    assert not self_signed(tmp_path / "tls").created
    assert stat.S_IMODE(first.keyfile.stat().st_mode) == 0o600
    # Once it has expired, the certificate is made anew.
    later = dt.datetime.now(dt.timezone.utc) + VALIDITY + dt.timedelta(days=1)
    renewed = self_signed(tmp_path / "tls", now=later)
    assert renewed.created and renewed.fingerprint != first.fingerprint


def test_python_api_over_wss_with_the_self_signed_certificate(tls_server: ServerProcess, tls_alice: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "none.json"))
    cert = str(self_signed_cert(tls_server))
    with Client(tls_server.url, tls_alice, cafile=cert).session() as session:
        result = session.execute("print('over TLS')")
        assert result.ok and result.stdout == "over TLS\n"
    # The same through RGPU_CA, with the name the certificate also lists.
    monkeypatch.setenv("RGPU_CA", cert)
    with Client(tls_server.url.replace("127.0.0.1", "localhost"), tls_alice).session() as session:
        session.push(x=21)
        assert session.pull("x") == {"x": 21}


def test_an_untrusted_certificate_is_refused_with_a_clear_line(tls_server: ServerProcess, tls_alice: str,
                                                               ca_server: tuple[ServerProcess, Issued, str],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.delenv("RGPU_CA", raising=False)
    with pytest.raises(UntrustedCertificate) as info:
        Client(tls_server.url, tls_alice).session()
    message = str(info.value)
    assert "\n" not in message and "self-signed certificate" in message and "--cafile" in message
    # Another server's certificate does not vouch for this one.
    _, issued, _ = ca_server
    with pytest.raises(UntrustedCertificate, match=f"nor {issued.ca}"):
        Client(tls_server.url, tls_alice, cafile=str(issued.ca)).session()
    # A CA file that cannot be read is named.
    with pytest.raises(TlsError, match="cannot read the CA file .*missing.pem"):
        Client(tls_server.url, tls_alice, cafile=str(tmp_path / "missing.pem")).session()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError, match="holds no PEM certificate"):
        Client(tls_server.url, tls_alice, cafile=str(tmp_path / "junk.pem")).session()


def test_a_ca_signed_certificate_and_its_host_names(ca_server: tuple[ServerProcess, Issued, str],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server, issued, token = ca_server
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("RGPU_CA", str(issued.ca))
    by_name = server.url.replace("127.0.0.1", "localhost")
    with Client(by_name, token).session() as session:
        assert session.execute("print(6 * 7)").stdout == "42\n"
    assert ApiClient.from_config(by_name, token).status()["you"]["user"] == "alice"
    # The certificate names localhost only: 127.0.0.1 is another name.
    with pytest.raises(UntrustedCertificate, match="certificate for another name.*127.0.0.1"):
        Client(server.url, token).session()


def test_rgpu_commands_over_https(ca_server: tuple[ServerProcess, Issued, str], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    server, issued, token = ca_server
    url = server.url.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "client.json"))
    for name in ("RGPU_URL", "RGPU_TOKEN", "RGPU_CA", "RGPU_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    script = tmp_path / "job.py"
    script.write_text("print('batch over TLS')\n")

    # Not trusted: one line, exit 1, for a plain request and for a submission.
    assert main(["status", "--url", url, "--token", token]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not trust" in err and "--cafile" in err
    assert main(["submit", str(script), "--url", url, "--token", token]) == 1
    assert "does not trust" in capsys.readouterr().err

    # --cafile on the command line.
    assert main(["submit", str(script), "--url", url, "--token", token, "--cafile", str(issued.ca)]) == 0
    job = capsys.readouterr().out.strip()
    assert main(["logs", job, "-f", "--poll", "0.2", "--url", url, "--token", token,
                 "--cafile", str(issued.ca)]) == 0
    assert capsys.readouterr().out == "batch over TLS\n"

    # rgpu login saves the CA file with the URL and token: later commands need no flags.
    assert main(["login", url, token, "--cafile", str(issued.ca)]) == 0
    capsys.readouterr()
    assert main(["status"]) == 0
    assert "cpu0" in capsys.readouterr().out


def test_serve_refuses_a_certificate_it_cannot_use(tmp_path: Path) -> None:
    issued = issue(tmp_path / "pki", "localhost")
    other = issue(tmp_path / "other", "localhost")
    cases = [
        (["--certfile", str(tmp_path / "nope.pem")], "cannot read the TLS certificate"),
        (["--certfile", str(issued.cert), "--keyfile", str(other.key)], "cannot use the TLS certificate"),
        (["--keyfile", str(issued.key)], "--keyfile needs --certfile"),
        (["--tls", "self-signed", "--certfile", str(issued.cert)], "leave out --certfile"),
    ]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", "0",
                              "--db", str(tmp_path / "db.sqlite3"), "--slots", "cpu:1", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("rgpu serve: ") and message in last, out.stderr
