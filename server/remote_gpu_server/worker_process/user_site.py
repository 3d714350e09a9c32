"""The user's own packages, inside their worker: ``%pip install`` that lasts.

This module runs inside the worker process. At lease time, once the worker
is its user's (:func:`.confinement.enter`), :func:`activate` makes the
user's site for this worker's environment (a folder the server made for
them; see :mod:`..isolation.user_sites`) a small virtual environment layered
over the worker's own, and puts it on the worker's path:

- ``pyvenv.cfg`` and ``bin/python``: a virtual environment of the worker's
  base interpreter whose ``site-packages`` holds a ``.pth`` that adds the
  worker's environment after it. Its pip therefore installs into the site,
  counts the environment's packages as installed (a requirement met there is
  not installed again), and never uninstalls one of them: a newer version
  goes into the site and shadows it ("Not uninstalling ..., outside
  environment").
- ``bin/pip`` and ``bin/pip3`` run that pip; ``bin`` comes first on ``PATH``,
  so ``!pip install`` and a package's scripts are the site's, and its
  ``site-packages`` first on ``sys.path`` and ``PYTHONPATH``, so what is
  installed imports in this session, in its child processes and in the next
  sessions without a restart.
- ``%pip`` runs the site's pip (IPython's would run the worker's interpreter,
  which installs into the shared environment); ``%conda`` says in one line
  why it does not install; ``%rgpu_env reset`` (what ``%gpu env reset``
  runs) empties the site and says what it removed.

Why not ``PYTHONUSERBASE``: a virtual environment (the server's usually is
one) turns the user site off, and pip refuses ``--user`` there. Why not
``pip --target``: it installs every dependency again, the environment's
numpy and torch included, and cannot upgrade or uninstall.

A package the cell had already imported stays loaded in its old version
until the worker restarts; the magics say so.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import site
import sys
from pathlib import Path
from typing import Any

__all__ = ["ENV_MAGIC", "PTH", "SESSION_ONLY", "UserSite", "activate"]

#: The ``.pth`` file that adds the worker's own environment after the site.
PTH = "_rgpu_environment.pth"
#: The worker's magic behind ``%gpu env``.
ENV_MAGIC = "rgpu_env"
_PREFIX = "Remote GPU: "
_SCRIPT = '#!/bin/sh\nexec "{python}" -m pip "$@"\n'
#: Why a worker without a site of its user's installs for the session only.
SESSION_ONLY = "this server cannot give its sandboxes a site of yours that lasts (its log says why)"


def _base_python() -> str:
    """The interpreter a virtual environment of this one is made from."""
    return str(getattr(sys, "_base_executable", "") or os.path.realpath(sys.executable))


class UserSite:
    """A user's site at ``root`` (see the module docstring). ``why``: empty for
    their own site, which outlives the session; else why this one is in the
    session folder, for the session only (said after each install)."""

    def __init__(self, root: str, why: str = "") -> None:
        self.root = Path(root)
        self.why = why
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        self.site_packages = self.root / "lib" / version / "site-packages"
        self.bin = self.root / "bin"
        self.python = self.bin / "python"
        self._mtime = 0.0

    @property
    def persistent(self) -> bool:
        """It outlives the session."""
        return not self.why

    def make_ready(self) -> None:
        """Write what the site needs (again: it may have been emptied); run as its user."""
        self.site_packages.mkdir(parents=True, exist_ok=True)
        self.bin.mkdir(exist_ok=True)
        base = _base_python()
        info = sys.version_info
        _write(self.root / "pyvenv.cfg",
               f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\n"
               f"version = {info.major}.{info.minor}.{info.micro}\n")
        if not self.python.is_symlink() or os.readlink(self.python) != base:
            self.python.unlink(missing_ok=True)
            self.python.symlink_to(base)
        for name in ("pip", "pip3"):
            script = self.bin / name
            if not script.exists():
                _write(script, _SCRIPT.format(python=self.python))
                script.chmod(0o755)
        # The environment's folders, their own .pth files processed, after the site's.
        lines = [f"import site; site.addsitedir({p!r})" for p in self.environment_paths()]
        _write(self.site_packages / PTH, "\n".join(lines) + "\n")

    def environment_paths(self) -> list[str]:
        """The worker's environment's package folders (``site-packages``)."""
        here = str(self.site_packages)
        return [p for p in site.getsitepackages() if os.path.isdir(p) and p != here]

    def put_on_path(self) -> None:
        """The site's packages import here and in child processes, before the environment's."""
        folder = str(self.site_packages)
        if folder not in sys.path:
            ours = set(self.environment_paths())
            index = next((i for i, p in enumerate(sys.path) if p in ours), len(sys.path))
            sys.path.insert(index, folder)
        self.refresh()
        os.environ["PATH"] = os.pathsep.join([str(self.bin), os.environ.get("PATH", os.defpath)])
        paths = [folder, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))

    def refresh(self) -> bool:
        """After an install: new ``.pth`` files take effect and the import system
        looks again; True if the site changed since the last call."""
        try:
            mtime = self.site_packages.stat().st_mtime
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        first, self._mtime = not self._mtime, mtime
        known = {os.path.normcase(p) for p in sys.path}
        for name in sorted(os.listdir(self.site_packages)):
            if name.endswith(".pth") and name != PTH:
                site.addpackage(str(self.site_packages), name, known)
        if not first:  # a folder new on sys.path has nothing cached yet
            importlib.invalidate_caches()
        return True

    def packages(self) -> list[tuple[str, str]]:
        """``(name, version)`` of each package installed in the site."""
        from importlib.metadata import distributions  # ~70 ms to import: when asked only

        found = {(d.metadata["Name"] or "?", d.version) for d in distributions(path=[str(self.site_packages)])}
        return sorted(found, key=lambda nv: nv[0].lower())

    def already_imported(self, before: set[tuple[str, str]]) -> list[str]:
        """Packages installed since ``before`` whose modules this process had
        imported already (they stay in their old version until a restart)."""
        from importlib.metadata import distributions

        names = set()
        for dist in distributions(path=[str(self.site_packages)]):
            if (dist.metadata["Name"], dist.version) in before:
                continue
            tops = set((dist.read_text("top_level.txt") or "").split())
            tops |= {str(f).split("/")[0].removesuffix(".py") for f in dist.files or ()}
            if any(t in sys.modules for t in tops if t.isidentifier()):
                names.add(str(dist.metadata["Name"]))
        return sorted(names)

    def reset(self) -> tuple[list[tuple[str, str]], int]:
        """Empty the site (and make it ready again): the packages it held and its bytes."""
        packages = self.packages()
        size = _size(self.root)
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.make_ready()
        self.refresh()
        return packages, size


def _write(path: Path, text: str) -> None:
    """Write ``path`` unless it holds ``text``; a link there is replaced, not followed."""
    try:
        if not path.is_symlink() and path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.write_text(text)
    tmp.replace(path)


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _describe(packages: list[tuple[str, str]]) -> str:
    return ", ".join(f"{n} {v}" for n, v in packages)


class _Magics:
    """The worker's ``%pip``, ``%conda`` and ``%rgpu_env`` for ``user_site``."""

    def __init__(self, shell: Any, user_site: UserSite) -> None:
        self.shell = shell
        self.site = user_site

    def pip(self, line: str) -> None:
        """Run pip in your own site on the GPU server: ``%pip install PACKAGE``."""
        before = set(self.site.packages())
        self.shell.system(f"{shlex.quote(str(self.site.python))} -m pip {line}")
        self.after_install(before)

    def after_install(self, before: set[tuple[str, str]]) -> None:
        if not self.site.refresh():
            return
        stale = self.site.already_imported(before)
        if stale:
            print(f"{_PREFIX}{', '.join(stale)} had been imported in this session already: the old version "
                  "stays loaded until the worker restarts (%gpu release, then run the cell again)")
        if not self.site.persistent:
            print(f"{_PREFIX}installed for this session only: {self.site.why}")

    def conda(self, line: str) -> None:
        """``%conda install`` does not install on the GPU server: use ``%pip install``."""
        has_conda = bool(os.environ.get("CONDA_EXE") or shutil.which("conda")
                         or os.path.isdir(os.path.join(sys.prefix, "conda-meta")))
        why = ("conda installs into the shared environment, which you cannot change"
               if has_conda else "conda is not installed in the GPU server's environment")
        print(f"{_PREFIX}%conda does not install here ({why}); use %pip install, which installs into "
              "your own site")

    def rgpu_env(self, line: str) -> None:
        """``%rgpu_env reset``: remove the packages you installed; ``%rgpu_env show``: list them."""
        words = line.split() or ["show"]
        if words == ["reset"]:
            packages, size = self.site.reset()
            from remote_gpu_core.sizes import format_size

            if packages:
                print(f"{_PREFIX}removed {len(packages)} package(s) from your own site ({_describe(packages)}; "
                      f"{format_size(size)}); what this session imported of them stays loaded until the "
                      "worker restarts")
            else:
                print(f"{_PREFIX}your own site held no packages; it is empty ({format_size(size)} freed)")
        elif words == ["show"]:
            packages = self.site.packages()
            kept = "kept across sessions" if self.site.persistent else "for this session only"
            print(f"{_PREFIX}your own site ({kept}): {self.site.root}")
            if self.site.why:
                print(f"{_PREFIX}{self.site.why}")
            print(f"{_PREFIX}{_describe(packages) if packages else 'no packages installed'}")
        else:
            print(f"{_PREFIX}usage: %gpu env show|reset")

    def post_run_cell(self, result: Any) -> None:
        self.site.refresh()  # after !pip install: new .pth files, fresh import caches


def activate(shell: Any, root: str, why: str = "") -> UserSite:
    """Make ``root`` the user's site in this worker (see the module docstring and
    :class:`UserSite` for ``why``); call once, after the worker became its user."""
    user_site = UserSite(root, why)
    user_site.make_ready()
    user_site.put_on_path()
    if shell is not None:
        magics = _Magics(shell, user_site)
        for name in ("pip", "conda", ENV_MAGIC):
            shell.register_magic_function(getattr(magics, name), "line", name)
        shell.events.register("post_run_cell", magics.post_run_cell)
    return user_site
