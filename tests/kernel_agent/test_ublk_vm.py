"""The agent against real ublk devices (in the test bed on hosts without ublk).

The kernel-side counts (eBPF) must match fio's and the ublk server's own; a
SIGKILLed server registered with policy=remove gets its device deleted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from kernel_agent.accounting import BpfAccounting, resolve_device, sysfs_stats
from kernel_agent.agent import Agent
from kernel_agent.eventlog import read_jsonl
from kernel_agent.registry import Registry
from tests.ublk_driver.ublk_helpers import fio, next_dev_id, ublkml, wait_gone
from ublk_driver.control import Control

pytestmark = pytest.mark.ublk


def test_counts_match_fio_and_server(monkeypatch: pytest.MonkeyPatch, bpf_ok: None,
                                     instance: str) -> None:
    monkeypatch.setenv("UBLKML_STATS", "1")  # the server reports its I/O count on exit
    dev_id = next_dev_id()
    info = json.loads(ublkml("add", "-t", "mem", "--size", "64M", "-n", str(dev_id),
                             "--json").stdout)
    name = os.path.basename(info["bdev"])
    try:
        bd = resolve_device(name)
        with BpfAccounting(instance) as acc:
            time.sleep(0.3)
            base = sysfs_stats(bd)  # I/O before watching (the partition scan at start)
            acc.watch(bd)
            fio(info["bdev"], "--rw=randwrite", "--bs=8k", "--iodepth=16",
                "--number_ios=500", "--size=32M")
            fio(info["bdev"], "--rw=randread", "--bs=4k", "--iodepth=4",
                "--number_ios=700", "--size=32M")
            got = acc.stats(bd)
    finally:
        ublkml("del", "-n", str(dev_id))
    assert got.ios["write"] == 500 and got.bytes["write"] == 500 * 8192
    assert got.ios["read"] == 700 and got.bytes["read"] == 700 * 4096
    assert got.errors == 0 and got.in_flight == 0
    log = Path(info["log"]).read_text()
    served = sum(int(n) for n in re.findall(r"queue \d+: (\d+) I/Os", log))
    before = base.total_ios
    assert served == before + got.total_ios, (served, before, got.to_json(), log)


def test_sigkill_server_device_removed(bpf_ok: None, tmp_path: Path, instance: str) -> None:
    dev_id = next_dev_id()
    info = json.loads(ublkml("add", "-t", "mem", "--size", "16M", "-n", str(dev_id),
                             "--json").stdout)
    reg = Registry(tmp_path)
    ext = reg.add("ublk-server", {"pid": str(info["pid"]), "dev_id": str(dev_id),
                                  "queues": "1", "depth": "128", "memory": "16M",
                                  "policy": "remove", "mode": "observe"})
    agent = Agent(tmp_path, instance=instance)
    try:
        agent.sync(force=True)
        assert f"ublkb{dev_id}" in agent.devices
        os.kill(info["pid"], signal.SIGKILL)
        # The driver itself stops the disk of a dead server (the bdev goes), but
        # the device stays listed until someone sends DEL_DEV: that is the policy.
        deadline = time.monotonic() + 60
        while agent.counters["deaths"] == 0 and time.monotonic() < deadline:
            agent.step(0.1)
        assert agent.counters["deaths"] == 1
        assert wait_gone(info["bdev"], 10)
    finally:
        agent.close()
        if os.path.exists(info["bdev"]):
            ublkml("del", "-n", str(dev_id), check=False)
    assert Registry(tmp_path).extensions() == []
    died = [r for r in read_jsonl(tmp_path / "audit.jsonl") if r.get("what") == "died"]
    assert died and died[0]["id"] == ext.id and died[0]["action"] == f"device {dev_id} removed"
    with Control() as ctrl:  # deleted without waiting: freed once its last opener closed
        assert ctrl.wait_freed(dev_id, 10)
    assert ublkml("list", "--json").stdout.count(f'"dev_id": {dev_id},') == 0
