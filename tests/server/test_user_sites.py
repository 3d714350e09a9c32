"""``%pip install`` in a remote cell: into the user's own site, for good.

A root server (workers run as each user's uid, each user's session folders
on a filesystem of their own of ``--session-disk``): alice installs a
small wheel made here (no network: ``--no-index``, the wheel uploaded into
her session folder); it imports in the same session and in the next one,
never in bob's, whose hostile cells cannot read or write her site nor the
shared environment. The server's pip settings reach workers; nothing else
of its environment does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remote_gpu_kernel import Client
from remote_gpu_kernel.sync import Session
from servers import ServerProcess
from wheels import tiny_wheel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root server isolates with uids: run as root")

PACKAGE = "rgpu_site_probe"
MIRROR = "https://mirror.example.invalid/simple"
EXTRA = "https://extra.example.invalid/simple"
SECRET = "RGPU_TEST_UNRELATED_SECRET"


def quiet(_: object) -> None:
    pass


def run(session: Session, code: str) -> str:
    """Run ``code``; what it printed. The cell itself must not fail."""
    result = session.execute(code, on_output=quiet)
    assert result.ok, result.error
    return result.stdout


@dataclass
class Sites:
    server: ServerProcess
    alice: str
    bob: str
    wheel: Path
    #: Another server like it, on the same folders and store (not started).
    make_server: Callable[[], ServerProcess]

    def session(self, token: str) -> Session:
        return Client(self.server.url, token).session()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    tmp = tmp_path_factory.mktemp("sites")
    config = tmp / "pip.conf"  # the server's own: no worker can read this file
    config.write_text(f"[global]\nextra-index-url = {EXTRA}\ncache-dir = /root/.cache/pip\n"
                      "[install]\nprogress-bar = off\n")
    def make_server() -> ServerProcess:
        return ServerProcess(tmp, "cpu:3", "--session-disk", "32M",
                             env={"PIP_INDEX_URL": MIRROR, "PIP_CONFIG_FILE": str(config),
                                  "PIP_TARGET": "/somewhere/else", SECRET: "the server's own"})

    server = make_server()
    alice, bob = server.token("alice"), server.token("bob")
    wheels = tmp / "wheels"
    wheels.mkdir()
    wheel = tiny_wheel(wheels, PACKAGE, "1.0", "installed by alice")
    server.start()
    found = Sites(server, alice, bob, wheel, make_server)
    try:
        yield found
    finally:
        found.server.stop()


@pytest.fixture
def here(sites: Sites, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The client's folder: where the wheel is, to upload it."""
    monkeypatch.chdir(sites.wheel.parent)
    return sites.wheel.parent


def install(session: Session, wheel: Path) -> str:
    session.upload(wheel.name)
    return run(session, f"%pip install --no-index {wheel.name}")


def test_pip_install_imports_now_and_in_the_next_session_and_never_for_another_user(
        sites: Sites, here: Path) -> None:
    with sites.session(sites.alice) as a:
        out = install(a, sites.wheel)
        assert f"Successfully installed {PACKAGE.replace('_', '-')}-1.0" in out
        # pip's notices: no version check, no "you may need to restart the kernel".
        assert "new release of pip" not in out and "restart" not in out
        value, where, cwd = run(a, f"import os, {PACKAGE}\nprint({PACKAGE}.VALUE, {PACKAGE}.__file__, "
                                   "os.getcwd(), sep='|')").strip().split("|")
        assert value == "installed by alice"
        # Its own scripts and child processes see it too.
        assert run(a, f"!python -c 'import {PACKAGE}; print({PACKAGE}.VALUE)'").strip() == "installed by alice"
    site = Path(where).parents[4]
    assert site.name == "site-default" and site.parent == Path(cwd).parent
    info = os.stat(site)
    # alice's, closed to others, on her own disk (its limit counts it).
    assert info.st_uid not in (0, os.getuid()) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_dev == os.stat(site.parent).st_dev != os.stat(sites.server.tmp).st_dev
    assert not Path(cwd).exists()  # the session folder went with the lease; the site stays
    with sites.session(sites.alice) as a:
        assert run(a, f"import {PACKAGE}; print({PACKAGE}.VALUE)").strip() == "installed by alice"
    with sites.session(sites.bob) as b:
        result = b.execute(f"import {PACKAGE}", on_output=quiet)
        assert result.error is not None and result.error.ename == "ModuleNotFoundError"


