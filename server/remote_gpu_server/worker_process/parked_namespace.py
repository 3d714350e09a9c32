"""A worker's namespace saved to a folder, and loaded back into a fresh worker.

This runs inside the worker (see :mod:`.kernel`): :func:`save` when
its session is parked, :func:`load` when the session resumes in another
worker. Only the worker reads what it wrote: the server never unpickles
these files, it only measures and deletes them.

The folder holds three files::

    blobs.bin      the bytes of every numpy array and torch tensor storage, each
                   at a 4 KiB-aligned offset, written straight from the array's
                   memory (a tensor on a GPU is copied to the host first, one
                   storage at a time) and read back straight into fresh memory
    records.bin    one cloudpickle per name, one after another; arrays and
                   tensors appear in them as references to blobs
    manifest.json  written last, through a rename: the names and where their
                   records are, the blobs, the names that could not be saved
                   and why, and the size

Sharing survives: a tensor stores its storage, dtype, offset, size, stride
and device, so views of one storage, a parameter that a model and its
optimizer both hold, and one array under two names come back shared.
Other mutable objects (lists, dicts, instances) that two names share are
shared again too: each name is pickled on its own, and an object already
pickled under an earlier name is stored as a reference to it. So a name
that cannot be pickled (an open file, a generator, a socket) is left out
alone, and a name that cannot be loaded loses only itself and the names
that refer into it.

A tensor goes back to the device it was on (``cuda:0`` is the first GPU of
the new lease, as it was of the old); where that device is missing it stays
on the host, and :func:`load` says so.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pickle
import shutil
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cloudpickle

from remote_gpu_core.errors import ParkError

__all__ = ["FORMAT", "ParkQuotaExceeded", "Restored", "Saved", "load", "read_manifest", "savable_names", "save"]

#: The version of the folder's layout; :func:`load` refuses others.
FORMAT = 1
_MANIFEST, _BLOBS, _RECORDS = "manifest.json", "blobs.bin", "records.bin"
#: Blobs start at multiples of this (page-aligned reads and writes).
_ALIGN = 4096
#: The longest reason kept for a name that was not saved or restored.
_REASON_MAX = 160

#: Objects never worth a cross-name reference: immutable values and things
#: pickled by name (a reference to them would only tie two names together).
_BY_VALUE_ONLY: tuple[type, ...] = (
    str, bytes, int, float, complex, bool, type(None), tuple, frozenset, range, slice, type,
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, enum.Enum,
)
#: IPython's own names in a namespace (output cache, input history).
_IPYTHON_NAMES = frozenset({"_", "__", "___", "_i", "_ii", "_iii", "_ih", "_oh", "_dh", "In", "Out",
                            "get_ipython", "exit", "quit", "open"})


class ParkQuotaExceeded(ParkError):
    """Saving would write more than the limit given to :func:`save`; code
    ``park_refused`` (see :mod:`remote_gpu_server.errors`). The server knows
    it by this name in the worker's answer."""


@dataclasses.dataclass(frozen=True)
class Saved:
    """What :func:`save` wrote: ``names`` saved, ``unsaved`` name → why not."""

    names: tuple[str, ...]
    unsaved: Mapping[str, str]
    nbytes: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`load` read: ``values`` to put in the namespace; ``failed``
    name → why it could not be loaded; ``notes`` on tensors that could not
    go back to their device; ``unsaved`` as :attr:`Saved.unsaved` said."""

    values: dict[str, Any]
    failed: Mapping[str, str]
    unsaved: Mapping[str, str]
    notes: tuple[str, ...]
    nbytes: int
    seconds: float


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def savable_names(user_ns: Mapping[str, Any], hidden: Mapping[str, Any]) -> list[str]:
    """The user's names in an IPython namespace, as ``%who`` lists them plus
    names with one leading underscore; IPython's own and dunder names left out."""
    missing = object()
    names = []
    for name, value in user_ns.items():
        if name in _IPYTHON_NAMES or name.startswith("__") or (
                name.startswith("_") and (name[1:].isdigit() or name[1:2] == "i" and name[2:].isdigit())):
            continue
        if hidden.get(name, missing) is value:
            continue
        names.append(name)
    return names


# -- saving --------------------------------------------------------------------


