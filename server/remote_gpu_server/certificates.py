"""TLS for the server: ``wss://`` and ``https://`` on its one port.

``rgpu serve --certfile PATH --keyfile PATH`` serves with a certificate the
admin brings (from the site's CA, or Let's Encrypt); ``rgpu serve --tls
self-signed`` makes one on the first start with :func:`self_signed` and
reuses it after, so clients keep trusting the same certificate.

- :func:`server_ssl_context` loads a certificate and key into a server
  context (TLS 1.2 or later); a file that cannot be read, or a key that
  does not match, raises ValueError naming the file.
- :func:`self_signed` creates, once, an ECDSA P-256 key (mode 0600) and a
  certificate valid for ten years under ``folder`` (mode 0700), for
  ``localhost``, the loopback addresses, this host's name and fully
  qualified name, and the address the server listens on where that is one
  address. It returns their paths, the names and the certificate's SHA-256
  fingerprint, which clients compare with the certificate they are given.
  An expired certificate is replaced, with a warning, by a new one.
- :func:`fingerprint` is a certificate's SHA-256 fingerprint as
  ``openssl x509 -fingerprint -sha256`` prints it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
import stat
from pathlib import Path

__all__ = ["SelfSigned", "fingerprint", "make_certificate", "self_signed", "self_signed_names", "server_ssl_context"]

log = logging.getLogger("remote_gpu_server")

#: How long a self-signed certificate is valid.
VALIDITY = dt.timedelta(days=3650)
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"


@dataclasses.dataclass(frozen=True)
class SelfSigned:
    """A self-signed certificate and its key on disk."""

    certfile: Path
    keyfile: Path
    names: tuple[str, ...]
    fingerprint: str
    created: bool


def server_ssl_context(certfile: Path, keyfile: Path | None = None) -> ssl.SSLContext:
    """A server context for ``certfile`` and ``keyfile`` (None: the key is in ``certfile``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    which = f"--certfile {certfile}" + (f" / --keyfile {keyfile}" if keyfile else "")
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:  # before OSError, its base
        raise ValueError(f"cannot use the TLS certificate and key ({which}): {exc.reason or exc} "
                         "(is the key the certificate's, and are both PEM?)") from None
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key ({which}): "
                         f"{exc.strerror or exc}: {exc.filename or certfile}") from None
    return context


def fingerprint(cert_pem: bytes) -> str:
    """``AB:CD:...``: the SHA-256 of the certificate's DER form."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def self_signed_names(host: str) -> tuple[str, ...]:
    """The names a self-signed certificate lists for a server listening on ``host``."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    if host and host not in ("0.0.0.0", "::", ""):
        names.append(host)
    unique: list[str] = []
    for name in names:
        name = name.strip().lower().rstrip(".")
        if name and name not in unique:
            unique.append(name)
    return tuple(unique)


def self_signed(folder: Path, host: str = "127.0.0.1", now: dt.datetime | None = None) -> SelfSigned:
    """The certificate and key under ``folder``, created on the first call (see the module).

    ``now`` (aware, default the current time) decides whether the one there expired.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    certfile, keyfile = folder / CERT_NAME, folder / KEY_NAME
    if certfile.is_file() and keyfile.is_file():
        found = _reuse(certfile, keyfile, now)
        if found is not None:
            return found
    names = self_signed_names(host)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    common_name = f"remote-gpu-server {socket.gethostname() or 'localhost'}"[:64]
    key_pem, cert_pem = make_certificate(common_name, names=names, now=now)
    # The key first and each file whole (a rename), so a crash never leaves a
    # certificate whose key is missing or half written.
    _write(keyfile, key_pem, 0o600)
    _write(certfile, cert_pem, 0o644)
    return SelfSigned(certfile, keyfile, names, fingerprint(cert_pem), created=True)


def _reuse(certfile: Path, keyfile: Path, now: dt.datetime) -> SelfSigned | None:
    """The existing pair, or None where the certificate has expired (a new one is made)."""
    from cryptography import x509

    cert_pem = certfile.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"{certfile} is not a PEM certificate: move it away and start again "
                         "to make a new self-signed certificate") from None
    if cert.not_valid_after_utc <= now:
        log.warning("the self-signed certificate %s expired on %s: making a new one; clients must "
                    "trust the new certificate", certfile, cert.not_valid_after_utc.date())
        return None
    mode = stat.S_IMODE(keyfile.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): set to 0600", keyfile, mode)
        os.chmod(keyfile, 0o600)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(v) for v in san.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    return SelfSigned(certfile, keyfile, names, fingerprint(cert_pem), created=False)


def make_certificate(common_name: str, *, names: tuple[str, ...] = (), client: bool = False,
                     now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A new EC key and a self-signed certificate (both PEM) for ``common_name``:
    a server's for ``names`` (host names or addresses), or a ``client``'s."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # a client whose clock is a little behind
        .not_valid_after(now + VALIDITY)
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        builder
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole with ``mode`` from its first byte (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
