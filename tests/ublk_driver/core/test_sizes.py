"""Human size parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ublk_driver.core.errors import ConfigError
from ublk_driver.core.sizes import format_size, parse_size


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("512K", 512 << 10),
                                             ("64M", 64 << 20), ("1G", 1 << 30),
                                             ("2GiB", 2 << 30), ("1t", 1 << 40)])
def test_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1", "12Q", "1 G B"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


@given(st.integers(0, 1 << 50))
def test_format_roundtrip(n: int) -> None:
    assert parse_size(format_size(n)) == n
