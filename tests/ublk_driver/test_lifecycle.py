"""Device lifecycle through the real driver: signals, deletion, bad ids, failing plug-ins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ublk_driver.ublk_helpers import (
    device,
    next_dev_id,
    read_direct,
    ublkml,
    wait_gone,
    write_direct,
)

pytestmark = pytest.mark.ublk


def test_features_and_list_json() -> None:
    feats = json.loads(ublkml("features", "--json").stdout)
    assert "CMD_IOCTL_ENCODE" in feats["names"]
    with device("-t", "mem", "--size", "16M", "-q", "2", "-d", "64") as d:
        listed = {r["dev_id"]: r for r in json.loads(ublkml("list", "--json").stdout)}
        rec = listed[d.dev_id]
        assert rec["state"] == "LIVE" and rec["queues"] == 2 and rec["depth"] == 64
        assert rec["size"] == 16 << 20 and rec["target"] == "mem"
    listed = {r["dev_id"] for r in json.loads(ublkml("list", "--json").stdout)}
    assert d.dev_id not in listed


def test_unknown_and_double_delete_are_clear_errors() -> None:
    dev_id = next_dev_id()
    proc = ublkml("del", "-n", str(dev_id), check=False)
    assert proc.returncode == 1
    assert f"no ublk device with id {dev_id}" in proc.stderr
    with device("-t", "null") as d:
        pass
    proc = ublkml("del", "-n", str(d.dev_id), check=False)
    assert proc.returncode == 1 and "no ublk device" in proc.stderr


def test_duplicate_id_is_refused_and_leaves_the_first_alone() -> None:
    with device("-t", "mem", "--size", "4M") as d:
        proc = ublkml("add", "-t", "null", "-n", str(d.dev_id), check=False)
        assert proc.returncode == 1 and "already in use" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        write_direct(d.bdev, 0, b"\x11" * 4096)
        assert read_direct(d.bdev, 0, 4096) == b"\x11" * 4096


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_flushes(sig: signal.Signals, tmp_path: Path) -> None:
    backing = tmp_path / "b.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    dev_id = next_dev_id()
    with subprocess.Popen([sys.executable, "-m", "ublk_driver", "add", "-t", "loop", "-f",
                           str(backing), "-n", str(dev_id), "--foreground", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            ready = json.loads(proc.stdout.readline())
            bdev = ready["bdev"]
            write_direct(bdev, 1 << 20, b"\xc3" * (1 << 20))
            proc.send_signal(sig)
            assert proc.wait(60) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert wait_gone(f"/dev/ublkb{dev_id}") and wait_gone(f"/dev/ublkc{dev_id}")
    assert backing.read_bytes()[1 << 20: 2 << 20] == b"\xc3" * (1 << 20)


def test_failing_plugin_fails_the_io_not_the_device() -> None:
    plugin = ["-t", "python", "--plugin", "ublk_driver.targets.ramdisk:Faulty",
              "--plugin-arg", "size=8M",
              "--plugin-arg", "raise_from=1M", "--plugin-arg", "raise_to=2M",
              "--plugin-arg", "short_from=3M", "--plugin-arg", "short_to=4M",
              "--plugin-arg", "eio_from=5M", "--plugin-arg", "eio_to=6M"]
    with device(*plugin) as d:
        for off in (1 << 20, 3 << 20):
            with pytest.raises(OSError) as exc:
                read_direct(d.bdev, off, 4096)
            assert exc.value.errno == 5  # EIO reaches the reader
        with pytest.raises(OSError) as exc:
            write_direct(d.bdev, 5 << 20, b"x" * 4096)
        assert exc.value.errno in (5, 28)  # the block layer may map ENOSPC to EIO
        # The device and the server are still up and serve good ranges.
        write_direct(d.bdev, 0, b"\x42" * 4096)
        assert read_direct(d.bdev, 0, 4096) == b"\x42" * 4096
        listed = {r["dev_id"]: r for r in json.loads(ublkml("list", "--json").stdout)}
        assert listed[d.dev_id]["state"] == "LIVE"
        assert os.path.exists(f"/proc/{d.info['pid']}")
