"""Serialization without sockets: out-of-band buffers, torch, errors."""

from __future__ import annotations

import dataclasses
from types import ModuleType

import numpy as np
import pytest

from remote_gpu_core.errors import ProtocolError, SerializationError
from remote_gpu_core.protocol import dump_values, dumps, load_values, loads


def test_numpy_array_travels_out_of_band_without_a_copy() -> None:
    a = np.arange(1 << 20, dtype=np.float32)
    parts = dumps(a)
    assert len(parts) == 2
    assert len(parts[0]) < 1000  # the pickle holds no data
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.float32), a)
    assert np.array_equal(loads(parts), a)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64", "bool", "complex64"])
def test_torch_tensors_go_out_of_band_and_keep_dtype_shape_and_grad(dtype: str, torch: ModuleType) -> None:
    t = torch.ones((3, 5), dtype=getattr(torch, dtype))
    parts = dumps(t)
    assert len(parts) == 2 and len(parts[0]) < 1000
    back = loads([parts[0], bytearray(parts[1])])
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_non_contiguous_tensor_parameter_and_requires_grad(torch: ModuleType) -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(loads(dumps(t)), t)
    p = torch.nn.Parameter(torch.randn(4))
    back = loads(dumps(p))
    assert isinstance(back, torch.nn.Parameter) and back.requires_grad and torch.equal(back, p)
    g = torch.randn(3, requires_grad=True)
    assert loads(dumps(g)).requires_grad


def test_functions_closures_and_local_classes_pickle_by_value() -> None:
    k = 3

    @dataclasses.dataclass
    class Point:
        x: int

        def scaled(self) -> int:
            return self.x * k

    values = {"f": lambda v: v + k, "p": Point(2)}
    names, counts, buffers = dump_values(values)
    back = load_values(names, counts, buffers)
    assert back["f"](1) == 4
    assert back["p"].scaled() == 6


def test_unpicklable_value_names_the_variable_and_returns_nothing() -> None:
    gen = (i for i in range(3))
    with pytest.raises(SerializationError, match="'gen'") as info:
        dump_values({"fine": 1, "gen": gen})
    assert info.value.name == "gen"
    assert isinstance(info.value, TypeError)


def test_counts_that_do_not_add_up_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        load_values(["a"], [2], [b"x"])
    with pytest.raises(ProtocolError):
        loads([])
