"""The one size parser and the one size formatter (remote_gpu_core.sizes)."""

from __future__ import annotations

import pytest

from remote_gpu_core.sizes import format_size, parse_size


def test_sizes_parse_in_binary_units() -> None:
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("1.5 GB") == 3 << 29 and parse_size("64k") == 64 << 10 and parse_size("4096") == 4096


def test_none_is_a_size_only_where_allowed() -> None:
    assert parse_size("none", allow_none=True) is None and parse_size("Unlimited", allow_none=True) is None
    with pytest.raises(ValueError, match="is not a size: write it like 16G"):
        parse_size("none")


@pytest.mark.parametrize("bad", ["lots", "8X", "-1G", "", "1.2.3G"])
def test_what_is_not_a_size_says_so(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad, allow_none=True)


def test_a_size_below_its_minimum_says_what_it_is_for_and_the_least() -> None:
    with pytest.raises(ValueError, match=r"'1M' is too small for a worker: give it at least 64 MiB"):
        parse_size("1M", minimum=64 << 20, what="a worker")
    with pytest.raises(ValueError, match=r"'1K' is too small: give it at least 4 KiB"):
        parse_size("1K", minimum=4 << 10)


@pytest.mark.parametrize(("size", "text"), [
    (1 << 30, "1 GiB"), (3 << 29, "1.5 GiB"), (512 << 20, "512 MiB"), (1000 << 20, "1000 MiB"),
    (int(12.34 * (1 << 20)), "12.3 MiB"), (64 << 10, "64 KiB"), (300, "300 bytes"), (0, "0 bytes"),
    (5 << 40, "5 TiB"),
])
def test_sizes_print_in_the_largest_unit_with_three_digits_at_most(size: int, text: str) -> None:
    assert format_size(size) == text
