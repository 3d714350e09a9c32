"""Certificates for TLS tests, and a real server that serves wss://.

:func:`issue` makes a test CA with ``trustme`` and a server certificate
for the given names, as PEM files. :func:`self_signed_server` starts
``rgpu serve --tls self-signed``, whose certificate lies at
:func:`self_signed_cert` of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme

from servers import ServerProcess

__all__ = ["Issued", "issue", "self_signed_cert", "self_signed_server"]


@dataclasses.dataclass(frozen=True)
class Issued:
    ca: Path
    cert: Path
    key: Path


def issue(folder: Path, *names: str) -> Issued:
    """A new CA in ``folder``/ca.pem and a certificate (chain) for ``names`` it signed."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*names)
    issued = Issued(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(issued.ca))
    server.private_key_pem.write_to_path(str(issued.key))
    with issued.cert.open("wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    return issued


def self_signed_cert(server: ServerProcess) -> Path:
    """Where ``rgpu serve --tls self-signed`` keeps its certificate: tls/ beside the store."""
    return server.db.parent / "tls" / "cert.pem"


def self_signed_server(tmp: Path, *args: str, wait_warm: bool = True) -> ServerProcess:
    return ServerProcess(tmp, "cpu:1", "--tls", "self-signed", *args).start(wait_warm=wait_warm)
