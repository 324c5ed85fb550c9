"""Shared fixtures.

Tests marked ``ublk`` need the kernel's ublk driver: they run natively where
``/dev/ublk-control`` exists and otherwise inside the project's qemu test bed
(see ublk_driver/testbed/pytest_plugin.py); they never silently skip.

Soak-sized counts (hundreds of add/delete cycles, tens of SIGKILLs) run only
with ``--soak`` (``make soak``); without it the same tests run smaller counts
(``make test``).  A test asks for its count with the ``soak_count`` fixture,
which also marks it ``soak``: ``pytest --soak -m soak`` runs exactly those
tests, soak-sized.  The test bed's guest pytest gets ``--soak`` too.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from ublk_driver.testbed import emulator
from ublk_driver.testbed.emulator import EmulatedDrive

pytest_plugins = ["ublk_driver.testbed.pytest_plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", default=False,
        help="run the soak-sized counts of the tests that have them (marked soak; "
        "`make soak`); without it they run their smaller counts",
    )


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "soak_count" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.soak)


@pytest.fixture
def soak_count(request: pytest.FixtureRequest) -> Callable[[int, int], int]:
    """``soak_count(small, large)``: ``large`` with ``--soak``, else ``small``."""
    soak = bool(request.config.getoption("soak"))

    def count(small: int, large: int) -> int:
        assert 0 < small <= large, (small, large)
        return large if soak else small

    return count


@pytest.fixture(autouse=True)
def _sigpipe_ignored() -> Iterator[None]:
    """Every test starts and ends with SIGPIPE ignored, as Python starts.

    The CLIs' main() sets SIG_DFL (so that `ublkml list | head` ends
    quietly); a test that calls main() in-process would otherwise leave it
    so, and the next test whose peer closes a socket (the control channel's)
    kills the whole pytest run with SIGPIPE (seen in a CI run: "Broken pipe").
    """
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


@pytest.fixture
def emulated_drives() -> list[EmulatedDrive]:
    """The test bed's emulated drives (two NVMe, one SATA; see
    ublk_driver.testbed.emulator).  Use it in ``@pytest.mark.ublk`` tests.

    Where they are missing (the host, or a guest booted without them) the
    test fails, never skips: a test that asks for real drives must get them.
    A test that turns a drive critical sets it back to 0: the session's tests
    share the drives.
    """
    try:
        return emulator.emulated_drives()
    except emulator.EmulatorError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)
