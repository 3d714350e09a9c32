"""What the client keeps of a pull cut short, and how the rest is put after it (:class:`CutPull`).

The end-to-end resume (a link cut in the middle of a pull) is in ``test_transfer_resume.py``.
"""

from __future__ import annotations

import pytest

from remote_gpu_core.errors import ProtocolError
from remote_gpu_kernel.buffers import CutPull

D1, D2, D3 = "1" * 32, "2" * 32, "3" * 32


def cut() -> CutPull:
    # Buffers: 0 the pickle (no digest), 1 cached (not sent), 2 and 3 sent; 3 came compressed.
    fields = {"t": "pull_reply", "digests": ["", D1, D2, D3], "cached": [1], "compressed": [2]}
    return CutPull(fields, [(bytearray(b"p"), 1), (bytearray(b"0123" + bytes(6)), 4),
                            (bytearray(b"xyz" + bytes(5)), 3)])


def test_only_named_uncompressed_buffers_begun_and_not_finished_are_offered() -> None:
    assert cut().offer() == {D2: 4}


def test_the_rest_goes_after_what_came() -> None:
    kept = cut()
    joined = kept.joined(["", D1, D2, D3], [1], [0, 4, 0], [b"p", b"456789", b"squeezed"])
    assert [bytes(b) for b in joined] == [b"p", b"0123456789", b"squeezed"]


def test_an_answer_that_leaves_out_what_is_not_held_is_refused() -> None:
    with pytest.raises(ProtocolError, match="does not hold"):
        cut().joined(["", D1, D2, D3], [1], [0, 0, 3], [b"p", b"0123456789", b"z"])
    with pytest.raises(ProtocolError, match="does not hold"):
        cut().joined(["", D1, D2, D3], [1], [0, 5, 0], [b"p", b"56789", b"z"])
