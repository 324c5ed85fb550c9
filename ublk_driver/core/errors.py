"""The exceptions ublkml raises.

One root (:class:`UblkError`); each subclass also inherits the builtin it
refines (``OSError``, ``ValueError``), so callers can catch either.  Messages
say what to do, because the CLI prints them as they are.
"""

from __future__ import annotations

import errno as _errno
import os


class UblkError(Exception):
    """Root of every error ublkml raises on purpose."""


class _OSErrorText(OSError):
    """An OSError that prints its message alone (the CLI shows it as is)."""

    def __str__(self) -> str:
        return str(self.strerror)


class ConfigError(UblkError, ValueError):
    """A parameter is out of range or inconsistent (nothing was created)."""


class DriverUnavailableError(UblkError, _OSErrorText):
    """The kernel's ublk driver cannot be reached from this process."""


class ControlError(UblkError, OSError):
    """A ublk control command failed; ``errno`` is the kernel's answer."""

    def __init__(self, command: str, err: int, message: str | None = None) -> None:
        self.command = command
        text = message or f"ublk {command} failed: {os.strerror(err)} (errno {err})"
        super().__init__(err, text)

    def __str__(self) -> str:
        return str(self.args[1])


class DeviceNotFoundError(ControlError):
    """No ublk device has that id."""


class TargetError(UblkError, _OSErrorText):
    """A target could not be opened or set up (missing backing file, ...)."""


class PluginError(UblkError, ValueError):
    """A Python plug-in cannot be loaded or does not follow the contract."""


class IoError(UblkError, _OSErrorText):
    """Raise from a plug-in method to fail one I/O with a chosen errno.

    Any other exception fails the I/O with EIO; the device keeps serving.
    """

    def __init__(self, err: int = _errno.EIO, message: str | None = None) -> None:
        super().__init__(err, message or os.strerror(err))
