"""Shared fixtures.

Tests marked ``ublk`` need the kernel's ublk driver: they run natively where
``/dev/ublk-control`` exists and otherwise inside the project's qemu test bed
(see ublk_driver/testbed/pytest_plugin.py); they never silently skip.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

pytest_plugins = ["ublk_driver.testbed.pytest_plugin"]


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