def test_a_hostile_cell_cannot_read_or_write_another_users_site_or_the_shared_environment(
        sites: Sites, here: Path) -> None:
    with sites.session(sites.alice) as a:
        install(a, sites.wheel)
        where = run(a, f"import {PACKAGE}; print({PACKAGE}.__file__)").strip()
        site = str(Path(where).parents[4])
        with sites.session(sites.bob) as b:
            attacks = {
                "list": f"os.listdir({site!r})",
                "read": f"open({where!r}).read()",
                "write": f"open(os.path.join({os.path.dirname(where)!r}, 'evil.py'), 'w')",
                "pth": f"open(os.path.join({str(Path(where).parents[1])!r}, 'evil.pth'), 'w')",
                "move": f"os.rename({site!r}, {site + '-mine'!r})",
                "shared": "open(os.path.join(__import__('site').getsitepackages()[0], 'evil.pth'), 'w')",
            }
            for name, attack in attacks.items():
                out = run(b, f"import os\ntry:\n    {attack}\n    print('done')\nexcept PermissionError:\n"
                             "    print('refused')")
                assert out.strip() == "refused", name
            # bob's own install goes to his own site, not hers nor the shared environment.
            assert "Successfully installed" in install(b, sites.wheel)
            mine = run(b, f"import {PACKAGE}; print({PACKAGE}.__file__)").strip()
            assert Path(mine).parents[4].name == "site-default" and not mine.startswith(site)
            run(b, "%rgpu_env reset")
        # Her session is untouched.
        out = run(a, f"import os; print({PACKAGE}.VALUE, os.path.exists({where!r}))")
        assert out.split() == ["installed", "by", "alice", "True"]


def test_gpu_env_reset_empties_the_site_and_says_what_it_removed(sites: Sites, here: Path) -> None:
    with sites.session(sites.alice) as a:
        install(a, sites.wheel)
        assert f"{PACKAGE} 1.0" in run(a, "%rgpu_env show")
        out = run(a, "%rgpu_env reset")
        assert f"removed 1 package(s) from your own site ({PACKAGE} 1.0;" in out
        assert "no packages installed" in run(a, "%rgpu_env show")
        assert "held no packages" in run(a, "%rgpu_env reset")
    with sites.session(sites.alice) as a:
        result = a.execute(f"import {PACKAGE}", on_output=quiet)
        assert result.error is not None and result.error.ename == "ModuleNotFoundError"
        # And installing again works in the emptied site.
        install(a, sites.wheel)
        assert run(a, f"import {PACKAGE}; print({PACKAGE}.VALUE)").strip() == "installed by alice"
        run(a, "%rgpu_env reset")


def test_a_site_its_user_locked_says_why_and_pip_installs_for_the_session(sites: Sites, here: Path) -> None:
    """A site that cannot be made ready (here: its own user took away its mode)
    leaves pip working, for the session only; what went wrong is said where it is
    asked, never in a cell that did not ask."""
    with sites.session(sites.alice) as a:
        site = run(a, "%rgpu_env show").split(": ", 2)[2].splitlines()[0]
        run(a, f"import os; os.chmod({site!r}, 0)")
    try:
        with sites.session(sites.alice) as a:
            assert run(a, "print('first')") == "first\n"
            out = install(a, sites.wheel)
            assert f"installed for this session only: your own site for packages at {site} could not be made " \
                   "ready: [Errno 13] Permission denied" in out
            assert run(a, f"import {PACKAGE}; print({PACKAGE}.VALUE)") == "installed by alice\n"
            shown = run(a, "%rgpu_env show")
            assert "(for this session only)" in shown and f"{site} could not be made ready" in shown
    finally:
        with sites.session(sites.alice) as a:
            run(a, f"import os; os.chmod({site!r}, 0o700)")  # hers: she may
    assert any(f"alice's lease: your own site for packages at {site} could not be made ready" in line
               for line in sites.server.log)


def test_a_site_outlives_a_server_restart(sites: Sites, here: Path) -> None:
    with sites.session(sites.alice) as a:
        install(a, sites.wheel)
    sites.server.stop()
    sites.server = sites.make_server().start()  # the same store, session root and users' disks
    with sites.session(sites.alice) as a:
        assert run(a, f"import {PACKAGE}; print({PACKAGE}.VALUE)").strip() == "installed by alice"
        assert f"({PACKAGE} 1.0;" in run(a, "%rgpu_env reset")


def test_the_servers_pip_settings_reach_workers_and_nothing_else_of_its_environment(sites: Sites) -> None:
    with sites.session(sites.bob) as b:
        env = run(b, "import os\nfor k in sorted(os.environ):\n    print(k, os.environ[k], sep='=')")
    seen = dict(line.split("=", 1) for line in env.splitlines())
    assert seen["PIP_INDEX_URL"] == MIRROR
    assert seen["PIP_EXTRA_INDEX_URL"] == EXTRA  # from the server's pip.conf, which the worker cannot read
    assert seen["PIP_PROGRESS_BAR"] == "off"
    assert seen["PIP_DISABLE_PIP_VERSION_CHECK"] == "1"
    # Settings that would install elsewhere, or point at the server's files, stay behind.
    for name in ("PIP_TARGET", "PIP_CONFIG_FILE", "PIP_CACHE_DIR", SECRET):
        assert name not in seen, name


def test_conda_says_in_one_line_why_it_does_not_install(sites: Sites) -> None:
    with sites.session(sites.bob) as b:
        out = run(b, "%conda install tabulate")
    assert out.count("\n") == 1 and "%conda does not install here" in out and "%pip install" in out
