"""Targets: where a device's I/O goes."""

from ublk_driver.targets.base import Backend, Capabilities, CompletionPath, Target
from ublk_driver.targets.mirror import LegInfo, MirrorTarget
from ublk_driver.targets.native import LoopTarget, MemTarget, NullTarget
from ublk_driver.targets.plugin import PluginBackend, load_plugin

__all__ = ["Backend", "Capabilities", "CompletionPath", "LegInfo", "LoopTarget", "MemTarget",
           "MirrorTarget", "NullTarget", "PluginBackend", "Target", "load_plugin"]
