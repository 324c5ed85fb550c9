"""A plug-in that hangs, through the real driver: the timeout fails that I/O, not the device.

Marked ``ublk``: natively where the driver exists, else in the test bed.
``tests.ublk_driver.targets.doubles:Sleepy`` never returns from calls that touch
[hang_from, hang_to); the device is served with ``--plugin-timeout 2``.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.ublk_driver.ublk_helpers import (
    device,
    fio,
    job_totals,
    read_direct,
    ublkml,
    write_direct,
)

pytestmark = pytest.mark.ublk

MIB = 1 << 20
TIMEOUT = 2.0
SLEEPY = ["-t", "python", "--plugin", "tests.ublk_driver.targets.doubles:Sleepy",
          "--plugin-arg", "size=16M", "--plugin-arg", "hang_from=8M",
          "--plugin-arg", "hang_to=8200K", "--plugin-timeout", str(TIMEOUT)]


def _in_thread(fn: object) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            fn()  # type: ignore[operator]
            out["result"] = "ok"
        except OSError as e:
            out["errno"] = e.errno
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("queues", [1, 2])
def test_a_hung_call_fails_its_io_and_the_device_serves_on(queues: int) -> None:
    with device(*SLEEPY, "-q", str(queues)) as d:
        write_direct(d.bdev, 0, b"\x42" * 65536)
        hung, out = _in_thread(lambda: read_direct(d.bdev, 8 * MIB, 4096))
        time.sleep(0.5)  # the read is stuck in the plug-in now
        # Meanwhile other I/O is served, well within the timeout.
        for i in range(10):
            t0 = time.monotonic()
            assert read_direct(d.bdev, i * 4096, 4096) == b"\x42" * 4096
            write_direct(d.bdev, MIB + i * 4096, bytes([i]) * 4096)
            assert time.monotonic() - t0 < TIMEOUT / 2
        assert hung.is_alive()
        hung.join(TIMEOUT * 4)
        assert not hung.is_alive(), "the hung read never failed"
        assert out.get("errno") in (errno.ETIMEDOUT, errno.EIO), out
        assert TIMEOUT * 0.9 <= float(out["seconds"]) <= TIMEOUT * 3  # type: ignore[arg-type]
        # A hung write too; then fio elsewhere sees no error at all.
        with pytest.raises(OSError) as exc:
            write_direct(d.bdev, 8 * MIB + 4096, b"\x99" * 4096)
        assert exc.value.errno in (errno.ETIMEDOUT, errno.EIO)
        doc = fio(d.bdev, "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=4M",
                  "--io_size=8M")
        assert job_totals(doc)["errors"] == 0
        log = Path(str(d.info["log"])).read_text()
        assert ("read_into() did not return within 2 s (READ at 8388608+4096, queue "
                in log), log[-3000:]
        assert "write() did not return within 2 s (WRITE at 8392704+4096" in log
        st = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
        plugin = [q["plugin"] for q in st["stats"]["queues"]]
        assert sum(p["timeouts"] for p in plugin) == 2
        assert sum(p["stuck"] for p in plugin) == 2
        listed = {r["dev_id"]: r for r in json.loads(ublkml("list", "--json").stdout)}
        assert listed[d.dev_id]["state"] == "LIVE"
        assert os.path.exists(f"/proc/{d.info['pid']}")
    # `del` returned: the server exited although two calls never returned.
    assert not os.path.exists(f"/proc/{d.info['pid']}")


def test_without_a_timeout_the_relay_is_not_used() -> None:
    """--plugin-timeout 0: calls run on the queue thread (no worker threads)."""
    with device("-t", "python", "--plugin", "examples.ramdisk:RamDisk",
                "--size", "16M", "--plugin-timeout", "0") as d:
        write_direct(d.bdev, 0, b"\x17" * 4096)
        assert read_direct(d.bdev, 0, 4096) == b"\x17" * 4096
        names = {Path(f"/proc/{d.info['pid']}/task/{t}/comm").read_text().strip()
                 for t in os.listdir(f"/proc/{d.info['pid']}/task")}
        assert "ublk-q0" in names and not any(n.startswith("ublk-q0-py") for n in names)
        st = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
        assert "plugin" not in st["stats"]["queues"][0]
        assert st["target"]["plugin_timeout"] == 0
