"""The messages of a fetch from the notebook's folder, on the wire.

A fetch adds two messages (:class:`~m.Fetch`, :class:`~m.FetchRefused`) and
two fields that stay off the wire unless used (``Execute.fetch``,
``Upload.fetch``), so that a request that fetches nothing reads as before.
"""

from __future__ import annotations

import pytest

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import messages as m
from test_framing import roundtrip


def test_a_fetch_and_its_answers_roundtrip() -> None:
    msgs: list[m.Message] = [
        m.Execute(3, "open('data.csv')", fetch=True),
        m.Fetch(3, 1, "data.csv"),
        m.Upload(7, ["data.csv"], (b"x,y\n1,2\n",), fetch=1),
        m.FetchRefused(8, 2, m.FetchRefusal.REFUSED.value, "'../x' goes up with '..'"),
    ]
    back = roundtrip(msgs)
    assert back[:2] == msgs[:2] and back[3] == msgs[3]
    upload = back[2]
    assert isinstance(upload, m.Upload) and upload.fetch == 1 and bytes(upload.buffers[0]) == b"x,y\n1,2\n"


def test_requests_that_fetch_nothing_are_the_same_on_the_wire_as_before() -> None:
    assert "fetch" not in m.Execute(1, "1").fields()
    assert "fetch" not in m.Upload(1, ["a"], (b"",)).fields()
    assert m.Execute(1, "1", fetch=True).fields()["fetch"] is True
    assert m.Upload(1, ["a"], (b"",), fetch=4).fields()["fetch"] == 4


@pytest.mark.parametrize("fields", [
    {"t": "fetch", "req": 1, "fetch": "1", "path": "x"},
    {"t": "fetch", "req": 1, "path": "x"},
    {"t": "fetch_refused", "req": 1, "fetch": 1, "code": "missing"},
    {"t": "upload", "req": 1, "paths": ["x"], "fetch": True},
])
def test_a_malformed_fetch_message_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        m.message_from_fields(dict(fields))
