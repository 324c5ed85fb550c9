"""The ``served`` fixture: a fresh admin socket in front of a FakeServer per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ublk_driver.admin.doubles import Served, serve


@pytest.fixture
def served() -> Iterator[Served]:
    with serve() as s:
        yield s
