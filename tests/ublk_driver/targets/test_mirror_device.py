"""The mirror on a real ublk device: fio verify across leg changes and faults.

Marked ``ublk``: native where /dev/ublk-control exists, else in the test bed.
The server runs in this process (the Python API) so that the test can change
leg states and faults while fio runs, as the control channel will.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ublk_driver.ublk_helpers import (
    fio,
    job_totals,
    next_dev_id,
    sparse_files,
    ublkml,
)
from ublk_driver.faults import FaultSpec
from ublk_driver.server import Server, ServerConfig
from ublk_driver.targets import MirrorTarget

pytestmark = pytest.mark.ublk

SIZE = 32 << 20
FIO_VERIFY = ["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16", "--size=24M",
              "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"]


def make_legs(tmp_path: Path) -> list[str]:
    return sparse_files(tmp_path, 2, SIZE)


@contextlib.contextmanager
def serving(legs: list[str]) -> Iterator[Server]:
    server = Server(MirrorTarget(legs), ServerConfig(queues=2, depth=32, dev_id=next_dev_id()))
    server.start()
    try:
        yield server
    finally:
        assert server.shutdown() == []


def in_background(fn: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except BaseException as e:  # reported by the test
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def states(server: Server) -> list[str]:
    return [leg.state for leg in server.leg_info()]


def test_fio_verify_across_demote_fail_resync_promote(tmp_path: Path) -> None:
    legs = make_legs(tmp_path)
    with serving(legs) as server:
        t, out = in_background(lambda: fio(server.bdev, *FIO_VERIFY, "--loops=3"))
        steps = []
        for state in ("demoted", "failed"):
            time.sleep(1.0)
            server.set_leg_state(1, state)
            steps.append(states(server))
        time.sleep(1.0)
        assert server.leg_info()[1].dirty_regions > 0 or not t.is_alive()
        server.promote_leg(1)                    # resync under load, then active
        steps.append(states(server))
        time.sleep(0.5)
        server.set_leg_state(0, "demoted")      # now only leg 1 serves reads
        steps.append(states(server))
        t.join(600)
        doc = out[0]
        assert isinstance(doc, dict), doc
        tot = job_totals(doc)
        assert tot["errors"] == 0 and tot["write"] >= 24 << 20
        assert tot["read"] == tot["write"]       # everything written was verified
        assert steps == [["active", "demoted"], ["active", "failed"], ["active", "active"],
                         ["demoted", "active"]]
        # One more pass, then leg 1 alone serves a verify-only pass of it.
        assert job_totals(fio(server.bdev, *FIO_VERIFY))["errors"] == 0
        server.promote_leg(0)
        server.set_leg_state(0, "demoted")
        server.leg_info()  # reads from here on: leg 1 only
        doc = fio(server.bdev, *FIO_VERIFY, "--verify_only")
        assert job_totals(doc)["errors"] == 0
        assert job_totals(doc)["read"] == 24 << 20
        server.promote_leg(0)
    subprocess.run(["cmp", legs[0], legs[1]], check=True)   # legs identical at the end


def test_fio_verify_with_a_faulty_leg(tmp_path: Path) -> None:
    """Delays and errors on leg 1: fio sees no error, leg 1 ends failed, resync repairs."""
    legs = make_legs(tmp_path)
    with serving(legs) as server:
        server.set_fault(1, FaultSpec.parse("delay=1ms,slow=3,errors=0.02,seed=3"))
        doc = fio(server.bdev, *FIO_VERIFY)
        tot = job_totals(doc)
        assert tot["errors"] == 0 and tot["read"] == tot["write"] == 24 << 20
        info = server.leg_info()
        assert info[1].state == "failed" and info[1].errors >= 1
        assert info[0].errors == 0
        server.set_fault(1, None)
        server.promote_leg(1)
        assert states(server) == ["active", "active"]
    subprocess.run(["cmp", legs[0], legs[1]], check=True)


def test_cli_add_mirror_with_a_fault(tmp_path: Path) -> None:
    legs = make_legs(tmp_path)
    dev_id = next_dev_id()
    out = ublkml("add", "-n", str(dev_id), "--json", "-t", "mirror", "--leg", legs[0],
                 "--leg", legs[1], "--fault", "1:delay=500us")
    try:
        assert '"target": "mirror"' in out.stdout
        doc = fio(f"/dev/ublkb{dev_id}", "--rw=randwrite", "--bs=64k", "--iodepth=8",
                  "--size=8M", "--verify=crc32c", "--do_verify=1")
        assert job_totals(doc)["errors"] == 0
    finally:
        ublkml("del", "-n", str(dev_id))
    subprocess.run(["cmp", legs[0], legs[1]], check=True)
