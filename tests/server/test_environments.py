"""Named environments on a real server: two real virtual environments (np1 with
numpy 1.26.4, np2 with numpy 2.x; see :mod:`environments`) beside the server's
own Python, on a root server whose workers run as uids of their own.
A notebook's numpy 2.x in np1 is told apart in one line, and an array it
pushes there names the difference instead of pickle's traceback.

Each environment gets a warm worker of its own (three slots, three
environments); a lease in one takes that worker. A user's ``%pip install``
in np1 lands in their np1 site; a hostile cell in np1 can write neither into
the environment nor into another user's site.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from remote_gpu_core.errors import VersionDifference
from remote_gpu_kernel import Client, LeaseError
from remote_gpu_kernel.cli import main as rgpu
from remote_gpu_kernel.api import ApiClient
from servers import ServerProcess
from waiting import wait_for
from unprivileged import launcher
from test_isolation import quiet, run
from wheels import tiny_wheel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root server isolates with uids: run as root")

RGPU = str(Path(sys.executable).with_name("rgpu"))
PACKAGE = "rgpu_env_probe"


@dataclass
class Envs:
    server: ServerProcess
    pythons: dict[str, Path]
    alice: str
    bob: str

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = ApiClient(self.server.url, self.alice).status()
        return status

    def warm_in(self, env: str) -> list[str]:
        return [s["id"] for s in self.status()["slots"] if s["warm"] and s["env"] == env]


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory, test_environments: dict[str, Path]) -> Iterator[Envs]:
    tmp = tmp_path_factory.mktemp("environments")
    server = ServerProcess(tmp, "cpu:3", "--worker-memory", "1G",
                           *(f"--env={name}={python}" for name, python in test_environments.items()))
    alice, bob = server.token("alice"), server.token("bob")
    server.start()
    try:
        world = Envs(server, test_environments, alice, bob)
        wait_for(lambda: all(world.warm_in(env) for env in ("default", "np1", "np2")), timeout=120,
                 what="a warm worker in each environment")
        yield world
    finally:
        server.stop()


def test_each_environment_has_a_warm_worker_and_a_lease_takes_it(envs: Envs) -> None:
    expected = {"np1": "1.26.4", "np2": None, "default": None}
    for env, version in expected.items():
        (warm,) = envs.warm_in(env)
        notices: list[str] = []
        with Client(envs.server.url, envs.alice).session(env=env, on_notice=notices.append) as session:
            out = run(session, "import sys, numpy; print(sys.executable, numpy.__version__)").split()
            assert session.slots == [warm]  # the slot whose worker was warm in this environment
            status = envs.status()
            (mine,) = [s for s in status["sessions"] if s["mine"]]
            assert mine["env"] == env
            assert [s["env"] for s in status["slots"] if s["id"] == warm] == [env]
        assert not [n for n in notices if "starting a worker" in n]
        if env == "default":
            assert out[0] == sys.executable or Path(out[0]).resolve() == Path(sys.executable).resolve()
        else:
            assert out[0] == str(envs.pythons[env])
        if version is not None:
            assert out[1] == version
        elif env == "np2":
            assert out[1].startswith("2.")
    # Each released slot is warmed again, one environment each.
    wait_for(lambda: all(envs.warm_in(env) for env in expected), timeout=120, what="the pool warmed again")


def test_the_status_lists_each_environment_with_its_python_and_packages(envs: Envs) -> None:
    listed = {e["name"]: e for e in envs.status()["envs"]}
    assert list(listed) == ["default", "np1", "np2"]
    assert listed["np1"]["python"] == str(envs.pythons["np1"])
    assert listed["np1"]["packages"]["numpy"] == "1.26.4"
    assert listed["np2"]["packages"]["numpy"].startswith("2.")
    assert listed["np1"]["version"] == ".".join(map(str, sys.version_info[:3]))
    out = subprocess.run([RGPU, "envs", "--url", envs.server.url], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RGPU_TOKEN": envs.alice, "COLUMNS": "400"}, check=True).stdout
    assert "np1" in out and "1.26.4" in out and str(envs.pythons["np2"]) in out


def test_an_unknown_environment_is_refused_naming_those_there_are(envs: Envs) -> None:
    with pytest.raises(LeaseError, match=r"no environment 'np3'.*default, np1, np2"):
        Client(envs.server.url, envs.alice).session(env="np3")


def test_a_numpy_2_notebook_in_np1_hears_of_the_difference_and_a_push_of_an_array_names_it(envs: Envs) -> None:
    import numpy

    notices: list[str] = []
    with Client(envs.server.url, envs.alice).session(env="np1", on_notice=notices.append) as session:
        said = "\n".join(notices)
        assert f"numpy {numpy.__version__} here, 1.26.4 on the GPU server" in said
        assert said.rstrip().endswith("; environment `default` matches")  # this Python's, named by the Welcome
        with pytest.raises(VersionDifference) as raised:
            session.push(a=numpy.arange(3))
        assert str(raised.value).startswith(
            f"cannot unpickle 'a' on the GPU server: numpy {numpy.__version__} here, 1.26.4 on the GPU server")
        assert "Traceback" not in str(raised.value)
        assert run(session, "print('a' in globals())") == "False\n"  # nothing set; the session goes on
    out = io.StringIO()
    with redirect_stdout(out):
        code = rgpu(["env", "diff", "np1", "--url", envs.server.url, "--token", envs.alice])
    assert code == 1
    (row,) = [line.split() for line in out.getvalue().splitlines() if "numpy" in line]
    assert row == ["!", "numpy", numpy.__version__, "1.26.4"]


def test_pip_install_in_np1_goes_to_the_users_np1_site_not_defaults(envs: Envs, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tiny_wheel(tmp_path, PACKAGE, "1.0", "installed in np1")
    monkeypatch.chdir(tmp_path)
    client = Client(envs.server.url, envs.alice)
    with client.session(env="np1") as session:
        session.upload(wheel.name)
        out = run(session, f"%pip install --no-index {wheel.name}")
        assert f"Successfully installed {PACKAGE.replace('_', '-')}-1.0" in out
        value, where = run(session, f"import {PACKAGE}; print({PACKAGE}.VALUE, {PACKAGE}.__file__, "
                                    "sep='|')").strip().split("|")
        assert value == "installed in np1"
        # The site's python is np1's: %pip and !pip install for np1's Python.
        assert run(session, "!python -c 'import numpy; print(numpy.__version__)'").strip() == "1.26.4"
    site = Path(where).parents[4]
    assert site.name == "site-np1"
    with client.session(env="np1") as again:  # kept for the next np1 session
        assert run(again, f"import {PACKAGE}; print({PACKAGE}.VALUE)").strip() == "installed in np1"
    for env, token in (("default", envs.alice), ("np1", envs.bob)):  # not in default, not for bob
        with Client(envs.server.url, token).session(env=env) as other:
            result = other.execute(f"import {PACKAGE}", on_output=quiet)
            assert result.error is not None and result.error.ename == "ModuleNotFoundError"


def test_a_hostile_cell_in_np1_cannot_write_into_the_environment_or_another_users_site(envs: Envs) -> None:
    with Client(envs.server.url, envs.bob).session(env="np1") as b:
        bob_site = run(b, "import sys; print([p for p in sys.path if 'site-np1' in p][0])").strip()
        with Client(envs.server.url, envs.alice).session(env="np1") as a:
            out = run(a, f"""
