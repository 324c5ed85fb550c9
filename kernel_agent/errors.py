"""The exceptions the kernel agent raises.

One root (:class:`AgentError`, itself a :class:`ublk_driver.core.errors.UblkError`
so that the ``ublkml`` command line prints it as one line); each subclass also
inherits the builtin it refines, so callers can catch either.  Messages say
what to do.
"""

from __future__ import annotations

from ublk_driver.core.errors import UblkError


class AgentError(UblkError):
    """Root of every error the agent raises on purpose."""


class BpfUnavailableError(AgentError, OSError):
    """eBPF accounting cannot be used here (the agent falls back to sysfs)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "eBPF unavailable"


class UnknownDeviceError(AgentError, LookupError):
    """No such block device, or the agent does not watch it."""


class RegistryError(AgentError, ValueError):
    """A registration is malformed, over its class's limits, or unknown."""


class RingError(AgentError, ValueError):
    """A recommendation ring file is missing, truncated or of another version."""
