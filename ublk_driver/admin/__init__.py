"""A running server's admin socket: one Unix stream socket per device.

``ublkml status | fault | leg`` (:mod:`ublk_driver.admin.cli`) and the kernel
agent use it to ask a server about its device, inject faults and change
mirror legs.  It is the server's own socket, not the kernel's
``/dev/ublk-control`` (that one is :mod:`ublk_driver.control`).

- :mod:`~ublk_driver.admin.paths`: where the socket is
  (``$UBLKML_STATE_DIR/<dev_id>.sock``, default ``/run/ublkml``);
- :mod:`~ublk_driver.admin.protocol`: JSON lines, ops, limits, errors;
- :mod:`~ublk_driver.admin.server`: :class:`AdminServer`, run by the server;
- :mod:`~ublk_driver.admin.client`: :class:`AdminClient`.

``ControlServer``, ``ControlClient``, ``ControlChannelError``... are aliases of
these names, kept for existing callers.
"""

from ublk_driver.admin.client import AdminClient, ControlClient
from ublk_driver.admin.paths import (
    default_state_dir,
    fallback_path,
    fs_type,
    local_path,
    socket_path,
)
from ublk_driver.admin.protocol import (
    LEG_STATES,
    MAX_ANSWER,
    MAX_LINE,
    OPS,
    AdminAccessError,
    AdminError,
    AdminTimeoutError,
    BadRequest,
    ControlAccessError,
    ControlChannelError,
    ControlTimeoutError,
    RequestFailedError,
    ServerUnreachableError,
    encode,
    parse_request,
)
from ublk_driver.admin.server import (
    IO_TIMEOUT,
    JOBS_KEPT,
    MAX_CLIENTS,
    Administered,
    AdminServer,
    Controlled,
    ControlServer,
    Job,
)

__all__ = [
    "IO_TIMEOUT", "JOBS_KEPT", "LEG_STATES", "MAX_ANSWER", "MAX_CLIENTS", "MAX_LINE", "OPS",
    "AdminAccessError", "AdminClient", "AdminError", "AdminServer", "AdminTimeoutError",
    "Administered", "BadRequest", "ControlAccessError", "ControlChannelError", "ControlClient",
    "ControlServer", "ControlTimeoutError", "Controlled", "Job", "RequestFailedError",
    "ServerUnreachableError", "default_state_dir", "encode", "fallback_path", "fs_type",
    "local_path", "parse_request", "socket_path",
]
