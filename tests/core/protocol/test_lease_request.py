"""LeaseRequest's optional ``notebook`` field, without sockets."""

from __future__ import annotations

import pytest

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import Reader, encode
from remote_gpu_core.protocol import messages as m


def test_notebook_roundtrips_through_frames() -> None:
    msg = m.LeaseRequest(1, 2, priority="high", notebook="/home/alice/projects/train model é.ipynb")
    reader = Reader()
    for frame in encode(msg):
        reader.receive_data(bytes(frame))
    assert reader.events_received() == [msg]


def test_a_request_without_notebook_is_for_no_notebook() -> None:
    """A script, or a client older than the field, sends none."""
    assert m.LeaseRequest(3).notebook is None
    back = m.message_from_fields({"t": "lease_request", "req": 3, "gpus": 1})
    assert back == m.LeaseRequest(3) and isinstance(back, m.LeaseRequest) and back.notebook is None
    explicit_null = m.message_from_fields({"t": "lease_request", "req": 3, "notebook": None})
    assert explicit_null == m.LeaseRequest(3)


@pytest.mark.parametrize("value", [42, ["a.ipynb"], {"path": "a.ipynb"}, True])
def test_a_notebook_that_is_not_text_is_refused(value: object) -> None:
    with pytest.raises(ProtocolError, match="'notebook' has a bad value"):
        m.message_from_fields({"t": "lease_request", "req": 1, "notebook": value})
