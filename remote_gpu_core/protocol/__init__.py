"""The wire protocol shared by client, server and worker; it does no I/O.

- :mod:`.messages`: the message dataclasses and their validation;
- :mod:`.framing`: messages to websocket frames and back (:func:`encode`,
  :class:`Reader`);
- :mod:`.serialization`: variables to buffers and back (cloudpickle
  protocol 5 with out-of-band buffers).
"""

from __future__ import annotations

from .framing import CHUNK_SIZE, FRAMING_VERSION, MAX_HEADER, MAX_MESSAGE, Reader, encode
from .messages import *
from .messages import __all__ as _messages_all
from .serialization import dump_values, dumps, load_values, loads, split_values

__all__ = [
    "CHUNK_SIZE",
    "FRAMING_VERSION",
    "MAX_HEADER",
    "MAX_MESSAGE",
    "Reader",
    "dump_values",
    "dumps",
    "encode",
    "load_values",
    "loads",
    "split_values",
    *_messages_all,
]
