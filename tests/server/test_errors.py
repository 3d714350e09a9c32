"""The server's errors are one tree: a root, a stable code each, and the builtins code catches."""

from __future__ import annotations

import pickle
from http import HTTPStatus

import pytest

from remote_gpu_core.errors import FileTransferError, LeaseError, ParkError, RemoteGpuError, ServerError
from remote_gpu_server import errors
from remote_gpu_server.errors import (
    DatabaseUnavailable, HeaderError, HttpError, IsolationError, QuotaExceeded, SchemaTooNew, StoreError,
    TokenError, TransferAborted, UpError,
)
from remote_gpu_server.worker_process.fetch import FetchNotSent
from remote_gpu_server.worker_process.files import PathRefused
from remote_gpu_server.worker_process.parked_namespace import ParkQuotaExceeded

#: Each error, its code, the class of the tree it is under, and the builtin it still is.
TREE: list[tuple[type[RemoteGpuError], str, type[RemoteGpuError], type[Exception] | None]] = [
    (TokenError, "unauthorized", ServerError, PermissionError),
    (StoreError, "store", ServerError, None),
    (DatabaseUnavailable, "database_unavailable", ServerError, ConnectionError),
    (SchemaTooNew, "schema_too_new", ServerError, RuntimeError),
    (IsolationError, "isolation", ServerError, None),
    (UpError, "up_failed", ServerError, None),
    (HeaderError, "bad_request", ServerError, ValueError),
    (TransferAborted, "transfer_aborted", ServerError, ConnectionError),
    (QuotaExceeded, "lease_refused", LeaseError, ValueError),
    (ParkQuotaExceeded, "park_refused", ParkError, None),
    (PathRefused, "file_error", FileTransferError, PermissionError),
    (FetchNotSent, "file_error", FileTransferError, ConnectionError),
]


@pytest.mark.parametrize(("cls", "code", "parent", "builtin"), TREE, ids=[row[0].__name__ for row in TREE])
def test_each_error_has_its_place_its_code_and_its_builtin(
        cls: type[RemoteGpuError], code: str, parent: type[RemoteGpuError], builtin: type[Exception] | None) -> None:
    error = cls("what happened; what to do")
    assert isinstance(error, parent) and isinstance(error, RemoteGpuError)
    assert getattr(error, "code") == code
    assert str(error) == "what happened; what to do"
    if builtin is not None:
        assert isinstance(error, builtin)
        with pytest.raises(builtin):  # an `except` written for the builtin still catches it
            raise error


@pytest.mark.parametrize(("cls", "code", "parent", "builtin"), TREE, ids=[row[0].__name__ for row in TREE])
def test_an_error_crosses_a_process_whole(
        cls: type[RemoteGpuError], code: str, parent: type[RemoteGpuError], builtin: type[Exception] | None) -> None:
    # A Ray node's IsolationError reaches the head pickled; none may lose its message or code.
    copy = pickle.loads(pickle.dumps(cls("a node cannot isolate workers")))
    assert type(copy) is cls
    assert str(copy) == "a node cannot isolate workers"
    assert getattr(copy, "code") == code


def test_a_transfer_that_broke_off_keeps_whether_the_worker_stopped() -> None:
    aborted = TransferAborted("the worker stopped answering", worker_stopped=True)
    assert aborted.worker_stopped and pickle.loads(pickle.dumps(aborted)).worker_stopped
    assert not TransferAborted("the client went away").worker_stopped


def test_an_http_error_keeps_its_status() -> None:
    error = HttpError(HTTPStatus.NOT_FOUND, "no job 7 of yours on this server")
    assert isinstance(error, ServerError) and error.code == "http_error"
    assert error.status == HTTPStatus.NOT_FOUND and str(error) == "no job 7 of yours on this server"


def test_a_database_that_is_away_is_not_a_store_refusal() -> None:
    # The HTTP API answers a StoreError of a job lookup with 404 "no such job";
    # a database outage must reach its 503 instead.
    assert not issubclass(DatabaseUnavailable, StoreError)
    assert not issubclass(StoreError, OSError)  # the store's callers retry OSErrors later


def test_the_modules_that_raise_an_error_give_the_same_class() -> None:
    from remote_gpu_server import store, up
    from remote_gpu_server.frontdoor import headers
    from remote_gpu_server.scheduling import leases, scheduler
    from remote_gpu_server.store import database, schema
    from remote_gpu_server.workers import datachannel

    assert store.DatabaseUnavailable is database.DatabaseUnavailable is DatabaseUnavailable
    assert store.SchemaTooNew is schema.SchemaTooNew is SchemaTooNew
    assert up.UpError is UpError
    assert headers.HeaderError is HeaderError
    assert leases.QuotaExceeded is scheduler.QuotaExceeded is QuotaExceeded
    assert datachannel.TransferAborted is TransferAborted


def test_the_tree_drawn_in_the_docstring_names_every_error() -> None:
    doc = errors.__doc__ or ""
    for cls, code, parent, builtin in TREE:
        assert f"{cls.__name__}" in doc and code in doc, cls.__name__
        if builtin is not None:
            assert f"{cls.__name__} ({builtin.__name__})" in doc, cls.__name__
    exported = [getattr(errors, name) for name in errors.__all__]
    assert all(cls.__name__ in doc for cls in exported if isinstance(cls, type))
