"""The ublkml test bed: a real ublk kernel (Debian's 6.12) under qemu, for hosts without one.

Public API (implemented in :mod:`ublk_driver.testbed._vm`; see ``docs/testbed.md``):

* :func:`provision` -- download and cache the kernel and initramfs (idempotent).
* :func:`run` -- boot the test bed, run one command in it, get a :class:`VmResult`.
* :func:`native_ublk_available`, :func:`in_vm` -- where are we?
* :func:`vm_main` -- the ``ublkml vm provision|run|info`` command line.

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
    native_ublk_available,
    provision,
    run,
    vm_main,
)

__all__ = [
    "TestbedError",
    "TestbedImage",
    "TestbedTimeout",
    "VmResult",
    "cache_dir",
    "find_image",
    "in_vm",
    "native_ublk_available",
    "provision",
    "run",
    "vm_main",
]
