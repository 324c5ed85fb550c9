"""The RamStore behind the python group, through both of its wrappers."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from bench.ramstore import RamStore, RamStoreTarget, parse_size
from ublk_driver.targets.plugin import PluginBackend
from ublk_driver.uapi import IoFlag, Op

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "bench" / "nbdkit_ramdisk.py"


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("512k") == 512 << 10
    assert parse_size(123) == 123
    for bad in ("", "M", "1.5G", "-1M", "12Q"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_ramstore_read_write_trim() -> None:
    s = RamStore("1M")
    assert s.size == 1 << 20
    s.pwrite(b"\xab" * 8192, 4096)
    buf = bytearray(4096)
    s.pread(buf, 4096)
    assert buf == b"\xab" * 4096
    view = memoryview(bytearray(4096))
    s.pread(view, 0)
    assert bytes(view) == bytes(4096)
    s.trim(4096, 4096)
    s.pread(buf, 4096)
    assert buf == bytes(4096)
    s.pread(buf, 8192)
    assert buf == b"\xab" * 4096
    s.flush()


def test_ramstore_out_of_range_and_bad_sizes() -> None:
    s = RamStore(8192)
    with pytest.raises(ValueError):
        s.pread(bytearray(4096), 8192)
    with pytest.raises(ValueError):
        s.pwrite(b"x" * 4096, 6144)
    for bad in (0, 1000, "3K"):
        with pytest.raises(ValueError):
            RamStore(bad)


def test_target_through_the_plugin_backend() -> None:
    """What the ublkml server does with the plug-in, without the kernel."""
    backend = PluginBackend(RamStoreTarget("1M"), "bench.ramstore:RamStoreTarget")
    caps = backend.capabilities
    assert backend.size == 1 << 20
    assert not caps.read_only and caps.flush and caps.fua and caps.discard
    assert caps.discard_zeroes and not caps.write_zeroes
    handle = backend.handler()
    io = memoryview(bytearray(8192))
    io[:] = b"\x5a" * 8192
    assert handle(0, Op.WRITE, IoFlag.FUA, 65536, 8192, io) == 8192
    out = memoryview(bytearray(8192))
    assert handle(1, Op.READ, 0, 65536, 8192, out) == 8192
    assert bytes(out) == b"\x5a" * 8192
    assert handle(2, Op.DISCARD, 0, 65536, 4096, out) == 0
    assert handle(3, Op.READ, 0, 65536, 8192, out) == 8192
    assert bytes(out) == bytes(4096) + b"\x5a" * 4096
    assert handle(4, Op.FLUSH, 0, 0, 0, out) == 0
    assert backend.io_errors == 0


def _load_nbdkit_plugin(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Import the nbdkit script with a stand-in for nbdkit's embedded module."""
    fake = types.ModuleType("nbdkit")
    fake.THREAD_MODEL_PARALLEL = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    spec = importlib.util.spec_from_file_location("nbdkit_ramdisk_under_test", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nbdkit_plugin_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _load_nbdkit_plugin(monkeypatch)
    assert p.API_VERSION == 2
    p.config("size", "1M")
    with pytest.raises(RuntimeError, match="unknown parameter"):
        p.config("colour", "blue")
    p.config_complete()
    assert p.thread_model() == 3
    h = p.open(False)
    assert p.get_size(h) == 1 << 20
    assert p.can_multi_conn(h) is True
    p.pwrite(h, memoryview(b"\x11" * 4096), 4096, 0)
    buf = bytearray(4096)
    p.pread(h, buf, 4096, 0)
    assert buf == b"\x11" * 4096
    p.trim(h, 4096, 4096, 0)
    p.pread(h, buf, 4096, 0)
    assert buf == bytes(4096)
    p.flush(h, 0)


def test_nbdkit_serves_the_plugin_for_real(tmp_path: Path) -> None:
    """nbdkit's real embedded (system) Python runs the script; qemu-io talks NBD to it."""
    # `make setup` installs these; their absence is a set-up failure, not a skip.
    assert shutil.which("nbdkit") and shutil.which("qemu-io"), \
        "needs nbdkit, nbdkit-plugin-python and qemu-utils: run `make setup`"
    assert subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True,
                          check=False).returncode == 0, \
        "nbdkit's python plug-in is not installed (nbdkit-plugin-python): run `make setup`"
    sock = tmp_path / "ram.sock"
    log = tmp_path / "nbdkit.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--exit-with-parent",
                                 "python", str(PLUGIN), "size=4M"],
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "nbdkit did not create its socket"
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        cmds = ["write -P 0xab 4096 64k", "read -P 0xab 4096 64k", "read -P 0 0 4096",
                "discard 8192 4096", "read -P 0 8192 4096", "read -P 0xab 12288 4096",
                "flush"]
        argv = ["qemu-io", "-f", "raw", uri]
        for c in cmds:
            argv += ["-c", c]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert "fail" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
        assert out.stdout.count("read ") == 4
    finally:
        proc.terminate()
        proc.wait(10)
