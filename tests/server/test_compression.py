"""Compression where the link is the bottleneck (issue 19): negotiated per
transfer by the client, skipped for what does not compress, off on
loopback, and a corrupt frame refused with a clear error.

The shared server of the suite; bytes are counted by a TCP proxy. The proxy
is on loopback, so tests that want compression say ``RGPU_COMPRESS=always``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import zstandard

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.compression import CODEC, compressible, decompress_into, push_refusal
from remote_gpu_kernel import Client
from remote_gpu_kernel.compressing import CompressionPolicy, is_loopback
from raw_client import RawClient
from servers import ServerProcess
from tcp_proxy import TcpProxy

MIB = 1 << 20
SIZE = 32 * MIB


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[TcpProxy]:
    link = TcpProxy.for_url(server.url)
    yield link
    link.close()


def _small_ints() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 16, SIZE // 4).astype(np.int32)


def test_small_integers_cross_compressed_both_ways(proxy: TcpProxy, alice: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RGPU_COMPRESS", "always")
    a = _small_ints()
    with Client(proxy.url, alice).session() as s:
        up = proxy.up
        s.push(a=a)
        assert proxy.up - up < SIZE // 2
        s.execute("import numpy as np\nb = np.zeros(a.size, dtype=np.int32)\nb[::7] = a[::7]",
                  on_output=lambda _: None).raise_for_error()
        down = proxy.down
        back = s.pull("b")["b"]
        assert proxy.down - down < SIZE // 10
        expected = np.zeros_like(a)
        expected[::7] = a[::7]
        assert np.array_equal(back, expected) and back.flags.writeable
        same = s.pull("a")["a"]  # pushed from here: named, not sent
        assert np.array_equal(same, a)
        counts = s.transfer_counts
        assert counts.wire_pushed < SIZE // 2 and counts.pushed >= SIZE


def test_what_does_not_compress_is_sent_as_it_is(proxy: TcpProxy, alice: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RGPU_COMPRESS", "always")
    r = np.random.default_rng(1).random(SIZE // 4, dtype=np.float32)
    with Client(proxy.url, alice).session() as s:
        s.push(r=r)
        assert s.transfer_counts.wire_pushed == s.transfer_counts.pushed >= SIZE  # sampled, then left
        s.execute("q = r[::-1].copy()", on_output=lambda _: None).raise_for_error()
        assert np.array_equal(s.pull("q")["q"], r[::-1])
        assert s.transfer_counts.wire_pulled >= SIZE


def test_never_on_loopback_by_default(proxy: TcpProxy, alice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RGPU_COMPRESS", raising=False)
    zeros = np.zeros(SIZE // 4, dtype=np.float32)
    with Client(proxy.url, alice).session() as s:
        assert s._session.compression.loopback and not s._session.compression.allowed
        up = proxy.up
        s.push(z=zeros)
        assert proxy.up - up > SIZE


def test_the_policy_compresses_only_where_the_link_is_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_loopback(("127.0.0.1", 1)) and is_loopback(("::1", 1, 0, 0)) and is_loopback("")
    assert not is_loopback(("192.0.2.7", 443))
    small_ints = _small_ints()[: 4 * MIB // 4]
    wan = CompressionPolicy("auto", loopback=False)
    assert wan.codecs() == [CODEC] and wan.compress([small_ints])[1] == [0]
    wan.observe(100 * MIB, 0.01)  # a link of 10 GB/s: faster than the codec
    assert wan.codecs() == [] and wan.compress([small_ints])[1] == []
    wan.observe(100 * MIB, 8.0)  # 100 Mbit/s
    assert wan.compress([small_ints])[1] == [0]
    assert CompressionPolicy("never", loopback=False).compress([small_ints])[1] == []
    assert CompressionPolicy("auto", loopback=True).codecs() == []
    monkeypatch.setenv("RGPU_COMPRESS", "sometimes")
    with pytest.raises(ValueError, match="RGPU_COMPRESS='sometimes': use one of auto, always, never"):
        CompressionPolicy.for_peer(("10.0.0.1", 1))
    assert compressible(np.zeros(MIB, dtype=np.uint8)).worth
    assert not compressible(np.random.default_rng(2).integers(0, 255, MIB, dtype=np.uint8)).worth


def test_a_corrupt_compressed_buffer_is_refused_with_a_clear_error(server: ServerProcess, alice: str) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(np.zeros(2 * MIB, dtype=np.uint8), protocol=5, buffer_callback=buffers.append)
    good = zstandard.ZstdCompressor().compress(b"\0" * (2 * MIB))
    corrupt = good[:8] + b"\xff" * 32 + good[40:]
    with RawClient(server.url, alice) as raw:
        raw.hello()
        raw.lease()
        raw.send(m.Push(2, ["z"], [2], (head, corrupt), [], [], CODEC, [1], [2 * MIB]))
        error = raw.answer(2, m.PushDone)
        assert isinstance(error, m.Error) and error.code == m.ErrorCode.SERIALIZATION
        assert "compressed buffer" in error.message and "nothing of it was used" in error.message
        raw.send(m.Push(3, ["z"], [2], (head, good[:-4]), [], [], CODEC, [1], [2 * MIB]))  # cut short
        error = raw.answer(3, m.PushDone)
        assert isinstance(error, m.Error) and "compressed buffer" in error.message
        raw.send(m.Push(4, ["z"], [2], (head, good), [], [], "lz77", [1], [2 * MIB]))
        refused = raw.answer(4, m.PushDone)
        assert isinstance(refused, m.Error) and "unknown codec 'lz77'" in refused.message
        raw.send(m.Push(5, ["z"], [2], (head, good), [], [], CODEC, [1], [2 * MIB]))  # and the session goes on
        assert isinstance(raw.answer(5, m.PushDone), m.PushDone)


def test_decompressing_checks_the_size_it_was_told() -> None:
    frame = zstandard.ZstdCompressor().compress(b"\1" * 1000)
    out = bytearray(1000)
    decompress_into(frame, out)
    assert out == b"\1" * 1000
    with pytest.raises(ProtocolError, match="does not hold the 999 bytes"):
        decompress_into(frame, bytearray(999))
    with pytest.raises(ProtocolError, match="does not hold the 1001 bytes"):
        decompress_into(frame, bytearray(1001))
    with pytest.raises(ProtocolError, match="corrupt"):
        decompress_into(b"not zstd at all", bytearray(10))
    assert push_refusal(m.Push(1, ["a"], [2], (b"p", b"c"), [], [], CODEC, [1], [5])) is not None  # under 1 MiB
    assert push_refusal(m.Push(1, ["a"], [2], (b"p", b"c"), [], [], CODEC, [2], [MIB])) is not None
    assert push_refusal(m.Push(1, ["a"], [2], (b"p", b"c"), [], [], CODEC, [1], [MIB])) is None
