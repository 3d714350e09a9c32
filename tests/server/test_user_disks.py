"""Each user's disk for session folders (``--session-disk``): the measure, the modes, the filesystems.

The filesystem tests make real ext4 images and mount them (root only, with
loop devices); each unmounts what it mounted.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_server.isolation.user_disks import DISKS, DiskMode, UserDisks, allocated_bytes, user_key
from servers import unmount_under


def test_a_user_key_is_safe_on_disk_and_tells_lookalike_names_apart() -> None:
    assert user_key("alice").startswith("u-alice-")
    assert user_key("../etc") != user_key("__etc") and "/" not in user_key("../etc")
    assert len(user_key("x" * 500)) < 60 and user_key("alice") == user_key("alice")


def test_use_is_measured_in_blocks_once_per_file_without_following_links(tmp_path: Path) -> None:
    folder = tmp_path / "session"
    folder.mkdir()
    (folder / "data.bin").write_bytes(os.urandom(1 << 20))
    os.link(folder / "data.bin", folder / "same.bin")  # one file, two names
    with open(folder / "sparse.bin", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB long, nothing in it
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(4 << 20))
    (folder / "link").symlink_to(outside)
    used = allocated_bytes([folder])
    assert (1 << 20) <= used < (1 << 20) + (256 << 10)
    assert allocated_bytes([folder, folder / "link", tmp_path / "missing"]) == used


def test_the_mode_follows_what_the_server_may_do(tmp_path: Path) -> None:
    disks = UserDisks("64M", tmp_path)
    disks.start(filesystems=False)
    assert disks.mode is DiskMode.SERVER and disks.limit == 64 << 20
    assert disks.folder_root("alice") == tmp_path and disks.ready("alice") and disks.mount_of("alice") is None
    assert disks.owns("alice", tmp_path / "abc") and not disks.owns("alice", tmp_path / "x" / "abc")
    assert disks.status_json()["enforced_by"] == "server" and "measured by the server" in disks.describe()
    off = UserDisks("none", tmp_path)
    off.start(filesystems=True)
    assert off.mode is DiskMode.NONE and off.limit is None and off.status_json()["enforced_by"] is None
    auto = UserDisks("auto", tmp_path)
    auto.start(filesystems=False)
    assert auto.limit is not None and auto.limit >= 1 << 30
    for bad, said in (("lots", "is not a size"), ("1M", "too small for a user's session folders")):
        with pytest.raises(ValueError, match=f"--session-disk: .*{said}"):
            UserDisks(bad, tmp_path).start(filesystems=False)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounts a filesystem: run as root")
    folder = tmp_path / "sessions"
    folder.mkdir()
    yield folder
    unmount_under(folder)


def test_a_users_filesystem_holds_their_folders_and_refuses_writes_past_it(root: Path) -> None:
    disks = UserDisks("16M", root)
    disks.start(filesystems=True)
    assert disks.mode is DiskMode.FILESYSTEM, disks.reason
    assert not disks.ready("alice")
    folder = disks.folder_root("alice")
    try:
        assert folder == root / user_key("alice") and disks.ready("alice") and disks.owns("alice", folder / "s")
        assert os.path.ismount(folder) and stat.S_IMODE(os.stat(folder).st_mode) == 0o711
        image = root / DISKS / f"{user_key('alice')}.ext4"
        assert image.stat().st_size == 16 << 20 and stat.S_IMODE(image.stat().st_mode) == 0o600
        device, where, rdev = disks.mount_of("alice") or ("", "", 0)
        assert where == str(folder) and os.stat(device).st_rdev == os.stat(folder).st_dev == rdev
        with pytest.raises(OSError) as full, open(folder / "fill.bin", "wb") as f:
            for _ in range(32):
                f.write(b"x" * (1 << 20))
                f.flush()
        assert full.value.errno == errno.ENOSPC
        assert (disks.used("alice") or 0) > 12 << 20 and (disks.capacity("alice") or 0) <= 16 << 20
        assert os.statvfs(root).f_bavail > 0  # the disk around it was never at stake
        (folder / "fill.bin").unlink()
        (folder / "kept.txt").write_text("still here")
    finally:
        disks.close()
    assert not os.path.ismount(folder)
    # The next start finds the image, grown to a new --session-disk, with its files.
    again = UserDisks("24M", root)
    again.start(filesystems=True)
    try:
        folder = again.folder_root("alice")
        assert (folder / "kept.txt").read_text() == "still here"
        assert (again.capacity("alice") or 0) > 20 << 20
    finally:
        again.close()
