"""The sidebar's package-lock.json is complete for every platform.

npm writes into a lock only the optional packages of the platform it ran on
when the lock lacks the others, so a lock made on one machine gains lines
when ``npm install`` runs on another (rollup's and esbuild's native builds
are optional dependencies, one per OS and CPU). A lock that lists every
optional dependency of every package it holds is left byte-identical by
``npm install`` and ``npm ci`` anywhere; this checks that offline.
"""

from __future__ import annotations

import json
from typing import Any

from labext import EXT_DIR


def _resolves(packages: dict[str, Any], parent: str, name: str) -> bool:
    """Whether ``name`` is found from ``parent`` the way Node looks it up: in
    the parent's own node_modules, then in each enclosing one up to the root."""
    base = parent
    while True:
        prefix = f"{base}/node_modules/" if base else "node_modules/"
        if prefix + name in packages:
            return True
        if not base:
            return False
        cut = base.rfind("/node_modules/")
        base = base[:cut] if cut >= 0 else ""


def test_every_optional_dependency_is_locked() -> None:
    lock = json.loads((EXT_DIR / "package-lock.json").read_text())
    assert lock["lockfileVersion"] == 3
    packages: dict[str, Any] = lock["packages"]
    missing = [
        f"{path or '(root)'} -> {name}"
        for path, entry in packages.items()
        for name in entry.get("optionalDependencies", {})
        if not _resolves(packages, path, name)
    ]
    assert not missing, (
        "package-lock.json lacks these platforms' optional packages, so npm install would "
        "rewrite it: run `npm install --package-lock-only` in jupyterlab_ext/ (it adds them "
        "and changes nothing else) and commit the lock\n" + "\n".join(missing)
    )


def test_every_platform_package_is_optional() -> None:
    """A package pinned to an OS or CPU must be optional, or npm ci fails elsewhere."""
    packages: dict[str, Any] = json.loads((EXT_DIR / "package-lock.json").read_text())["packages"]
    required = [path for path, entry in packages.items()
                if ("os" in entry or "cpu" in entry) and not entry.get("optional")]
    assert not required, required
