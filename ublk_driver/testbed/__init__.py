"""The ublkml test bed: a real ublk kernel (Debian's 6.12) under qemu, for hosts without one.

Public API (implemented in :mod:`ublk_driver.testbed._vm`; see ``docs/testbed.md``):

* :func:`provision` -- download and cache the kernel and initramfs (idempotent).
* :func:`run` -- boot the test bed, run one command in it, get a :class:`VmResult`.
* :func:`native_ublk_available`, :func:`in_vm`, :func:`info` -- where are we?
* :func:`needs_testbed`, :func:`run_in_testbed` (:mod:`ublk_driver.testbed.where`)
  -- run a command that needs ublk here, or re-run it in the test bed.

The ``ublkml vm provision|run|info`` command is :mod:`ublk_driver.testbed.cli`.

The pytest integration lives in :mod:`ublk_driver.testbed.pytest_plugin` and is
not imported here, so that this package does not need pytest.
"""

from ublk_driver.testbed._vm import (
    TestbedError,
    TestbedImage,
    TestbedTimeout,
    VmResult,
    cache_dir,
    find_image,
    in_vm,
    info,
    native_ublk_available,
    provision,
    run,
)
from ublk_driver.testbed.where import (
    TESTBED_FAILED,
    TestbedRun,
    TestbedRunError,
    needs_testbed,
    run_in_testbed,
)

__all__ = [
    "TESTBED_FAILED",
    "TestbedError",
    "TestbedImage",
    "TestbedRun",
    "TestbedRunError",
    "TestbedTimeout",
    "VmResult",
    "cache_dir",
    "find_image",
    "in_vm",
    "info",
    "native_ublk_available",
    "needs_testbed",
    "provision",
    "run",
    "run_in_testbed",
]
