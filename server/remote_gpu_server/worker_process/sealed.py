"""The data channel to a worker on another host: a TCP stream of sealed
records, and the worker's end of it (the notes' format, and the stream to
a worker on the server's host, are in :mod:`.streams`).

Mutual TLS 1.3 opens it: each side has a key and certificate made for this
worker (the worker's on its node, the server's on the server: no private
key crosses the network) and pins the other's, so only this server reaches
this worker's data. Inside TLS the two ends agree on fresh keys, and the
stream then carries AES-256-GCM records (:class:`SealedStream`), so nobody
reads or changes the data on the way. One way on loopback here, Python's
TLS records carried about 1 GB/s and the sealed records 2–3 GB/s
(CurveZMQ: 0.15–0.23 GB/s); ``bench/bench_datachannel.py`` measures them.
The pieces travel inside the notes here, a piece at most
:data:`~.streams.MAX_FRAME` bytes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .streams import BlockingStream

__all__ = ["ACCEPT_TIMEOUT", "BlockingTls", "SealedStream", "open_stream", "pinned_context"]

_LENGTH = struct.Struct(">I")
#: Writes the server's end hands its writing thread before it waits for the oldest.
WRITES_AHEAD = 4
#: Seconds the server's end waits for a worker to finish the handshake.
HANDSHAKE_TIMEOUT = 30
#: Seconds a worker gives a connection to prove it is the server.
ACCEPT_TIMEOUT = 10
#: Handshakes a worker runs at once; a connection beyond them is closed at once.
MAX_HANDSHAKES = 32
#: Seconds the worker's end of a stream waits for the server in the middle
#: of a read or write before it gives the stream up.
STALL_TIMEOUT = 60
#: Plaintext bytes in one sealed record: a whole piece (:data:`.transfer.SLOT_SIZE`).
_RECORD = 1 << 20
_TAG = 16
_KEY = 32
_SEED = 32
_INFO = b"remote-gpu data channel 1"
#: Bytes sealed under one key before both ends move to the next (derived
#: from it, counters back to 0): well inside AES-GCM's safe use of a key.
_REKEY = 1 << 36


@contextlib.contextmanager
def _files(key_pem: bytes, cert_pem: bytes) -> Iterator[tuple[str, str]]:
    """The key and certificate as files of mode 0600 (ssl loads them only from
    files), removed at once."""
    folder = tempfile.mkdtemp(prefix="rgpu-tls-")
    try:
        paths = []
        for name, data in (("key.pem", key_pem), ("cert.pem", cert_pem)):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        yield paths[0], paths[1]
    finally:
        for name in ("key.pem", "cert.pem"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def pinned_context(server_side: bool, key_pem: bytes, cert_pem: bytes, peer_cert_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3 context that presents ``cert_pem`` and trusts exactly ``peer_cert_pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the peer is pinned by its certificate, not a name
    context.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        # No session tickets: nobody resumes a session here, and nothing but
        # the close_notify may follow the seeds (see open_stream).
        context.num_tickets = 0
    with _files(key_pem, cert_pem) as (keyfile, certfile):
        context.load_cert_chain(certfile, keyfile)
    context.load_verify_locations(cadata=peer_cert_pem.decode())
    return context


def open_stream(sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                timeout: float = HANDSHAKE_TIMEOUT, stall_timeout: float | None = None) -> SealedStream:
    """Authenticate both ends of ``sock`` and agree on the keys of a :class:`SealedStream`.

    TLS 1.3 with the pinned certificates proves who is at each end. Inside
    it each end sends 32 fresh random bytes; both derive the stream's two
    keys from them (HKDF-SHA256) and close TLS, and the socket goes on
    carrying sealed records. Raises ``ssl.SSLError`` for a peer that is not
    the pinned one and ``OSError`` (a timeout) for one that stalls; either
    way ``sock`` is closed. ``stall_timeout``: seconds a read or write of
    the stream may wait for the peer before it fails (None: as long as it
    takes).
    """
    try:
        sock.settimeout(timeout)
        tls = context.wrap_socket(sock, server_side=server_side)
    except BaseException:
        sock.close()
        raise
    try:
        mine = os.urandom(_SEED)
        tls.sendall(mine)
        theirs = bytearray()
        while len(theirs) < _SEED:
            got = tls.recv(_SEED - len(theirs))
            if not got:
                raise ConnectionError("the data channel's peer left during the handshake")
            theirs += got
        raw = tls.unwrap()  # both ends have read the other's close_notify: what follows is sealed
    except BaseException:
        tls.close()
        raise
    raw.settimeout(stall_timeout)
    seeds = bytes(theirs) + mine if server_side else mine + bytes(theirs)  # the client's first
    keys = _derive(seeds, 2 * _KEY, _INFO)
    upstream, downstream = keys[:_KEY], keys[_KEY:]  # client to server, server to client
    return SealedStream(raw, *((downstream, upstream) if server_side else (upstream, downstream)))


def _derive(material: bytes, length: int, info: bytes) -> bytes:
    """``length`` bytes of key from secret ``material`` (HKDF-SHA256)."""
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(material)


class SealedStream:
    """A byte stream of AES-256-GCM records on a socket, keyed by :func:`open_stream`.

    A record is its length (4 bytes, big-endian, at most :data:`_RECORD`),
    then the ciphertext and its 16-byte tag. The length is the record's
    associated data and its number in the stream (a counter per direction)
    its nonce, so a record that is changed, repeated or moved, or missing
    before one that arrives, fails to open and ends the stream (its bytes
    are not kept). A stream cut short after a record ends as a closed one
    does: the notes above it say when a transfer is whole. Keys are fresh
    for each connection and each direction moves to a key derived from its
    last after :data:`_REKEY` bytes, so no nonce is used twice under one key.

    Why not TLS records all the way: Python's ``ssl`` copies each byte
    four or five times between the socket, OpenSSL's buffers and the
    caller, and makes a system call per 16 KiB record. Here a record of a
    piece is sealed straight into the buffer that is written and opened
    straight into the memory the piece goes to: measured by
    ``bench/bench_datachannel.py``.

    One thread may read while another writes.
    """

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes) -> None:
        self._sock = sock
        self._send = _Direction(send_key)
        self._recv = _Direction(recv_key)
        self._out = bytearray(_LENGTH.size + _RECORD + _TAG)
        self._in = bytearray(_RECORD + _TAG)
        self._length = bytearray(_LENGTH.size)
        # What is left of the last record opened when it was longer than the read.
        self._plain = bytearray(_RECORD)
        self._start = self._end = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def buffered(self) -> bool:
        """Whether bytes of a record already read wait for a read."""
        return self._start < self._end

    def send_parts(self, parts: Iterable[Any]) -> None:
        """Write ``parts`` in order, each in records of at most :data:`_RECORD` bytes."""
        out = memoryview(self._out)
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, _RECORD):
                chunk = view[start:start + _RECORD]
                size = chunk.nbytes
                _LENGTH.pack_into(out, 0, size)
                end = _LENGTH.size + size + _TAG
                nonce = self._send.nonce(size)  # first: it may move to the next key
                self._send.aead.encrypt_into(nonce, chunk, out[:_LENGTH.size], out[_LENGTH.size:end])
                self._sock.sendall(out[:end])

    def recv_into(self, view: memoryview) -> int:
        """Read into ``view``: how many bytes (at most one record's), 0 at the stream's end."""
        if not len(view):
            return 0
        while self._start == self._end:
            size = self._next_length()
            if size is None:
                return 0
            sealed = memoryview(self._in)[:size + _TAG]
            self._fill(sealed)
            whole = len(view) >= size
            target = view[:size] if whole else memoryview(self._plain)[:size]
            nonce = self._recv.nonce(size)  # first: it may move to the next key
            try:
                self._recv.aead.decrypt_into(nonce, sealed, self._length, target)
            except InvalidTag:
                target[:] = bytes(size)  # what was opened is not the peer's: leave none of it
                raise ConnectionError("a record of the data channel failed authentication: "
                                      "it was changed, repeated or reordered on the way") from None
            if whole and size:
                return size
            self._start, self._end = 0, 0 if whole else size  # an empty record: read the next
        take = min(len(view), self._end - self._start)
        view[:take] = self._plain[self._start:self._start + take]
        self._start += take
        return take

    def _next_length(self) -> int | None:
        """The next record's length; None at a clean end (between records)."""
        length = memoryview(self._length)
        got = self._sock.recv_into(length)
        if not got:
            return None
        if got < length.nbytes:
            self._fill(length[got:])
        (size,) = _LENGTH.unpack(self._length)
        if size > _RECORD:
            raise ConnectionError(f"a record of {size} bytes is larger than the data channel allows")
        return int(size)

    def _fill(self, view: memoryview) -> None:
        got = 0
        while got < view.nbytes:
            read = self._sock.recv_into(view[got:])
            if not read:
                raise ConnectionError("the data channel closed in the middle of a record")
            got += read

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting to read
        self._sock.close()


class _Direction:
    """One direction of a :class:`SealedStream`: its key and its next record's number."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.aead = AESGCM(key)
        self.records = 0
        self.bytes = 0

    def nonce(self, size: int) -> bytes:
        """The nonce of the next record, of ``size`` bytes; the key it goes
        under is :attr:`aead` until the next call."""
        if self.bytes + size > _REKEY:
            self.key = _derive(self.key, _KEY, _INFO + b" next key")
            self.aead = AESGCM(self.key)
            self.records = self.bytes = 0
        nonce = self.records.to_bytes(12, "big")
        self.records += 1
        self.bytes += size
        return nonce


class BlockingTls(BlockingStream):
    """The worker's end of a :class:`SealedStream` (see :class:`~.streams.BlockingStream`):
    listens on ``host:port`` and serves the server that connects with the
    pinned certificate.

    Each connection proves itself in a thread of its own (at most
    :data:`MAX_HANDSHAKES` at once, each for :data:`ACCEPT_TIMEOUT`), so
    strangers that connect and stall do not queue ahead of the server, and
    the kernel's thread only ever takes a stream that is the server's. A
    newer stream is the server's, made because the last one broke: it takes
    the last one's place.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        # A piece is read into scratch, not into fresh memory.
        super().__init__(None, scratch=True)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._context = context
        self._ready: queue.SimpleQueue[SealedStream] = queue.SimpleQueue()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        #: Readable once a stream of the server's is ready to take (see :meth:`watched`).
        self._woken, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threading.Thread(target=self._accept, daemon=True, name="rgpu-data-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # the listener is closed
            if not self._handshakes.acquire(blocking=False):
                raw.close()  # a flood of connections, not the server
                continue
            threading.Thread(target=self._handshake, args=(raw,), daemon=True, name="rgpu-data-handshake").start()

    def _handshake(self, raw: socket.socket) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = open_stream(raw, self._context, server_side=True, timeout=ACCEPT_TIMEOUT,
                               stall_timeout=STALL_TIMEOUT)
        except (OSError, ValueError):  # not the server: a wrong certificate, a port scan, a stall
            raw.close()
            return
        finally:
            self._handshakes.release()
        self._ready.put(conn)
        with contextlib.suppress(BlockingIOError):  # woken already
            os.write(self._wake, b"\0")

    def _connection(self, timeout_ms: int | None) -> SealedStream | None:
        while True:  # a newer stream is the server's, made because the last one broke
            try:
                newer = self._ready.get_nowait()
            except queue.Empty:
                break
            self._drop()
            self._conn = newer
        if self._conn is None:
            try:
                self._conn = self._ready.get(timeout=None if timeout_ms is None else timeout_ms / 1000)
            except queue.Empty:
                return None
        conn: SealedStream = self._conn
        return conn

    def watched(self) -> list[int]:
        """The descriptors that become readable when :meth:`pending` may say yes:
        a new stream's arrival, and the stream's own bytes."""
        return [self._woken] + super().watched()

    def pending(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.read(self._woken, 4096)
        return self.poll(0)
