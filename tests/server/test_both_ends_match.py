"""Both ends match: the versions on the notebook's end and the worker's, compared for real.

A real server and real workers. The package ``versioned_thing`` is made
here in two versions whose objects do not cross (2.0 renamed the class
1.0 had): 1.0 is installed into the user's own site on the server with
``%pip install --no-index`` of a wheel uploaded from here, 2.0 is on this
process's ``sys.path``. A push or a pull of one of its objects then says
which package differs and its versions on each end, not pickle's
traceback. The notebook's key packages (numpy, cloudpickle, ...) are the
worker's own here; a difference in them is made by the test hook that
changes what this client *says* it has, never the worker's.
"""

from __future__ import annotations

import io
import sys
import zipfile
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from remote_gpu_core.errors import AuthenticationError, RemoteError, VersionDifference
from remote_gpu_core.fingerprint import local_fingerprint
from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.cli import main as rgpu
from remote_gpu_kernel.sync import Session
from remote_gpu_kernel.versions import PRETEND_VAR, pretend_client_versions_for_tests
from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from servers import ServerProcess
from wheels import tiny_wheel

PACKAGE = "versioned_thing"
#: 1.0 has ``Gadget``; 2.0 renamed it ``Widget``: an object of either does
#: not unpickle where the other version is installed.
V1 = "class Gadget:\n    def __init__(self):\n        self.size = 1\n"
V2 = "class Widget:\n    def __init__(self):\n        self.size = 2\n"


def quiet(_: object) -> None:
    pass


@dataclass
class OfThisModule:
    """Pickled by reference to this module, which no worker has."""

    n: int


@dataclass
class Versions:
    server: ServerProcess
    token: str
    wheel_v1: Path


@pytest.fixture(scope="module")
def versions(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory,
             monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Versions]:
    """The shared server; a user of the module's own, with ``versioned_thing``
    1.0 in their site on the server and 2.0 on this process's path."""
    tmp = tmp_path_factory.mktemp("versions")
    wheel_v1 = tiny_wheel(tmp, PACKAGE, "1.0", source=V1)
    here = tmp / "here"
    with zipfile.ZipFile(tiny_wheel(tmp, PACKAGE, "2.0", source=V2)) as wheel:
        wheel.extractall(here)  # a wheel unpacked is an installed package, metadata and all
    monkeypatch_module.syspath_prepend(str(here))
    token = server.token("versions")
    monkeypatch_module.chdir(tmp)
    with Client(server.url, token).session() as s:
        s.upload(wheel_v1.name)
        result = s.execute(f"%pip install --no-index {wheel_v1.name}", on_output=quiet)
        assert result.ok and f"Successfully installed {PACKAGE.replace('_', '-')}-1.0" in result.stdout
    try:
        yield Versions(server, token, wheel_v1)
    finally:
        sys.modules.pop(PACKAGE, None)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def session(versions: Versions, notices: list[str] | None = None) -> Session:
    return Client(versions.server.url, versions.token).session(
        on_notice=notices.append if notices is not None else None)


