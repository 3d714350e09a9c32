"""Tiny pure-Python wheels made by hand, for tests that install packages
without the network (``pip install --no-index``)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

__all__ = ["tiny_wheel"]


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def tiny_wheel(folder: Path, name: str, version: str = "1.0", value: str = "hello",
               source: str | None = None) -> Path:
    """A wheel of package ``name`` (an importable module name) whose ``VALUE`` is
    ``value`` (or whose ``__init__.py`` is ``source``), written into ``folder``; its path."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": (f"VALUE = {value!r}\n" if source is None else source).encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": f"{name}\n".encode(),
    }
    record = [_record_line(p, d) for p, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel
