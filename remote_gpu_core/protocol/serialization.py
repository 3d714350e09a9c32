"""Variables to bytes and back: cloudpickle protocol 5, buffers out of band.

A value becomes a list of buffers: the pickle first, then every buffer that
pickle protocol 5 let us take out of band (numpy arrays, torch tensors). The
large buffers are never copied into the pickle; they travel as raw frames.

Torch tensors pickle in-band by default (a full copy into the pickle); here
they are reduced to a flat ``uint8`` numpy view of their storage, which goes
out of band, plus dtype and shape. A CUDA tensor is copied to the CPU first,
so a pulled CUDA tensor arrives as a CPU tensor.

Only the side that asked for a value unpickles it: the worker what a client
pushed, the client what it pulled. The server never calls :func:`loads`.

While it pickles, the pickler notes the module of every class and function
the pickle names (``modules``), so that the versions of their packages can
travel with the values (see :mod:`remote_gpu_core.fingerprint`): the
pickler already sees each object once, so noting them costs no second
pass over the pickle. :func:`load_values` lets its caller say what a value
that failed to unpickle means (``explain``).
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import cloudpickle  # type: ignore[import-untyped, unused-ignore]

from ..errors import ProtocolError, SerializationError
from ..warm_memory import warm_memory

__all__ = ["Explain", "allocate_buffer", "dump_values", "dumps", "load_values", "loads"]

#: Buffers at least this large are received into memory kept warm across
#: transfers (:mod:`~remote_gpu_core.warm_memory`, in huge pages): faulting
#: in fresh pages costs more here than the copy itself.
_LARGE = 1 << 20

BufferLike = Union[bytes, bytearray, memoryview]


def allocate_buffer(nbytes: int) -> Any:
    """Writable memory for a received buffer of ``nbytes`` bytes."""
    if nbytes >= _LARGE:
        try:
            import numpy  # noqa: F401 (warm memory hands out numpy arrays)
        except ImportError:
            pass
        else:
            return warm_memory.take(nbytes)
    return bytearray(nbytes)


def _rebuild_tensor(data: Any, dtype: str, shape: tuple[int, ...], requires_grad: bool,
                    parameter: bool) -> Any:
    import torch

    tensor = torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _reduce_tensor(obj: Any) -> Any:
    import torch

    if obj.is_sparse or obj.is_quantized or obj.layout != torch.strided:
        return NotImplemented
    tensor = obj.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.resolve_conj().resolve_neg().contiguous()
    flat = tensor.reshape(-1).view(torch.uint8).numpy()
    dtype = str(tensor.dtype).removeprefix("torch.")
    parameter = isinstance(obj, torch.nn.Parameter)
    return _rebuild_tensor, (flat, dtype, tuple(tensor.shape), obj.requires_grad, parameter)


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc, unused-ignore]
    """cloudpickle's pickler, with tensors out of band, noting into
    ``modules`` (when given) the module of every class and function it
    pickles: the pickler sees each object once (not the memoized again,
    nor ints, strings and the builtin containers), so it sees every class
    and function a pickle names."""

    def __init__(self, *args: Any, modules: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._modules = modules

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and type(obj) in (torch.Tensor, torch.nn.Parameter):
            return _reduce_tensor(obj)
        if self._modules is not None:
            module = getattr(obj if isinstance(obj, (type, _ROUTINES)) else type(obj), "__module__", None)
            if isinstance(module, str):
                self._modules.add(module)
        return super().reducer_override(obj)


#: What a pickle names by module and name, beside classes.
_ROUTINES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


def dumps(value: Any, modules: set[str] | None = None) -> list[BufferLike]:
    """Pickle ``value``: ``[pickle, *out_of_band_buffers]``; the modules of the
    classes and functions it names are added to ``modules`` where given."""
    buffers: list[BufferLike] = []

    def take(buf: pickle.PickleBuffer) -> bool:
        buffers.append(buf.raw())
        return False  # keep it out of band

    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=take, modules=modules).dump(value)
    return [out.getbuffer(), *buffers]


def loads(buffers: Sequence[BufferLike]) -> Any:
    """Inverse of :func:`dumps`."""
    if not buffers:
        raise ProtocolError("a pickled value needs at least one buffer")
    return pickle.loads(buffers[0], buffers=buffers[1:])


def dump_values(values: Mapping[str, Any], modules: set[str] | None = None,
                ) -> tuple[list[str], list[int], list[BufferLike]]:
    """Pickle each value on its own: ``(names, counts, buffers)``.

    ``counts[i]`` is how many of ``buffers`` belong to ``names[i]``. A value
    that cannot be pickled raises :class:`SerializationError` naming it, and
    nothing is returned, so nothing is sent. ``modules``: as in :func:`dumps`.
    """
    names: list[str] = []
    counts: list[int] = []
    buffers: list[BufferLike] = []
    for name, value in values.items():
        try:
            parts = dumps(value, modules)
        except Exception as exc:  # pickling runs arbitrary __reduce__ code
            raise SerializationError(name, f"{type(exc).__name__}: {exc}") from exc
        names.append(name)
        counts.append(len(parts))
        buffers.extend(parts)
    return names, counts, buffers


def split_values(names: Sequence[str], counts: Sequence[int],
                 buffers: Sequence[BufferLike]) -> dict[str, Sequence[BufferLike]]:
    """Group ``buffers`` by variable, checking that the counts add up."""
    if len(names) != len(counts) or any(c < 1 for c in counts) or sum(counts) != len(buffers):
        raise ProtocolError("variable names, buffer counts and buffers do not match")
    grouped: dict[str, Sequence[BufferLike]] = {}
    start = 0
    for name, count in zip(names, counts):
        grouped[name] = buffers[start : start + count]
        start += count
    return grouped


#: ``explain(name, error)``: what to raise instead of ``error``, which
#: unpickling variable ``name`` raised, or None to let it through.
Explain = Callable[[str, Exception], "Exception | None"]


def load_values(names: Sequence[str], counts: Sequence[int], buffers: Sequence[BufferLike],
                explain: Explain | None = None) -> dict[str, Any]:
    """Inverse of :func:`dump_values`. A value that does not unpickle raises
    what unpickling raised, or what ``explain`` makes of it (with that as
    its cause)."""
    values: dict[str, Any] = {}
    for name, parts in split_values(names, counts, buffers).items():
        try:
            values[name] = loads(parts)
        except ProtocolError:
            raise
        except Exception as exc:  # unpickling runs arbitrary code
            better = explain(name, exc) if explain is not None else None
            if better is None:
                raise
            raise better from exc
    return values