def test_the_same_versions_say_nothing(versions: Versions) -> None:
    notices: list[str] = []
    with session(versions, notices) as s:
        assert s.fingerprint == dict(local_fingerprint())
        assert s.fingerprint["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
        assert s.mismatch is None
        assert s.execute("x = 1", on_output=quiet).ok
    assert notices == []


def test_a_difference_in_a_key_package_is_one_line_when_the_session_starts(versions: Versions) -> None:
    theirs = local_fingerprint()
    notices: list[str] = []
    with pretend_client_versions_for_tests(numpy="1.26.4", pandas=""), session(versions, notices) as s:
        expected = (f"numpy 1.26.4 here, {theirs['numpy']} on the GPU server; "
                    f"pandas not installed here, {theirs['pandas']} on the GPU server")
        assert s.mismatch == expected
    assert notices == [f"Remote GPU: {expected}"]


def test_a_push_whose_package_differs_names_it_and_loses_nothing(versions: Versions) -> None:
    import versioned_thing

    with session(versions) as s:
        s.push(kept=41)
        with pytest.raises(VersionDifference) as raised:
            s.push(w=versioned_thing.Widget())  # type: ignore[attr-defined]
        error = raised.value
        assert error.code == "version_difference"
        text = str(error)
        assert text.startswith("cannot unpickle 'w' on the GPU server: "
                               "versioned_thing 2.0 here, 1.0 on the GPU server (AttributeError: ")
        assert "Widget" in text and "rgpu env diff" in text and "Traceback" not in text
        # The session goes on, as it was: nothing set, nothing lost.
        result = s.execute("print(kept + 1, 'w' in globals())", on_output=quiet)
        assert result.ok and result.stdout == "42 False\n"


def test_a_pull_whose_package_differs_names_it(versions: Versions) -> None:
    with session(versions) as s:
        assert s.execute(f"import {PACKAGE}\ng = {PACKAGE}.Gadget()\nn = 7", on_output=quiet).ok
        with pytest.raises(VersionDifference) as raised:
            s.pull("g")
        error = raised.value
        assert (error.package, error.here, error.there) == (PACKAGE, "2.0", "1.0")
        assert str(error).startswith("cannot unpickle 'g' here: versioned_thing 2.0 here, 1.0 on the "
                                     "GPU server (AttributeError: ")
        assert s.pull("n") == {"n": 7}  # the session goes on


def test_a_failure_that_is_not_about_versions_keeps_its_own_error(versions: Versions) -> None:
    with session(versions) as s:
        # This module's classes are pickled by reference; the worker has no such
        # module, and no version of it to compare: the error is unpickling's.
        with pytest.raises(RemoteError) as raised:
            s.push(v=OfThisModule(1))
        assert raised.value.ename == "ModuleNotFoundError" and not isinstance(raised.value, VersionDifference)


def rgpu_env_diff(versions: Versions, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = rgpu(["env", "diff", *args, "--url", versions.server.url, "--token", versions.token])
    return code, out.getvalue()


def test_rgpu_env_diff_prints_the_whole_comparison(versions: Versions) -> None:
    theirs = local_fingerprint()
    code, out = rgpu_env_diff(versions)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["package", "here", "server", "(default)"]
    for name in ("Python", "cloudpickle", "numpy", "torch", "pandas"):
        (row,) = [line.split() for line in lines if line.split()[:1] == [name]]
        key = "python" if name == "Python" else name
        assert row == [name, theirs[key] or "-", theirs[key] or "-"]
    assert lines[-1] == "all the same"
    with pretend_client_versions_for_tests(numpy="1.26.4"):
        code, out = rgpu_env_diff(versions, "default")
    assert code == 1
    (row,) = [line.split() for line in out.splitlines() if "numpy" in line]
    assert row == ["!", "numpy", "1.26.4", theirs["numpy"]]
    assert "1 of 5 differ" in out


def test_rgpu_env_diff_of_an_environment_the_server_lacks_says_so(
        versions: Versions, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = rgpu_env_diff(versions, "np2")
    assert code == 1
    assert "no environment 'np2' on this server" in capsys.readouterr().err


def test_the_fingerprint_api_wants_a_token(versions: Versions) -> None:
    with pytest.raises(AuthenticationError):
        ApiClient(versions.server.url, "not-a-token").fingerprint()
    assert ApiClient(versions.server.url, versions.token).fingerprint()["fingerprint"] == dict(local_fingerprint())


def test_a_worker_that_lies_about_its_versions_harms_no_one(versions: Versions) -> None:
    """A hostile cell makes its own worker name garbage for versions in a pull's
    reply: the server passes on only names and versions that are strings, to
    that user's client alone, and the pull and the server go on."""
    with session(versions) as s:
        hostile = ("import remote_gpu_server.worker_process.variables as v\n"
                   "v.versions_of = lambda modules: {'numpy': 1, 'torch': ['x'], 'versioned_thing': '0.1'}\n"
                   "n = 5")
        assert s.execute(hostile, on_output=quiet).ok
        assert s.pull("n") == {"n": 5}
        # Garbage that is a string is only a wrong word in that user's own error.
        assert s.execute(f"import {PACKAGE}\ng = {PACKAGE}.Gadget()", on_output=quiet).ok
        with pytest.raises(VersionDifference, match=r"versioned_thing 2\.0 here, 0\.1 on the GPU server"):
            s.pull("g")
    with session(versions) as fresh:  # the server, and the next session's worker, are as they were
        assert fresh.execute(f"import {PACKAGE}\ng = {PACKAGE}.Gadget()", on_output=quiet).ok
        with pytest.raises(VersionDifference, match=r"versioned_thing 2\.0 here, 1\.0 on the GPU server"):
            fresh.pull("g")


def test_the_remote_gpu_kernel_says_a_difference_in_one_line_under_its_lease(
        versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is a process of its own: the test hook reaches it in its
    environment (:data:`PRETEND_VAR`)."""
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernelspec(tmp_path / "prefix")))
    theirs = local_fingerprint()["cloudpickle"]  # the worker runs this Python
    env = dict(kernel_env(tmp_path, versions.server.url, versions.token), **{PRETEND_VAR: "cloudpickle=2.2.1"})
    driver = KernelDriver(env).start()
    try:
        first = driver.run("1")
        assert first.status == "ok"
        (lease,) = [t for t in first.text("display_data") if "Remote GPU: leased cpu" in t]
        assert lease.splitlines()[1:] == [f"Remote GPU: cloudpickle 2.2.1 here, {theirs} on the GPU server"]
    finally:
        driver.shutdown()
