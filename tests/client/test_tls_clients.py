"""Every client over TLS, and every client's refusal to send a token in clear.

``%%gpu`` in a real local kernel and the Remote GPU kernel through
jupyter_client reach the shared ``rgpu serve --tls self-signed`` server when
given its certificate, and fail a cell with one line when not. Plain ws://
to a host that does not resolve to loopback alone is refused before any
connection is made (the host name below does not resolve: ``.invalid`` is
reserved; ``*.localhost`` names are loopback only where they resolve so),
and allowed with ``insecure``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernels import LocalKernel, kernel_with_magic
from remote_gpu_kernel import Client, ConnectionLost, InsecureConnection
from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.cli import main
from remote_gpu_core.login import ClientConfig
from remote_gpu_kernel.kernelspec import install
from remote_gpu_core.tls import is_loopback, ssl_context
from remote_kernels import KernelDriver, kernel_env
from servers import ServerProcess
from tls_certs import self_signed_cert

FAR = "ws://gpu-box.invalid:8765"


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("RGPU_URL", "RGPU_TOKEN", "RGPU_CA", "RGPU_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "client.json"))
    return monkeypatch


def test_an_address_is_loopback_by_itself_and_a_name_by_what_it_resolves_to() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(host), host  # this machine's hosts file has localhost at 127.0.0.1
    for host in ("gpu-box.invalid", "10.0.0.1", "0.0.0.0", "::", "", None, "a" * 300):
        assert not is_loopback(host), host


#: What the resolver answers below: DNS is the thing being decided on, so it is
#: replaced by a test double that answers these and nothing else.
ANSWERS = {"localhost": ["127.0.0.1", "::1"], "app.localhost": ["127.0.0.1"],
           "evil.localhost": ["203.0.113.7"], "split.localhost": ["127.0.0.1", "203.0.113.7"],
           "six.localhost": ["::1", "2001:db8::1"]}


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """socket.getaddrinfo answering :data:`ANSWERS`; the names asked, in order."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        asked.append(host)
        if host not in ANSWERS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, 0, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in ANSWERS[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_name_is_loopback_only_if_every_address_it_resolves_to_is(resolver: list[str]) -> None:
    assert is_loopback("localhost") and is_loopback("app.localhost")
    for host in ("evil.localhost", "split.localhost", "six.localhost", "nowhere.localhost"):
        assert not is_loopback(host), host
    assert resolver == ["localhost", "app.localhost", "evil.localhost", "split.localhost", "six.localhost",
                        "nowhere.localhost"]
    assert is_loopback("127.0.0.1") and resolver[-1] == "nowhere.localhost"  # an address is not resolved


def test_a_localhost_name_that_resolves_elsewhere_gets_no_token_in_clear(
        no_config: pytest.MonkeyPatch, resolver: list[str]) -> None:
    url = "ws://evil.localhost:8765"
    with pytest.raises(InsecureConnection, match="plain ws:// to evil.localhost"):
        Client(url, "rgpu_token").session()
    api = ApiClient(url, "rgpu_token")
    with pytest.raises(InsecureConnection, match="plain http:// to evil.localhost"):
        api.status()
    with pytest.raises(InsecureConnection, match="plain ws:// to evil.localhost"):
        api.submit("print(1)")
    assert main(["login", url, "rgpu_token"]) == 1
    # Only the check asked the resolver: no connection was tried.
    assert set(resolver) == {"evil.localhost"}


def test_plain_ws_to_another_host_is_refused_before_connecting(no_config: pytest.MonkeyPatch) -> None:
    with pytest.raises(InsecureConnection) as info:
        Client(FAR, "rgpu_token").session()
    message = str(info.value)
    assert "\n" not in message and "plain ws:// to gpu-box.invalid" in message
    assert "wss://gpu-box.invalid:8765" in message and "--insecure" in message
    api = ApiClient(FAR, "rgpu_token")
    with pytest.raises(InsecureConnection, match="plain http:// to gpu-box.invalid"):
        api.status()
    with pytest.raises(InsecureConnection, match="plain ws:// to gpu-box.invalid"):
        api.submit("print(1)")


def test_insecure_lets_plain_ws_through(no_config: pytest.MonkeyPatch) -> None:
    # Past the check, the client tries the network: the name does not resolve.
    with pytest.raises(ConnectionLost, match="cannot reach"):
        Client(FAR, "rgpu_token", insecure=True).session()
    no_config.setenv("RGPU_INSECURE", "1")
    with pytest.raises(ConnectionLost, match="cannot reach"):
        Client(FAR, "rgpu_token").session()
    assert ApiClient.from_config(FAR, "rgpu_token").insecure


def test_the_cli_refuses_and_allows_with_insecure(no_config: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", FAR, "--token", "rgpu_token"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rgpu status: refusing to send the token")
    assert main(["status", "--url", FAR, "--token", "rgpu_token", "--insecure"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err
    assert main(["login", FAR, "rgpu_token"]) == 1
    assert "refusing to send the token" in capsys.readouterr().err


def test_login_saves_tls_settings_and_insecure_counts_for_its_url_only(no_config: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("saved as given; read when a wss:// connection is made\n")
    assert main(["login", FAR, "rgpu_token", "--insecure", "--cafile", str(ca)]) == 0
    saved = json.loads(Path(os.environ["RGPU_CONFIG"]).read_text())
    assert saved == {"url": FAR, "token": "rgpu_token", "cafile": str(ca), "insecure": True}
    config = ClientConfig.load()
    assert config.insecure and config.cafile == str(ca)
    other = ClientConfig.load("ws://other.invalid:8765")
    assert not other.insecure and other.cafile == str(ca)


def test_ssl_contexts_are_cached_until_the_ca_file_changes(tls_server: ServerProcess, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(self_signed_cert(tls_server).read_bytes())
    first = ssl_context("wss://localhost:1", str(ca))
    assert first is not None and ssl_context("https://localhost:2", str(ca)) is first
    assert ssl_context("ws://localhost:1", str(ca)) is None
    ca.write_bytes(ca.read_bytes() + b"\n")
    assert ssl_context("wss://localhost:1", str(ca)) is not first


# -- %%gpu and the Remote GPU kernel over wss:// ------------------------------


@pytest.fixture
def magic_kernel(tls_server: ServerProcess, tls_alice: str, tmp_path: Path) -> Iterator[LocalKernel]:
    """A local kernel with %load_ext remote_gpu_kernel, RGPU_URL, RGPU_TOKEN and RGPU_CA."""
    env = dict(os.environ, RGPU_URL=tls_server.url, RGPU_TOKEN=tls_alice,
               RGPU_CA=str(self_signed_cert(tls_server)), RGPU_CONFIG=str(tmp_path / "none.json"))
    env.pop("RGPU_INSECURE", None)
    with kernel_with_magic(env) as kernel:
        yield kernel


def test_gpu_magic_over_wss(magic_kernel: LocalKernel, tls_server: ServerProcess, tls_alice: str) -> None:
    run = magic_kernel.run("%%gpu\nprint('magic over TLS')")
    assert run.reply["status"] == "ok", run.reply
    assert run.stdout == "magic over TLS\n"
    magic_kernel.run("%gpu release")
    # %gpu connect with --cafile, by the other name the certificate lists.
    url = tls_server.url.replace("127.0.0.1", "localhost")
    cert = self_signed_cert(tls_server)
    run = magic_kernel.run(f"%gpu connect {url} --token {tls_alice} --cafile {cert}")
    assert run.reply["status"] == "ok", run.reply
    assert magic_kernel.run("%%gpu\nprint(2 + 3)").stdout == "5\n"
    magic_kernel.run("%gpu release")


def test_gpu_magic_says_why_it_cannot_connect(magic_kernel: LocalKernel, tls_server: ServerProcess,
                                              tls_alice: str) -> None:
    # Refused at %gpu connect, before any cell: the token would go in clear.
    run = magic_kernel.run(f"%gpu connect {FAR} --token {tls_alice}")
    assert run.reply["status"] == "error" and run.reply["ename"] == "InsecureConnection"
    assert "plain ws:// to gpu-box.invalid" in run.reply["evalue"]
    # Without the certificate: the first cell fails with one line.
    magic_kernel.run("%env RGPU_CA=")
    run = magic_kernel.run(f"%gpu connect {tls_server.url} --token {tls_alice}")
    assert run.reply["status"] == "ok", run.reply
    run = magic_kernel.run("%%gpu\nprint('never')")
    assert run.reply["ename"] == "UntrustedCertificate", run.reply
    assert "self-signed certificate" in run.reply["evalue"] and "--cafile" in run.reply["evalue"]
    (error,) = run.of_type("error")
    assert len(error["traceback"]) == 1
    run = magic_kernel.run("%gpu connect --bogus")
    assert run.reply["ename"] == "ValueError" and "unrecognized arguments" in run.reply["evalue"]


@pytest.fixture
def jupyter_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "prefix" / "share" / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(path))
    return path


def test_the_remote_gpu_kernel_over_wss(jupyter_path: Path, tls_server: ServerProcess, tls_alice: str,
                                        tmp_path: Path) -> None:
    cert = self_signed_cert(tls_server)
    install(prefix=str(tmp_path / "prefix"), url=tls_server.url, cafile=str(cert))
    install(prefix=str(tmp_path / "prefix"), kernel_name="untrusted", url=tls_server.url)
    spec = json.loads((jupyter_path / "kernels" / "remote-gpu" / "kernel.json").read_text())
    assert spec["env"] == {"RGPU_URL": tls_server.url, "RGPU_CA": str(cert)}

    env = kernel_env(tmp_path, None, tls_alice)
    env.pop("RGPU_CA", None)
    kernel = KernelDriver(env).start()
    try:
        run = kernel.run("import os\nprint('kernel over TLS', os.getpid() != 0)")
        assert run.status == "ok", run.reply
        assert run.stdout.endswith("kernel over TLS True\n")
    finally:
        kernel.shutdown()

    kernel = KernelDriver(env, kernel_name="untrusted").start()
    try:
        run = kernel.run("print('never')")
        assert run.status == "error" and run.reply["ename"] == "UntrustedCertificate"
        assert "self-signed certificate" in run.reply["evalue"]
    finally:
        kernel.shutdown()
