"""Server hooks: optional behaviour that other packages add to a served device.

A hook is a :class:`ServerHook` subclass named by an entry point in the group
``ublkml.server_hooks`` (the models' scorer is one).  ``ublkml add`` and
``ublkml recover`` offer every hook's options, build the hooks the user asked
for before the device exists (so that a bad option creates nothing), let them
adjust the server's configuration, and call them once the device is live and
after the server has stopped.  The driver knows hooks only through this class.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ublk_driver.server import Server, ServerConfig
    from ublk_driver.targets.base import Backend

HOOKS_GROUP = "ublkml.server_hooks"


class ServerHook:
    """Base class of a hook; every method but :meth:`from_args` is optional."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this hook's options to ``ublkml add``."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, target_type: str) -> ServerHook | None:
        """The hook the parsed options ask for on a ``target_type`` device, or None.
        Raise a :class:`~ublk_driver.core.errors.UblkError` to refuse the options."""
        raise NotImplementedError

    def configure(self, config: ServerConfig, backend: Backend) -> ServerConfig:
        """The server's configuration as this hook needs it (default: unchanged)."""
        return config

    def started(self, server: Server) -> None:
        """The device is live."""

    def stopped(self) -> None:
        """The server has stopped (also after a failed start)."""


def hook_classes() -> list[type[ServerHook]]:
    """Every installed hook class, in entry-point order."""
    from importlib import metadata  # seconds in the TCG test bed: only `add` needs it

    classes = []
    for ep in metadata.entry_points(group=HOOKS_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, ServerHook)):
            raise TypeError(f"entry point {ep.name} = {ep.value} in {HOOKS_GROUP} is not a "
                            "ServerHook subclass")
        classes.append(cls)
    return classes
