"""The fingerprint of one end, what a pickle names, and what differs, without a server."""

from __future__ import annotations

import collections
import fractions
import importlib.metadata
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy
import pytest

from remote_gpu_core import fingerprint as fp
from remote_gpu_core.errors import SerializationError, VersionDifference
from remote_gpu_core.protocol.serialization import dump_values, load_values
from remote_gpu_kernel.versions import (
    client_fingerprint, comparison, matching_environment, mismatch, pretend_client_versions_for_tests
)
from wheels import tiny_wheel


def test_this_processes_fingerprint_is_pythons_minor_version_and_the_key_packages() -> None:
    found = fp.local_fingerprint()
    assert list(found) == ["python", *fp.KEY_PACKAGES]
    assert found["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert found["numpy"] == importlib.metadata.version("numpy") == numpy.__version__
    assert found["cloudpickle"] == importlib.metadata.version("cloudpickle")
    assert fp.local_fingerprint() is found  # once per process


def test_a_pickle_names_the_modules_of_its_classes_and_functions_and_only_packages_are_compared() -> None:
    modules: set[str] = set()
    dump_values({"a": numpy.zeros(3), "b": collections.OrderedDict(x=fractions.Fraction(1, 2)),
                 "f": numpy.sum, "local": lambda x: x}, modules)
    assert {"numpy", "collections", "fractions"} <= {m.partition(".")[0] for m in modules}
    # The standard library goes with Python's version; a function pickled by
    # value is rebuilt by cloudpickle's own functions; a module of no
    # distribution has no version to compare.
    assert fp.versions_of(modules) == {"numpy": numpy.__version__, "cloudpickle": fp.local_fingerprint()["cloudpickle"],
                                       __name__: fp.UNKNOWN}
    assert fp.versions_of(["__main__", "builtins", "_pickle", "remote_gpu_core.protocol"]) == {}
    assert dump_values({"x": 1})[0] == ["x"]  # without a set, nothing is noted


@pytest.fixture
def installed_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``fp_probe`` 3.1 unpacked from a wheel onto ``sys.path``; a plain
    module ``fp_local`` beside it, as a notebook's folder would have."""
    with zipfile.ZipFile(tiny_wheel(tmp_path, "fp_probe", "3.1")) as wheel:
        wheel.extractall(tmp_path / "site")
    (tmp_path / "site" / "fp_local.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield tmp_path / "site"
    for name in ("fp_probe", "fp_local"):
        sys.modules.pop(name, None)


def test_package_versions_from_metadata_unknown_for_a_folders_module_absent_otherwise(installed_here: Path) -> None:
    assert fp.package_version("fp_probe") == "3.1"
    assert fp.package_version("fp_local") == fp.UNKNOWN
    assert fp.package_version("fp_nowhere_to_be_found") == fp.ABSENT


def test_what_differs_is_said_in_one_line() -> None:
    here = {"python": "3.12", "numpy": "2.1.3", "torch": "", "pandas": "2.2.3", "cloudpickle": "3.1.0"}
    there = {"python": "3.11", "numpy": "1.26.4", "torch": "2.5.0", "pandas": "2.2.3", "cloudpickle": "unknown"}
    found = fp.differences(here, there)
    assert found == [("python", "3.12", "3.11"), ("numpy", "2.1.3", "1.26.4"), ("torch", "", "2.5.0")]
    assert fp.describe(found) == ("Python 3.12 here, 3.11 on the GPU server; numpy 2.1.3 here, 1.26.4 on the "
                                  "GPU server; torch not installed here, 2.5.0 on the GPU server")
    assert fp.differences(here, here) == []
    assert fp.differences(here, {}) == []  # a server that says nothing: nothing to compare


def test_an_unpickling_failure_is_named_only_where_a_version_differs() -> None:
    error = AttributeError("Can't get attribute 'Widget'")
    named = fp.unpickling_failure("w", "on the GPU server", error, {"thing": "2.0"}, {"thing": "1.0"})
    assert isinstance(named, VersionDifference) and isinstance(named, SerializationError)
    assert (named.package, named.here, named.there, named.code) == ("thing", "2.0", "1.0", "version_difference")
    assert str(named) == ("cannot unpickle 'w' on the GPU server: thing 2.0 here, 1.0 on the GPU server "
                          "(AttributeError: Can't get attribute 'Widget'); install the same version on both "
                          "ends ('rgpu env diff' compares them)")
    assert fp.unpickling_failure("w", "here", error, {"thing": "1.0"}, {"thing": "1.0"}) is None


def test_load_values_keeps_unpicklings_error_unless_explained() -> None:
    names, counts, buffers = dump_values({"ok": 1, "bad": fractions.Fraction(1, 3)})
    broken = [bytes(b).replace(b"Fraction", b"Fractoin") for b in buffers]
    with pytest.raises(AttributeError):
        load_values(names, counts, broken)
    with pytest.raises(LookupError) as raised:
        load_values(names, counts, broken, lambda name, error: LookupError(name))
    assert str(raised.value) == "bad" and isinstance(raised.value.__cause__, AttributeError)
    with pytest.raises(AttributeError):
        load_values(names, counts, broken, lambda name, error: None)


def test_the_test_hook_changes_only_what_the_client_says_it_has() -> None:
    real = dict(fp.local_fingerprint())
    assert mismatch(real) is None
    with pretend_client_versions_for_tests(numpy="1.0"):
        assert client_fingerprint()["numpy"] == "1.0"
        assert mismatch(real) == f"numpy 1.0 here, {real['numpy']} on the GPU server"
        here = {**real, "numpy": "1.0"}
        envs = {"np2": {**real, "numpy": "2.0"}, "np1": here, "also": here}
        assert mismatch(real, envs) == f"numpy 1.0 here, {real['numpy']} on the GPU server; environment `np1` matches"
        assert mismatch(real, {"np2": envs["np2"]}) == f"numpy 1.0 here, {real['numpy']} on the GPU server"
        rows, differ = comparison(real)
        assert differ == 1 and ("numpy", "1.0", real["numpy"], True) in rows
    assert client_fingerprint() == real and dict(fp.local_fingerprint()) == real


def test_an_environment_that_matches_is_found_in_the_servers_list_where_it_has_one() -> None:
    here = {"python": "3.11", "numpy": "2.1.3"}
    status = {"envs": [{"name": "default", "fingerprint": {"python": "3.11", "numpy": "1.26.4"}},
                       {"name": "np2", "fingerprint": {"python": "3.11", "numpy": "2.1.3", "torch": "2.5.0"}}]}
    assert matching_environment(here, status, "default") == "np2"
    assert matching_environment(here, status, "np2") is None  # the one in use is not another
    assert matching_environment(here, {"slots": []}, "default") is None  # a server without the list
    assert matching_environment(here, {"envs": [{"name": "np1", "fingerprint": {"numpy": "1.0"}}]},
                                "default") is None
