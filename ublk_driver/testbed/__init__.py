"""The ublkml test bed: a real ublk kernel (Debian's 6.12) under qemu, for hosts without one.

Public API (implemented in :mod:`ublk_driver.testbed._vm`; see ``docs/testbed.md``):

* :func:`provision` -- download and cache the kernel and initramfs (idempotent).
* :func:`run` -- boot the test bed, run one command in it, get a :class:`VmResult`.
* :func:`native_ublk_available`, :func:`in_vm`, :func:`info` -- where are we?
* :func:`needs_testbed`, :func:`run_in_testbed` (:mod:`ublk_driver.testbed.where`)
  -- run a command that needs ublk here, or re-run it in the test bed.
* :data:`EMULATED_DRIVES` -- the NVMe and SATA drives qemu gives every boot;
  inside the guest, :func:`emulated_drives` finds them and
  :func:`set_smart_critical_warning` turns an NVMe drive's SMART health
  critical through qemu's QMP (:mod:`ublk_driver.testbed.emulator`).

The ``ublkml vm provision|run|info`` command is :mod:`ublk_driver.testbed.cli`.

The pytest integration lives in :mod:`ublk_driver.testbed.pytest_plugin` and is
not imported here, so that this package does not need pytest.
"""

from ublk_driver.testbed._vm import (
    EMULATED_DRIVES,
    DriveSpec,
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
from ublk_driver.testbed.emulator import (
    EmulatedDrive,
    EmulatorError,
    emulated_drives,
    qmp_execute,
    set_smart_critical_warning,
    smart_critical_warning,
)
from ublk_driver.testbed.where import (
    TESTBED_FAILED,
    TestbedRun,
    TestbedRunError,
    needs_testbed,
    run_in_testbed,
)

__all__ = [
    "EMULATED_DRIVES",
    "TESTBED_FAILED",
    "DriveSpec",
    "EmulatedDrive",
    "EmulatorError",
    "TestbedError",
    "TestbedImage",
    "TestbedRun",
    "TestbedRunError",
    "TestbedTimeout",
    "VmResult",
    "cache_dir",
    "emulated_drives",
    "find_image",
    "in_vm",
    "info",
    "native_ublk_available",
    "needs_testbed",
    "provision",
    "qmp_execute",
    "run",
    "run_in_testbed",
    "set_smart_critical_warning",
    "smart_critical_warning",
]
