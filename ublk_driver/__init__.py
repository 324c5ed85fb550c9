"""ublk_driver: Linux ublk block devices served from Python.

Layers, each with one job (docs/architecture.md):

- :mod:`ublk_driver.core` — errors, sizes and CLI plumbing, at the bottom;
- :mod:`ublk_driver.uapi` — the kernel's structures and opcodes, as bytes;
- :mod:`ublk_driver._bindings` — the only user of cffi (engine in ``csrc/``);
- :mod:`ublk_driver.control` — ``/dev/ublk-control`` commands;
- :mod:`ublk_driver.queue` — one thread and io_uring per queue;
- :mod:`ublk_driver.server` — a device's lifecycle around a target;
- :mod:`ublk_driver.targets` — null, mem, loop, mirror and the Python plug-in API;
- :mod:`ublk_driver.admin` — the server's admin socket;
- :mod:`ublk_driver.drives` — which drives a path (a backing file) lands on;
- :mod:`ublk_driver.hooks` — server hooks found through entry points.
"""

from ublk_driver.control import Control, bdev_path, cdev_path, driver_available
from ublk_driver.core.errors import (
    ConfigError,
    ControlError,
    DeviceNotFoundError,
    DriverUnavailableError,
    IoError,
    PluginError,
    TargetError,
    UblkError,
)
from ublk_driver.core.sizes import format_size, parse_size
from ublk_driver.drives import Drive, DriveLookupError, drives_of, why_no_drive
from ublk_driver.server import Server, ServerConfig
from ublk_driver.targets import (
    Capabilities,
    LoopTarget,
    MemTarget,
    NullTarget,
    PluginBackend,
    Target,
    load_plugin,
)

__all__ = [
    "Capabilities",
    "ConfigError",
    "Control",
    "ControlError",
    "DeviceNotFoundError",
    "Drive",
    "DriveLookupError",
    "DriverUnavailableError",
    "IoError",
    "LoopTarget",
    "MemTarget",
    "NullTarget",
    "PluginBackend",
    "PluginError",
    "Server",
    "ServerConfig",
    "Target",
    "TargetError",
    "UblkError",
    "bdev_path",
    "cdev_path",
    "driver_available",
    "drives_of",
    "format_size",
    "load_plugin",
    "parse_size",
    "why_no_drive",
]
