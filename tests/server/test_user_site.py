"""A user's site inside the worker, without a worker: its layout, its path, reset."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_server.worker_process.user_site import PTH, UserSite
from wheels import tiny_wheel


@pytest.fixture
def saved_path() -> Iterator[None]:
    """The test changes sys.path and the environment as a worker would: put them back."""
    path, env, modules = list(sys.path), dict(os.environ), set(sys.modules)
    yield
    sys.path[:] = path
    os.environ.clear()
    os.environ.update(env)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def test_the_site_is_a_virtual_environment_over_this_one(tmp_path: Path) -> None:
    site = UserSite(str(tmp_path / "site"))
    site.make_ready()
    site.make_ready()  # again: nothing changes
    assert (tmp_path / "site" / "pyvenv.cfg").read_text().startswith("home = ")
    # Its pip sees this environment's packages as installed (pytest is one) and installs in the site.
    done = subprocess.run([str(site.python), "-c", "import sys, pytest; print(sys.prefix)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(tmp_path / "site")
    wheel = tiny_wheel(tmp_path, "rgpu_unit_probe", "1.0", "unit")
    subprocess.run([str(site.bin / "pip"), "install", "-q", "--no-index", str(wheel)], check=True,
                   capture_output=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert (site.site_packages / "rgpu_unit_probe" / "__init__.py").exists()
    assert site.packages() == [("rgpu_unit_probe", "1.0")]


def test_a_link_put_in_place_of_its_files_is_replaced_not_followed(tmp_path: Path) -> None:
    site = UserSite(str(tmp_path / "site"))
    site.make_ready()
    outside = tmp_path / "outside.txt"
    outside.write_text("not the site's")
    (site.site_packages / PTH).unlink()
    (site.site_packages / PTH).symlink_to(outside)
    site.make_ready()
    assert outside.read_text() == "not the site's" and not (site.site_packages / PTH).is_symlink()


def test_on_the_path_new_packages_import_and_a_reset_empties_it(tmp_path: Path, saved_path: None) -> None:
    site = UserSite(str(tmp_path / "site"))
    site.make_ready()
    site.put_on_path()
    assert str(site.site_packages) in sys.path and os.environ["PATH"].startswith(str(site.bin))
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(site.site_packages)
    wheel = tiny_wheel(tmp_path, "rgpu_unit_probe", "1.0", "unit")
    before = set(site.packages())
    subprocess.run([str(site.python), "-m", "pip", "install", "-q", "--no-index", str(wheel)], check=True,
                   capture_output=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (site.site_packages / "extra.pth").write_text(str(tmp_path / "extra") + "\n")
    (tmp_path / "extra").mkdir()
    assert site.refresh()
    import rgpu_unit_probe  # type: ignore[import-not-found]

    assert rgpu_unit_probe.VALUE == "unit" and str(tmp_path / "extra") in sys.path
    assert site.already_imported(before) == ["rgpu_unit_probe"]
    packages, size = site.reset()
    assert packages == [("rgpu_unit_probe", "1.0")] and size > 0
    assert site.packages() == [] and sorted(p.name for p in site.root.iterdir()) == ["bin", "lib", "pyvenv.cfg"]
