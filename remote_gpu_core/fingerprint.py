"""What makes values cross safely between a notebook and its worker: the versions on each end.

A pickle names the classes and functions it holds by module and name; the
other end imports them, so a value crosses safely only where both ends
have the same Python minor version, the same cloudpickle, and the same
version of every package whose objects it holds. A :data:`Fingerprint`
says what one end has: ``python`` its minor version (``3.11``), and each
package its installed version, :data:`ABSENT` where it is not installed.

:func:`local_fingerprint` is this process's fingerprint of the packages
that cross most (:data:`KEY_PACKAGES`): read from the packages' metadata,
never by importing them (the server must not import torch), once per
process. The worker's comes with the lease, the client compares it with
its own (:func:`differences`) and says what differs in one line
(:func:`describe`).

:func:`versions_of` gives the versions of the packages a push or a pull
references (the pickler collects their top-level names while it pickles,
see :mod:`.protocol.serialization`); they travel with the values, and the
end that fails to unpickle them names the package whose versions differ
(:func:`explain_unpickling`) instead of pickle's traceback.

``python -m remote_gpu_core.fingerprint`` prints this interpreter's
fingerprint as JSON (what a server asks of another environment's Python).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType

from .errors import VersionDifference

__all__ = [
    "ABSENT",
    "Difference",
    "FINGERPRINT_KEY",
    "Fingerprint",
    "KEY_PACKAGES",
    "PYTHON",
    "UNKNOWN",
    "describe",
    "differences",
    "explain_unpickling",
    "from_wire",
    "local_fingerprint",
    "package_version",
    "python_version",
    "top_level",
    "unpickling_failure",
    "versions_of",
]

#: A name (``python`` or a top-level package) to its version on one end.
Fingerprint = dict[str, str]
#: ``(name, version here, version there)``: one thing that differs.
Difference = tuple[str, str, str]

PYTHON = "python"
#: The key of a worker's ``kernel_info_reply`` that gives its fingerprint:
#: the server asks once, as the worker starts, and hands it out with every
#: lease of that worker.
FINGERPRINT_KEY = "rgpu_fingerprint"
#: The packages every session compares, beside Python itself.
KEY_PACKAGES = ("cloudpickle", "numpy", "torch", "pandas")
#: The version of a package that is not installed.
ABSENT = ""
#: The version of a package that imports but names no version.
UNKNOWN = "unknown"

#: Top-level modules whose versions are not compared: the standard library
#: goes with Python's version, ours with the protocol's, and a notebook's
#: own classes (``__main__``) are pickled by value.
_NOT_COMPARED = frozenset({"__main__", "__mp_main__", "builtins", "remote_gpu_core",
                           "remote_gpu_kernel", "remote_gpu_server"}) | frozenset(sys.stdlib_module_names)


def from_wire(value: object) -> Fingerprint:
    """A fingerprint as another process sent it (a worker runs its user's
    code): its names and versions that are strings, nothing else."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def python_version() -> str:
    """This Python's minor version, ``3.11``: what pickles depend on."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def top_level(module: str) -> str | None:
    """The top-level package of a module name whose version is compared, or
    None (the standard library, ours, ``__main__``)."""
    top = module.partition(".")[0]
    if not top or top in _NOT_COMPARED or top.startswith("_"):
        return None
    return top


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Top-level import names to the distributions that provide them (``PIL``
    to ``pillow``): a scan of every installed distribution, so once, and only
    for a name that is not a distribution's own."""
    return importlib.metadata.packages_distributions()


#: ``top -> (module object it was read from, version)``; see :func:`package_version`.
_known: dict[str, tuple[ModuleType | None, str]] = {}


def package_version(top: str) -> str:
    """The version of top-level package ``top`` in this process.

    An imported package's ``__version__`` where it has one (that is the code
    unpickling runs), else its distribution's metadata, else
    :data:`UNKNOWN` for one that imports but names no version, and
    :data:`ABSENT` for one that is not installed. Found versions are kept
    while the same module object is imported; an absent one is looked up
    again (a ``%pip install`` may bring it).
    """
    module = sys.modules.get(top)
    known = _known.get(top)
    if known is not None and known[0] is module:
        return known[1]
    version = getattr(module, "__version__", None)
    if not isinstance(version, str) or not version:
        version = _installed_version(top)
    if version == ABSENT and module is not None:
        version = UNKNOWN
    if version != ABSENT:
        _known[top] = (module, version)
    return version


