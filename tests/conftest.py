"""Shared fixtures.

Tests marked ``ublk`` need the kernel's ublk driver: they run natively where
``/dev/ublk-control`` exists and otherwise inside the project's qemu test bed
(see ublk_driver/testbed/pytest_plugin.py); they never silently skip.
"""

pytest_plugins = ["ublk_driver.testbed.pytest_plugin"]
