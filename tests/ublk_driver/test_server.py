"""ublk_driver.server without a kernel: how a server chooses queue threads or processes."""

from __future__ import annotations

import pytest

from examples.ramdisk import RamDisk
from examples.zeros import ReadOnlyZeros
from ublk_driver.core.errors import ConfigError
from ublk_driver.server import ServerConfig, use_queue_processes
from ublk_driver.targets import NullTarget, PluginBackend

SIZE = 1 << 20


def _config(queues: int, procs: bool | None = None, *, scoring: bool = False) -> ServerConfig:
    return ServerConfig(queues=queues, queue_processes=procs, summaries=scoring)


def test_default_is_processes_for_a_fork_safe_plugin_with_several_queues() -> None:
    ram = PluginBackend(RamDisk(SIZE))
    assert RamDisk.fork_safe
    assert use_queue_processes(ram, _config(2)) is True
    # One queue gains nothing from a process; scoring needs the threads' records.
    assert use_queue_processes(ram, _config(1)) is False
    assert use_queue_processes(ram, _config(2, scoring=True)) is False
    # A plug-in that is not fork-safe, and native targets, keep threads.
    assert not ReadOnlyZeros.fork_safe
    assert use_queue_processes(PluginBackend(ReadOnlyZeros(SIZE)), _config(2)) is False
    assert use_queue_processes(NullTarget(SIZE), _config(2)) is False


def test_an_explicit_choice_wins_and_processes_are_checked() -> None:
    ram = PluginBackend(RamDisk(SIZE))
    assert use_queue_processes(ram, _config(2, False)) is False
    assert use_queue_processes(ram, _config(1, True)) is True
    with pytest.raises(ConfigError, match="is not fork_safe"):
        use_queue_processes(PluginBackend(ReadOnlyZeros(SIZE)), _config(2, True))
    with pytest.raises(ConfigError, match="runs in C"):
        use_queue_processes(NullTarget(SIZE), _config(2, True))
    with pytest.raises(ConfigError, match="needs queue threads"):
        _config(2, True, scoring=True).validate()
