"""Sizes in and out: the one parser of every size a flag or a setting takes,
and the one formatter of every size a message shows.

Binary units throughout: ``K``, ``M``, ``G``, ``T`` are 1024, 1024², ... and
``KiB``/``KB`` mean the same as ``K``; sizes print as ``4 GiB``, ``1.5 GiB``,
``512 MiB``, ``64 KiB`` or ``300 bytes``.
"""

from __future__ import annotations

import re

__all__ = ["NONE_WORDS", "format_size", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_SCALES = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
#: Words that mean "no limit" where a setting allows it.
NONE_WORDS = ("none", "off", "unlimited")


def parse_size(text: str, *, minimum: int = 0, what: str = "", allow_none: bool = False) -> int | None:
    """Bytes in ``"8G"``, ``"512MiB"``, ``"1.5 GB"`` or ``"4096"``.

    With ``allow_none``, one of :data:`NONE_WORDS` gives None. Raises
    ValueError saying what is wrong: not a size, or below ``minimum`` (too
    small for ``what``, when given).
    """
    if allow_none and text.strip().lower() in NONE_WORDS:
        return None
    found = _SIZE.match(text)
    if not found:
        example = "8G, 512M or none" if allow_none else "16G, 512M or 64K"
        raise ValueError(f"{text!r} is not a size: write it like {example}")
    size = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if size < minimum:
        target = f" for {what}" if what else ""
        raise ValueError(f"{text!r} is too small{target}: give it at least {format_size(minimum)}")
    return size


def format_size(size: float) -> str:
    """``4 GiB``, ``1.5 GiB``, ``512 MiB``, ``12.3 MiB``, ``64 KiB``, ``300 bytes``."""
    for unit, scale in _SCALES:
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(size)} bytes"