def _installed_version(top: str) -> str:
    """``top``'s version from the metadata of the distribution of its name,
    else of the one that provides it (looked for only then: a scan of all);
    :data:`UNKNOWN` for a package that none names, :data:`ABSENT` for none."""
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        pass
    if not _findable(top):
        return ABSENT
    if not _installed(top):  # a module of the notebook's own folder: no distribution has it
        return UNKNOWN
    for name in _distributions().get(top, ()):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return UNKNOWN


def _installed(top: str) -> bool:
    """Whether ``top`` comes from where packages are installed (not a folder
    of the user's own on ``sys.path``)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    where = spec.origin if spec is not None and spec.has_location else None
    return where is None or any(part in where for part in ("site-packages", "dist-packages"))


def _findable(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def local_fingerprint() -> Mapping[str, str]:
    """This process's :data:`Fingerprint` of Python and :data:`KEY_PACKAGES`,
    made once. Read from metadata: nothing is imported for it."""
    found = {PYTHON: python_version()}
    for name in KEY_PACKAGES:
        found[name] = _installed_version(name)
    return found


def versions_of(modules: Iterable[str]) -> Fingerprint:
    """The version of the top-level package of each of ``modules`` whose
    version is compared (see :func:`top_level`)."""
    tops = {t for t in (top_level(m) for m in modules) if t is not None}
    return {top: package_version(top) for top in sorted(tops)}


def differences(here: Mapping[str, str], there: Mapping[str, str]) -> list[Difference]:
    """What differs between two fingerprints, for the names both know, in
    ``here``'s order. A version neither end can name (:data:`UNKNOWN`) is not a difference."""
    found = []
    for name, mine in here.items():
        theirs = there.get(name)
        if theirs is None or mine == theirs or UNKNOWN in (mine, theirs):
            continue
        found.append((name, mine, theirs))
    return found


def _shown(name: str, version: str) -> str:
    return "not installed" if version == ABSENT else version


def describe(found: Iterable[Difference], there: str = "on the GPU server") -> str:
    """One line: ``numpy 2.1.3 here, 1.26.4 on the GPU server; Python 3.12 here, 3.11 on the GPU server``."""
    return "; ".join(f"{'Python' if name == PYTHON else name} {_shown(name, mine)} here, "
                     f"{_shown(name, theirs)} {there}" for name, mine, theirs in found)


def unpickling_failure(name: str, where: str, error: BaseException, here: Mapping[str, str],
                       there: Mapping[str, str]) -> VersionDifference | None:
    """The error to raise for variable ``name`` that failed to unpickle
    (``error``) where ``where`` says (``here``, ``on the GPU server``), if a
    package the value references differs: ``here`` and ``there`` are the
    versions of those packages on the notebook's end and on the server's.
    None where none differs: the failure is not about versions.
    """
    found = differences(here, there)
    if not found:
        return None
    package, mine, theirs = found[0]
    return VersionDifference(
        f"cannot unpickle {name!r} {where}: {describe(found)} "
        f"({type(error).__name__}: {error}); install the same version on both ends "
        "('rgpu env diff' compares them)", package=package, here=mine, there=theirs)


def explain_unpickling(sent: object, *, from_notebook: bool) -> Callable[[str, Exception], VersionDifference | None]:
    """What :func:`~.protocol.serialization.load_values` asks (``explain``)
    about a value that failed to unpickle, on the end that received it:
    ``sent`` are the sender's versions of the packages its pickles name
    (from the wire: only names and versions that are strings count), and
    ``from_notebook`` says whether the sender is the notebook (a push,
    unpickled on the GPU server) or the worker (a pull, unpickled here)."""
    theirs = {k: v for k, v in from_wire(sent).items() if top_level(k) == k}

    def explain(name: str, error: Exception) -> VersionDifference | None:
        ours = {top: package_version(top) for top in theirs}
        if from_notebook:
            return unpickling_failure(name, "on the GPU server", error, theirs, ours)
        return unpickling_failure(name, "here", error, ours, theirs)

    return explain


def main() -> None:
    """Print this interpreter's :func:`local_fingerprint` as JSON."""
    print(json.dumps(dict(local_fingerprint()), sort_keys=True))


if __name__ == "__main__":
    main()
