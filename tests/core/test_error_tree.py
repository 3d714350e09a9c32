"""The error tree of the shared core and the client: one root, one stable code per class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from remote_gpu_core import errors
from remote_gpu_core.errors import RemoteGpuError
from remote_gpu_core.protocol import messages as m

#: Every error class of the core and the client and its code. A code is part of
#: the interface (programs and logs match it): change one only on purpose.
CODES = {
    "RemoteGpuError": "remote_gpu_error",
    "ProtocolError": "protocol_error",
    "VersionMismatch": "version_mismatch",
    "MessageTooLarge": "message_too_large",
    "ConnectionLost": "connection_lost",
    "BulkStreamLost": "bulk_stream_lost",
    "AuthenticationError": "authentication_failed",
    "TlsError": "tls_error",
    "UntrustedCertificate": "untrusted_certificate",
    "InsecureConnection": "insecure_connection",
    "ServerError": "server_error",
    "LeaseError": "lease_refused",
    "SessionReleased": "released",
    "ParkError": "park_refused",
    "WorkerDied": "worker_died",
    "ApiError": "api_error",
    "SerializationError": "serialization",
    "VersionDifference": "version_difference",
    "FileTransferError": "file_error",
    "FetchRefused": "fetch_refused",
    "RemoteError": "remote_error",
    "RemoteTimeout": "timeout",
    "CellSyntaxError": "cell_syntax",
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the core or the client."""
    found: dict[str, type[BaseException]] = {}
    for top in ("remote_gpu_core", "remote_gpu_kernel"):
        package = importlib.import_module(top)
        names = [top] + [info.name for info in pkgutil.walk_packages(package.__path__, top + ".")]
        for name in names:
            module = importlib.import_module(name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == name:
                    found[f"{name}.{cls.__qualname__}"] = cls
    return found


CLASSES = _exception_classes()


def code_of(cls: type[BaseException]) -> object:
    """The code an error of ``cls`` has when nothing more precise is given."""
    return getattr(cls.__new__(cls), "code", None)


def test_every_exception_of_the_core_and_the_client_derives_from_the_root() -> None:
    outside = [name for name, cls in CLASSES.items() if not issubclass(cls, RemoteGpuError)]
    assert not outside, f"exceptions outside the tree of RemoteGpuError: {outside}"


def test_every_error_class_sets_its_own_code() -> None:
    inherited = [name for name, cls in CLASSES.items() if "code" not in vars(cls)]
    assert not inherited, f"error classes without a code of their own: {inherited}"
    assert all(isinstance(code_of(cls), str) and code_of(cls) for cls in CLASSES.values())


def test_the_codes_are_distinct() -> None:
    by_code: dict[object, list[str]] = {}
    for name, cls in CLASSES.items():
        by_code.setdefault(code_of(cls), []).append(name)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert not shared, f"codes used by more than one class: {shared}"


def test_the_codes_are_the_ones_published() -> None:
    assert {cls.__name__: code_of(cls) for cls in CLASSES.values()} == CODES


@pytest.mark.parametrize("name", sorted(CODES))
def test_the_module_docstring_draws_each_class_with_its_code(name: str) -> None:
    doc = errors.__doc__ or ""
    line = next((line for line in doc.splitlines() if f" {name} " in line or line.endswith(f" {name}")), "")
    assert line, f"{name} is not drawn in the tree of remote_gpu_core.errors"
    assert CODES[name] in line, f"the tree does not give {name}'s code on its line: {line!r}"


@pytest.mark.parametrize("cls", [errors.ServerError, errors.LeaseError, errors.SessionReleased,
                                 errors.ParkError, errors.WorkerDied])
def test_a_server_answer_keeps_its_wire_code(cls: type[errors.ServerError]) -> None:
    assert cls("refused").code == CODES[cls.__name__]
    assert cls("refused", code=m.ErrorCode.NO_LEASE.value).code == "no_lease"


def test_where_the_wire_names_the_same_failure_the_codes_agree() -> None:
    wire = {code.value for code in m.ErrorCode}
    for cls in (errors.ProtocolError, errors.VersionMismatch, errors.LeaseError,
                errors.SessionReleased, errors.ParkError, errors.WorkerDied,
                errors.SerializationError, errors.FileTransferError, errors.RemoteTimeout):
        assert code_of(cls) in wire, f"{cls.__name__}'s code {code_of(cls)!r} is not an ErrorCode"


def test_a_remote_exception_class_is_a_remote_error_with_its_code() -> None:
    error = errors.RemoteError.from_remote("ZeroDivisionError", "division by zero", [])
    assert type(error).__name__ == "ZeroDivisionError"
    assert isinstance(error, errors.RemoteError) and error.code == "remote_error"


def test_an_error_keeps_its_code_across_a_pickle() -> None:
    import pickle

    answered = pickle.loads(pickle.dumps(errors.SessionReleased("the lease ended", code="no_lease")))
    assert (type(answered), answered.code, str(answered)) == (errors.SessionReleased, "no_lease",
                                                              "the lease ended")
    assert pickle.loads(pickle.dumps(errors.RemoteGpuError("x"))).code == "remote_gpu_error"


def test_the_api_error_keeps_its_http_status_apart_from_its_code() -> None:
    error = errors.ApiError("no such job", 404)
    assert (error.status, error.code) == (404, "api_error")
    assert isinstance(error, errors.ServerError)
