"""How a sandbox hides the server's files: the bubblewrap arguments alone.

``tests/server/test_isolation_unprivileged.py`` tries the same from a real
cell; these cover the layouts a real host may have (a virtual environment
beside the store, a store in a checkout, a key that is a link, a store
directly in a system folder).
"""

from __future__ import annotations

from pathlib import Path

from remote_gpu_server.isolation.sandbox import SandboxLayout, bubblewrap_argv


def pairs(argv: list[str], flag: str) -> list[tuple[str, ...]]:
    """The arguments of each ``flag`` in ``argv``, in order, with their places."""
    width = {"--tmpfs": 1, "--ro-bind": 2}[flag]
    return [(str(i), *argv[i + 1:i + 1 + width]) for i, arg in enumerate(argv) if arg == flag]


def test_a_data_folder_is_covered_and_the_python_inside_it_bound_back(tmp_path: Path) -> None:
    bound = tmp_path / "opt"  # stands for /opt, bound read-only into every sandbox
    data, venv = bound / "rgpu", bound / "rgpu" / "venv"
    (data / "tls").mkdir(parents=True)
    venv.mkdir()
    (data / "rgpu.sqlite3").write_text("store")
    (data / "tls" / "key.pem").write_text("key")
    keys = bound / "keys"
    keys.mkdir()
    (keys / "server.key").write_text("key")
    (keys / "live.key").symlink_to(keys / "server.key")
    outside = tmp_path / "elsewhere" / "secret"  # in nothing the sandbox binds
    outside.parent.mkdir()
    outside.write_text("secret")
    argv = bubblewrap_argv("bwrap", SandboxLayout(
        writable=(), hidden=(data, data / "rgpu.sqlite3", keys / "live.key", outside),
        readable=(bound, venv)))
    covered = [(i, path) for i, path in pairs(argv, "--tmpfs") if path.startswith(str(tmp_path))]
    assert [path for _, path in covered] == [str(data)]
    bound_back = [i for i, src, dst in pairs(argv, "--ro-bind") if src == dst == str(venv)]
    assert len(bound_back) == 1 and int(bound_back[0]) > int(covered[0][0])  # after the cover
    nulled = {dst for _, src, dst in pairs(argv, "--ro-bind") if src == "/dev/null"}
    # The link and what it names; not the store (its folder is covered), nothing outside.
    assert nulled == {str(keys / "live.key"), str(keys / "server.key")}


def test_a_store_in_a_python_folder_is_hidden_file_by_file(tmp_path: Path) -> None:
    checkout = tmp_path / "opt" / "remote-gpu-kernel"  # `rgpu serve --db ./rgpu.sqlite3` in a checkout
    checkout.mkdir(parents=True)
    store = checkout / "rgpu.sqlite3"
    store.write_text("store")
    argv = bubblewrap_argv("bwrap", SandboxLayout(writable=(), hidden=(checkout, store),
                                                  readable=(tmp_path / "opt", checkout)))
    order = {(src, dst): int(i) for i, src, dst in pairs(argv, "--ro-bind")}
    assert order[(str(checkout), str(checkout))] < order[("/dev/null", str(store))]


def test_a_system_folder_is_never_covered_whole() -> None:
    # A store directly in /etc or /opt (`--db /opt/rgpu.sqlite3`) has that folder for its data folder.
    argv = bubblewrap_argv("bwrap", SandboxLayout(writable=(), hidden=(Path("/etc"), Path("/opt")),
                                                  readable=()))
    assert not {path for _, path in pairs(argv, "--tmpfs")} & {"/etc", "/opt"}