import numpy, os, sys
targets = [os.path.join(os.path.dirname(numpy.__file__), 'evil.py'), os.path.join(sys.prefix, 'evil'),
           os.path.join({bob_site!r}, 'evil.py')]
for target in targets:
    try:
        open(target, 'w').write('x')
        print('WROTE', target)
    except OSError as exc:
        print('refused', type(exc).__name__)
""")
            assert "WROTE" not in out and out.count("refused") == 3, out
        assert not (envs.pythons["np1"].parent.parent / "evil").exists()
        assert run(b, "print(6 * 7)") == "42\n"


def test_env_check_says_what_a_bad_interpreter_lacks_and_passes_a_good_one(envs: Envs, tmp_path: Path) -> None:
    good = subprocess.run([RGPU, "env", "check", str(envs.pythons["np1"])], capture_output=True, text=True,
                          timeout=120, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok: workers can run here" in good.stdout
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    bad = subprocess.run([RGPU, "env", "check", str(bare / "bin" / "python")], capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode == 1
    assert "ipykernel is missing" in bad.stdout
    assert f"{bare / 'bin' / 'python'} -m pip install 'ipykernel>=7.4'" in bad.stdout


def test_serve_refuses_an_environment_that_fails_the_check(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    done = subprocess.run([RGPU, "serve", "--db", str(tmp_path / "db.sqlite3"), "--slots", "cpu:1", "--port", "0",
                           "--env", f"bad={bare / 'bin' / 'python'}"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0
    assert "environment bad" in done.stderr and "ipykernel is missing" in done.stderr


def test_a_pool_that_runs_only_np2_warms_np2_and_a_lease_there_gets_it(
        test_environments: dict[str, Path], tmp_path: Path) -> None:
    pythons = {name: python for name, python in test_environments.items()}
    server = ServerProcess(tmp_path, "cpu:2", *(f"--env={name}={python}" for name, python in pythons.items()),
                           "--pool", "np2only=cpu1:env=np2")
    alice = server.token("alice")
    with server:
        api = ApiClient(server.url, alice)
        wait_for(lambda: [(s["id"], s["env"]) for s in api.status()["slots"] if s["warm"]]
                 == [("cpu0", "default"), ("cpu1", "np2")], timeout=120, what="cpu1 warm in np2 only")
        notices: list[str] = []
        with Client(server.url, alice).session(pool="np2only", on_notice=notices.append) as session:
            assert session.slots == ["cpu1"]  # np1 would be warmed there without the pool's env
            assert run(session, "import numpy; print(numpy.__version__)").startswith("2.")
        assert not [n for n in notices if "starting a worker" in n]  # its warm worker
        with pytest.raises(LeaseError, match="pool 'np2only' runs environment\\(s\\) np2, not 'np1'"):
            Client(server.url, alice).session(pool="np2only", env="np1")
    bad = subprocess.run([RGPU, "serve", "--db", str(tmp_path / "bad.sqlite3"), "--slots", "cpu:1", "--port", "0",
                          "--pool", "x=cpu0:env=nope"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0
    assert "--pool x: there is no environment 'nope'" in bad.stderr


def test_a_kernelspec_per_environment_leases_in_that_environment(envs: Envs, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from remote_kernels import KernelDriver, kernel_env

    prefix = tmp_path / "prefix"
    out = subprocess.run([RGPU, "kernel", "install", "--prefix", str(prefix), "--env", "np1"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "remote-gpu-np1" in out
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("remote-gpu-np1")
    assert spec.display_name == "Remote GPU (np1)" and spec.env == {"RGPU_ENV": "np1"}
    driver = KernelDriver(kernel_env(tmp_path, envs.server.url, envs.alice), "remote-gpu-np1").start()
    try:
        ran = driver.run("import numpy; print(numpy.__version__)")
        assert ran.status == "ok" and ran.stdout.strip() == "1.26.4"
    finally:
        driver.shutdown()


def test_a_batch_job_runs_in_the_environment_it_asks_for(envs: Envs, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import numpy, sys\nprint(numpy.__version__, sys.executable)\n")
    env = {**os.environ, "RGPU_TOKEN": envs.alice}
    submitted = subprocess.run([RGPU, "submit", "--url", envs.server.url, "--env", "np1", str(script)],
                               capture_output=True, text=True, timeout=60, env=env, check=True)
    job = int(submitted.stdout.split()[0])
    api = ApiClient(envs.server.url, envs.alice)
    done = wait_for(lambda: (j := api.job(job))["state"] not in ("queued", "running") and j, timeout=120,
                    what="the batch job's end")
    assert done["state"] == "completed" and done["env"] == "np1", done
    assert "".join(o["text"] for o in api.outputs(job)).split() == ["1.26.4", str(envs.pythons["np1"])]
    refused = subprocess.run([RGPU, "submit", "--url", envs.server.url, "--env", "np3", str(script)],
                             capture_output=True, text=True, timeout=60, env=env, check=False)
    assert refused.returncode != 0 and "no environment 'np3'" in refused.stderr


def test_a_parked_session_resumes_in_its_environment(envs: Envs) -> None:
    client = Client(envs.server.url, envs.bob)
    session = client.session(env="np1")
    try:
        run(session, "import numpy\nkept = numpy.arange(3)")
        session.park()
        assert session.parked
        assert run(session, "import numpy; print(numpy.__version__, kept.tolist())") == "1.26.4 [0, 1, 2]\n"
        (mine,) = [s for s in ApiClient(envs.server.url, envs.bob).status()["sessions"] if s["mine"]]
        assert mine["env"] == "np1"
    finally:
        session.release()


def test_a_sandboxed_servers_np1_workers_read_their_environment_and_cannot_write_it(
        tmp_path_factory: pytest.TempPathFactory, test_environments: dict[str, Path]) -> None:
    """A server that is not root: np1's workers run in bubblewrap sandboxes, where
    the environment is bound read-only (its files are the server's uid's here)."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    tmp = tmp_path_factory.mktemp("sandboxed-envs")
    np1 = test_environments["np1"]
    server = ServerProcess(tmp, "cpu:1", "--worker-memory", "1G", f"--env=np1={np1}", launcher=launcher(str(tmp)),
                           env={"RGPU_TEST_EXPOSE": str(np1.parent.parent)})
    token = server.token("alice")
    server.start()
    try:
        assert any("isolated in bubblewrap sandboxes" in line for line in server.log)
        with Client(server.url, token).session(env="np1") as session:
            out = run(session, """
import numpy, os, sys
print(numpy.__version__, sys.executable)
for target in (os.path.join(os.path.dirname(numpy.__file__), 'evil.py'), os.path.join(sys.prefix, 'evil')):
    try:
        open(target, 'w').write('x')
        print('WROTE', target)
    except OSError as exc:
        print('refused', type(exc).__name__)
""").split("\n")
            assert out[0] == f"1.26.4 {np1}"
            assert out[1:3] == ["refused OSError", "refused OSError"], out
    finally:
        server.stop()

