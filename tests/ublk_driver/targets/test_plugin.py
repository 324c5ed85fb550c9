"""The plug-in API: loading, capability inference, and dispatch against a model.

The dispatch tests call the handler the queue threads call, with a plain
buffer standing in for the queue's I/O buffer (the one piece not under test).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given, settings

from examples.ramdisk import RamDisk
from examples.zeros import ReadOnlyZeros
from tests.ublk_driver.targets.doubles import Faulty
from tests.ublk_driver.targets.model import Model, operations, payload
from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, PluginError
from ublk_driver.targets import PluginBackend, Target, load_plugin
from ublk_driver.targets.plugin import DEFAULT_TIMEOUT, check_timeout
from ublk_driver.uapi import IoFlag, Op

SIZE = 1 << 20


@settings(max_examples=60, deadline=None)
@given(operations(SIZE, 256 << 10))
def test_ramdisk_plugin_matches_model(ops: list[tuple[int, int, int, int]]) -> None:
    backend = PluginBackend(RamDisk(SIZE))
    handle = backend.handler()
    model = Model(SIZE, backend.capabilities.discard_zeroes)
    buf = memoryview(bytearray(256 << 10))
    for op, off, length, seed in ops:
        if op == Op.WRITE:
            data = payload(seed, off, length)
            buf[:length] = data
            model.apply(op, off, data)
            assert handle(0, op, IoFlag.FUA if seed & 1 else 0, off, length, buf) == length
        elif op == Op.READ:
            assert handle(0, op, 0, off, length, buf) == length
            model.check(off, bytes(buf[:length]))
        elif op == Op.FLUSH:
            assert handle(0, op, 0, 0, 0, buf) == 0
        else:
            assert handle(0, op, 0, off, length, buf) == 0
            model.zero(off, length, is_discard=op == Op.DISCARD)


def test_capabilities_follow_defined_methods() -> None:
    caps = PluginBackend(RamDisk(SIZE)).capabilities
    assert not caps.read_only and caps.flush and caps.fua and caps.discard
    assert caps.write_zeroes and caps.discard_zeroes
    ro = PluginBackend(ReadOnlyZeros(SIZE)).capabilities
    assert ro.read_only and not ro.flush and not ro.discard and not ro.write_zeroes


def test_short_read_fails_the_io_with_eio() -> None:
    backend = PluginBackend(Faulty(SIZE, short_from="4096", short_to="8192"))
    handle = backend.handler()
    buf = memoryview(bytearray(8192))
    assert handle(0, Op.READ, 0, 4096, 4096, buf) == -errno.EIO
    assert handle(0, Op.READ, 0, 0, 4096, buf) == 4096  # elsewhere it still works
    assert backend.io_errors == 1


def test_raising_plugin_fails_the_io_not_the_server() -> None:
    backend = PluginBackend(Faulty(SIZE, raise_from="0", raise_to="512",
                                   eio_from="65536", eio_to="65537"))
    handle = backend.handler()
    buf = memoryview(bytearray(4096))
    assert handle(0, Op.READ, 0, 0, 4096, buf) == -errno.EIO
    assert handle(0, Op.WRITE, 0, 65536, 4096, buf) == -errno.ENOSPC
    assert handle(0, Op.WRITE, 0, 8192, 4096, buf) == 4096


def test_unsupported_operation_is_eopnotsupp() -> None:
    handle = PluginBackend(ReadOnlyZeros(SIZE)).handler()
    buf = memoryview(bytearray(4096))
    assert handle(0, Op.WRITE, 0, 0, 4096, buf) == -errno.EOPNOTSUPP
    assert handle(0, Op.ZONE_OPEN, 0, 0, 0, buf) == -errno.EOPNOTSUPP


class NoRead(Target):
    def size(self) -> int:
        return SIZE


class BadSize(RamDisk):
    def size(self) -> int:
        return 1000


def test_plugin_contract_is_checked() -> None:
    with pytest.raises(PluginError, match="neither read"):
        PluginBackend(NoRead())
    with pytest.raises(ConfigError, match="not a positive multiple"):
        PluginBackend(BadSize(4096))


def test_load_plugin_from_module_and_file(tmp_path: Path) -> None:
    b = load_plugin("examples.ramdisk:RamDisk", {"size": "2M"})
    assert b.size == 2 << 20
    f = tmp_path / "myplug.py"
    f.write_text("from ublk_driver import Target\n"
                 "class Z(Target):\n"
                 "    def size(self): return 4096\n"
                 "    def read(self, offset, length): return bytes(length)\n")
    b2 = load_plugin(f"{f}:Z")
    assert b2.size == 4096 and b2.capabilities.read_only


@pytest.mark.parametrize(("spec", "message"), [
    ("nocolon", "MODULE:CLASS"),
    ("no_such_module_xyz:C", "cannot import"),
    ("examples.ramdisk:Nope", "has no class"),
    ("ublk_driver.core.errors:UblkError", "not a subclass"),
    ("/does/not/exist.py:C", "does not exist"),
])
def test_load_plugin_errors(spec: str, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        load_plugin(spec)


def test_load_plugin_bad_args() -> None:
    with pytest.raises(PluginError, match="cannot create"):
        load_plugin("examples.ramdisk:RamDisk", {"colour": "red"})


@pytest.mark.parametrize("bad", [-1, -0.5, 0.0005, 86401, float("nan"), float("inf"), True,
                                 "3"])
def test_timeout_must_be_zero_or_a_sane_number_of_seconds(bad: object) -> None:
    with pytest.raises(ConfigError, match="plug-in timeout must be"):
        check_timeout(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="plug-in timeout must be"):
        PluginBackend(RamDisk(SIZE), timeout=bad)  # type: ignore[arg-type]


def test_timeout_defaults_and_is_described() -> None:
    assert PluginBackend(RamDisk(SIZE)).timeout == DEFAULT_TIMEOUT == 30.0
    b = load_plugin("examples.ramdisk:RamDisk", {"size": "1M"}, timeout=2.5)
    assert b.timeout == 2.5 and b.describe()["plugin_timeout"] == 2.5
    assert load_plugin("examples.ramdisk:RamDisk", timeout=0).timeout == 0
    assert check_timeout(1) == 1.0 and check_timeout(0.001) == 0.001


def test_method_names_for_hang_messages() -> None:
    b = PluginBackend(RamDisk(SIZE))
    assert b.method_of(Op.READ) == "read_into()"
    assert PluginBackend(ReadOnlyZeros(SIZE)).method_of(Op.READ) == "read()"
    assert b.method_of(Op.WRITE) == "write()"
    assert b.method_of(Op.WRITE, IoFlag.FUA) == "write() or flush() (a FUA write)"
    assert b.method_of(Op.FLUSH) == "flush()"
    assert b.method_of(Op.WRITE_ZEROES) == "write_zeroes()"


def test_cancelled_event_is_skipped_without_touching_the_plugin() -> None:
    calls: list[str] = []

    class Spy(RamDisk):
        def read_into(self, offset: int, buf: memoryview) -> None:
            calls.append("read")

    handle = PluginBackend(Spy(SIZE)).handler()
    buf = memoryview(bytearray(4096))
    assert handle(0, _bindings.OP_CANCELLED, 0, 0, 4096, buf) == _bindings.RELAY_CANCELLED
    assert calls == []