class _Blobs:
    """Appends buffers to ``blobs.bin`` at aligned offsets, within a byte limit."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self.file = open(path, "wb", buffering=0)  # raw: writes go straight from the caller's memory
        self.table: list[tuple[int, int]] = []
        self.end = 0
        self.limit = limit
        self.records = 0  # bytes of records, counted against the limit too

    @property
    def total(self) -> int:
        return self.end + self.records

    def check(self, more: int) -> None:
        if self.limit is not None and self.total + more > self.limit:
            raise ParkQuotaExceeded(f"more than {self.limit} bytes")

    def add(self, data: memoryview) -> int:
        """Write ``data`` (a flat byte view); return its blob index."""
        nbytes = data.nbytes
        self.check(nbytes)
        offset = -(-self.end // _ALIGN) * _ALIGN
        self.file.seek(offset)
        done = 0
        while done < nbytes:
            done += self.file.write(data[done:])
        self.table.append((offset, nbytes))
        self.end = offset + nbytes
        return len(self.table) - 1

    def close(self) -> None:
        self.file.close()


def _flat_bytes(array: Any) -> memoryview:
    """A byte view of a C-contiguous numpy array, without a copy."""
    return memoryview(array.reshape(-1).view("uint8")) if array.size else memoryview(b"")


class _Saver:
    """Turns arrays and tensors into blobs, and objects of earlier names into references."""

    def __init__(self, blobs: _Blobs, namespace: Mapping[str, Any] | None) -> None:
        self.blobs = blobs
        #: The worker's namespace, and what stands for it in the pickles: a
        #: function defined in a cell gets the restored namespace as its
        #: globals again, not a copy of what it used.
        self.namespace = namespace
        self.globals_marker: dict[str, Any] = {}
        self.numpy = sys.modules.get("numpy")
        self.torch = sys.modules.get("torch")
        # id -> (the object, kept alive so its id is not reused, and its persistent id)
        self.arrays: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self.tensors: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self.storages: dict[tuple[str, int], tuple[Any, int]] = {}
        # id -> (the object, record number, memo index): objects of earlier names
        self.earlier: dict[int, tuple[Any, int, int]] = {}

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        kind = type(obj)
        if kind in _BY_VALUE_ONLY:
            return None
        if obj is self.globals_marker:
            return ("globals",)
        numpy, torch = self.numpy, self.torch
        if numpy is not None and kind is numpy.ndarray and not obj.dtype.hasobject:
            return self._array(obj)
        if torch is not None and kind in (torch.Tensor, torch.nn.Parameter):
            return self._tensor(obj)
        found = self.earlier.get(id(obj))
        if found is not None:
            return ("ref", found[1], found[2])
        return None

    def _array(self, array: Any) -> tuple[Any, ...]:
        known = self.arrays.get(id(array))
        if known is not None:
            return known[1]
        contiguous = self.numpy.ascontiguousarray(array)  # type: ignore[union-attr]
        blob = self.blobs.add(_flat_bytes(contiguous))
        pid = ("array", len(self.arrays), blob, array.dtype, array.shape)
        self.arrays[id(array)] = (array, pid)
        return pid

    def _tensor(self, tensor: Any) -> tuple[Any, ...] | None:
        torch = self.torch
        assert torch is not None
        if tensor.is_sparse or tensor.is_quantized or tensor.layout != torch.strided or tensor.is_meta:
            return None  # torch's own pickling
        known = self.tensors.get(id(tensor))
        if known is not None:
            return known[1]
        storage = tensor.untyped_storage()
        device = str(tensor.device)
        key = (device, storage.data_ptr())
        held = self.storages.get(key)
        if held is None:
            host = storage if storage.device.type == "cpu" else storage.cpu()
            flat = torch.empty(0, dtype=torch.uint8).set_(host, 0, (host.nbytes(),), (1,))
            blob = self.blobs.add(_flat_bytes(flat.numpy()))
            held = self.storages[key] = (storage, blob)
            del flat, host  # a GPU storage's host copy goes now, not at the end
        parameter = isinstance(tensor, torch.nn.Parameter)
        pid = ("tensor", len(self.tensors), held[1], device, str(tensor.dtype).removeprefix("torch."),
               tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
               bool(tensor.requires_grad), parameter)
        self.tensors[id(tensor)] = (tensor, pid)
        return pid

    def remember(self, record: int, memo: Mapping[int, tuple[int, Any]]) -> None:
        """Objects a finished record pickled become referable from later ones."""
        for ident, (index, obj) in memo.items():
            if not isinstance(obj, _BY_VALUE_ONLY) and ident not in self.earlier:
                self.earlier[ident] = (obj, record, index)


class _Pickler(cloudpickle.CloudPickler):
    def __init__(self, file: Any, saver: _Saver) -> None:
        super().__init__(file, protocol=5)
        self._saver = saver
        if saver.namespace is not None:  # see cloudpickle's Pickler._function_getnewargs
            self.globals_ref[id(saver.namespace)] = saver.globals_marker

    def persistent_id(self, obj: Any) -> Any:
        return self._saver.persistent_id(obj)

    def reducer_override(self, obj: Any) -> Any:
        # cloudpickle saves a text file open for reading as a StringIO of its
        # contents: a parked session would come back with a different object.
        if isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
            state = "a closed" if obj.closed else "an open"  # a `with open(...) as f` leaves f closed
            raise TypeError(f"cannot save {state} file ({getattr(obj, 'name', type(obj).__name__)!r})")
        return super().reducer_override(obj)


def save(values: Mapping[str, Any], folder: str | os.PathLike[str], limit: int | None = None, *,
         namespace: Mapping[str, Any] | None = None, execution_count: int = 0) -> Saved:
    """Save ``values`` into ``folder`` (made afresh, replacing what was there).

    ``namespace`` is the dict that functions defined in cells have as their
    globals (IPython's ``user_ns``); :func:`load` gives them the new one.

    Names whose value cannot be pickled are left out, with the reason, in
    :attr:`Saved.unsaved`. Raises :class:`ParkQuotaExceeded` when more than
    ``limit`` bytes would be written, and OSError when the disk refuses;
    either way nothing is left in ``folder``.
    """
    started = time.perf_counter()
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)
    try:
        blobs = _Blobs(folder / _BLOBS, limit)
        saver = _Saver(blobs, namespace)
        entries: list[dict[str, Any]] = []
        unsaved: dict[str, str] = {}
        try:
            with open(folder / _RECORDS, "wb") as records:
                for name, value in values.items():
                    out = io.BytesIO()
                    pickler = _Pickler(out, saver)
                    try:
                        pickler.dump(value)
                    except (ParkQuotaExceeded, OSError):
                        raise
                    except Exception as exc:  # pickling runs arbitrary __reduce__ code
                        unsaved[name] = _reason(exc)
                        continue
                    data = out.getbuffer()
                    blobs.check(data.nbytes)
                    entries.append({"name": name, "offset": blobs.records, "length": data.nbytes})
                    records.write(data)
                    blobs.records += data.nbytes
                    saver.remember(len(entries) - 1, pickler.memo.copy())
        finally:
            blobs.close()
        nbytes = blobs.total
        manifest = {"format": FORMAT, "names": entries, "blobs": blobs.table, "unsaved": unsaved,
                    "nbytes": nbytes, "execution_count": execution_count, "saved": time.time()}
        partial = folder / (_MANIFEST + ".partial")
        partial.write_text(json.dumps(manifest))
        os.replace(partial, folder / _MANIFEST)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Saved(tuple(e["name"] for e in entries), unsaved, nbytes, time.perf_counter() - started)


# -- loading -------------------------------------------------------------------


class _Missing(Exception):
    """A record refers into a name that could not be loaded."""


class _Loader:
    def __init__(self, folder: Path, manifest: dict[str, Any], namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.blobs = open(folder / _BLOBS, "rb", buffering=0)
        self.table = [(int(o), int(n)) for o, n in manifest["blobs"]]
        self.names = [str(e["name"]) for e in manifest["names"]]
        self.memos: dict[int, dict[int, Any]] = {}
        self.failed: set[int] = set()
        self.objects: dict[tuple[str, int], Any] = {}
        self.storages: dict[tuple[int, str], Any] = {}
        self.off_device: dict[str, int] = {}

    def _read_into(self, blob: int, view: memoryview) -> None:
        offset, nbytes = self.table[blob]
        if view.nbytes != nbytes:
            raise ValueError(f"blob {blob} holds {nbytes} bytes, not {view.nbytes}")
        self.blobs.seek(offset)
        done = 0
        while done < nbytes:
            got = self.blobs.readinto(view[done:])
            if not got:
                raise EOFError("the parked files end early: they were cut short")
            done += got

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "globals":
            return self.namespace
        if kind == "ref":
            record, index = int(pid[1]), int(pid[2])
            if record in self.failed:
                raise _Missing(f"it refers into {self.names[record]}, which could not be restored")
            return self.memos[record][index]
        cached = self.objects.get((kind, int(pid[1])))
        if cached is not None:
            return cached
        if kind == "array":
            value = self._array(*pid[2:])
        elif kind == "tensor":
            value = self._tensor(*pid[2:])
        else:
            raise pickle.UnpicklingError(f"unknown reference {kind!r} in the parked files")
        self.objects[(kind, int(pid[1]))] = value
        return value

    def _array(self, blob: int, dtype: Any, shape: tuple[int, ...]) -> Any:
        import numpy

        array = numpy.empty(shape, dtype=dtype)
        self._read_into(blob, _flat_bytes(array))
        return array

    def _device(self, torch: Any, device: str) -> str:
        """``device`` where it exists here, else ``cpu`` (counted for the notes)."""
        if device == "cpu":
            return device
        try:
            place = torch.device(device)
            if place.type == "cuda":
                usable = torch.cuda.is_available() and (place.index or 0) < torch.cuda.device_count()
            else:
                usable = bool(getattr(torch, place.type).is_available())
        except Exception:
            usable = False
        if usable:
            return device
        self.off_device[device] = self.off_device.get(device, 0) + 1
        return "cpu"

    def _storage(self, torch: Any, blob: int, device: str) -> Any:
        storage = self.storages.get((blob, device))
        if storage is None:
            nbytes = self.table[blob][1]
            pin = device != "cpu" and torch.cuda.is_available()
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            self._read_into(blob, _flat_bytes(host.numpy()))
            storage = (host if device == "cpu" else host.to(device)).untyped_storage()
            self.storages[(blob, device)] = storage
        return storage

    def _tensor(self, blob: int, device: str, dtype: str, offset: int, shape: tuple[int, ...],
                stride: tuple[int, ...], requires_grad: bool, parameter: bool) -> Any:
        import torch

        device = self._device(torch, device)
        storage = self._storage(torch, blob, device)
        tensor = torch.empty(0, dtype=getattr(torch, dtype), device=device).set_(storage, offset, shape, stride)
        if parameter:
            return torch.nn.Parameter(tensor, requires_grad=requires_grad)
        return tensor.requires_grad_(requires_grad) if requires_grad else tensor

    def close(self) -> None:
        self.blobs.close()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, loader: _Loader) -> None:
        super().__init__(file)
        self._loader = loader

    def persistent_load(self, pid: Any) -> Any:
        return self._loader.persistent_load(pid)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved folder; raises FileNotFoundError or ValueError."""
    manifest: dict[str, Any] = json.loads((Path(folder) / _MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"the parked files are of format {manifest.get('format')}, not {FORMAT}")
    return manifest


def load(folder: str | os.PathLike[str], namespace: dict[str, Any] | None = None) -> Restored:
    """Load what :func:`save` wrote to ``folder``; see :class:`Restored`.

    Functions defined in cells get ``namespace`` as their globals (give the
    worker's ``user_ns``; loading them writes the globals they use into it,
    and the caller then puts :attr:`Restored.values` in it).

    Raises FileNotFoundError or ValueError when the folder holds no saved
    namespace this code can read. A name that fails to load is reported in
    :attr:`Restored.failed`; the others load.
    """
    started = time.perf_counter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    if namespace is None:
        namespace = {}
    builtins = namespace.get("__builtins__")
    loader = _Loader(folder, manifest, namespace)
    values: dict[str, Any] = {}
    failed: dict[str, str] = {}
    try:
        records = (folder / _RECORDS).read_bytes()
        for index, entry in enumerate(manifest["names"]):
            name, start = str(entry["name"]), int(entry["offset"])
            unpickler = _Unpickler(io.BytesIO(records[start : start + int(entry["length"])]), loader)
            try:
                values[name] = unpickler.load()
            except Exception as exc:  # unpickling runs arbitrary code too
                loader.failed.add(index)
                failed[name] = _reason(exc)
                continue
            loader.memos[index] = unpickler.memo.copy()
    finally:
        loader.close()
        if builtins is not None:  # cloudpickle sets a function's __builtins__ to its own
            namespace["__builtins__"] = builtins
    notes = tuple(f"{count} tensor(s) stayed on the CPU: {device} is not available here"
                  for device, count in loader.off_device.items())
    return Restored(values, failed, dict(manifest.get("unsaved") or {}), notes, int(manifest["nbytes"]),
                    time.perf_counter() - started)
