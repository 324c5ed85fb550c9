"""The extension registry: classes, params, limits, persistence."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kernel_agent.errors import RegistryError
from kernel_agent.registry import Registry, lease_holders
from kernel_agent.ring import Channel


def test_add_list_remove(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    e1 = reg.add("ublk-server", {"pid": str(os.getpid()), "dev_id": "5", "queues": "2",
                                 "depth": "64", "memory": "64M", "files": "3",
                                 "policy": "keep", "mode": "enforce"})
    e2 = reg.add("ml-extension", {"pid": str(os.getpid()), "model": "fail-slow"})
    assert (e1.id, e2.id) == (1, 2)
    assert e1.memory == 64 << 20 and e1.policy == "keep" and e2.policy == "none"
    assert Channel.open(e1.ring).ext_id == 1
    again = Registry(tmp_path)  # persisted
    assert [e.id for e in again.extensions()] == [1, 2]
    assert again.devices()["ublkb5"].mode == "enforce"
    again.remove(1)
    assert not os.path.exists(e1.ring) and "ublkb5" not in again.devices()
    with pytest.raises(RegistryError, match="no extension with id 1"):
        again.remove(1)


@pytest.mark.parametrize("cls, params, message", [
    ("nbd-server", {"pid": "1"}, "unknown class"),
    ("ml-extension", {}, "needs pid"),
    ("ml-extension", {"pid": "999999999"}, "no process"),
    ("ml-extension", {"pid": "12x"}, "expected an integer"),
    ("ublk-server", {"pid": "self", "queues": "33"}, "queues=33 over the limit 32"),
    ("ublk-server", {"pid": "self", "depth": "5000"}, "depth=5000 over the limit 4096"),
    ("ml-extension", {"pid": "self", "memory": "5G"}, "memory=5368709120 over the limit"),
    ("ublk-server", {"pid": "self", "policy": "explode"}, "policy='explode'"),
    ("ublk-server", {"pid": "self", "colour": "red"}, "unknown parameter"),
])
def test_rejected_registrations(tmp_path: Path, cls: str, params: dict[str, str],
                                message: str) -> None:
    params = {k: (str(os.getpid()) if v == "self" and k == "pid" else v)
              for k, v in params.items()}
    with pytest.raises(RegistryError, match=message):
        Registry(tmp_path).add(cls, params)
    assert Registry(tmp_path).extensions() == []


def test_configured_limits(tmp_path: Path) -> None:
    (tmp_path / "limits.json").write_text(json.dumps({"ml-extension": {"instances": 1}}))
    reg = Registry(tmp_path)
    reg.add("ml-extension", {"pid": str(os.getpid())})
    with pytest.raises(RegistryError, match="limit is 1"):
        reg.add("ml-extension", {"pid": str(os.getpid())})


def test_cli_add_list_remove(agent_dir: Path) -> None:
    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        import sys
        return subprocess.run([sys.executable, "-m", "kernel_agent", *args],
                              capture_output=True, text=True, timeout=60)

    out = agent("add", "ml-extension", f"pid={os.getpid()}", "memory=1G", "--json")
    assert out.returncode == 0, out.stderr
    ext = json.loads(out.stdout)
    listed = agent("list", "--json")
    assert json.loads(listed.stdout)["extensions"][0]["id"] == ext["id"]
    bad = agent("add", "ml-extension", f"pid={os.getpid()}", "files=1000")
    assert bad.returncode == 1 and "files=1000 over the limit 64" in bad.stderr
    assert bad.stderr.count("\n") == 1
    assert agent("remove", str(ext["id"])).returncode == 0
    assert "no extensions" in agent("list").stdout


def test_leases_are_shared_with_the_monitor_on_watched_devices(tmp_path: Path) -> None:
    """A device's lease holders: its owner (device=), and the monitor where it claims
    the device and the device is watched; a claim is replaced, not added to, and
    only a co-holder class may claim."""
    reg = Registry(tmp_path)
    pid = str(os.getpid())
    legs = reg.add("ml-extension", {"pid": pid, "device": "ublkb3", "mode": "enforce"})
    mon = reg.add("monitor", {"pid": pid, "claims": "ublkb3, ublkb9,ublkb3"})
    assert mon.claims == ["ublkb3", "ublkb9"]
    reg.watch("loop7")
    holders = lease_holders(reg.devices(), reg.extensions())
    # ublkb9 is not watched: the claim grants nothing there (until it is).
    assert holders == {"ublkb3": {legs.id, mon.id}, "loop7": frozenset()}
    reg.claim(mon.id, ["loop7"])
    assert lease_holders(reg.devices(), reg.extensions()) == {
        "ublkb3": {legs.id}, "loop7": {mon.id}}
    mtime = reg.mtime_ns()
    reg.claim(mon.id, ["loop7"])       # unchanged: the agent is not made to re-sync
    assert reg.mtime_ns() == mtime
    reg.set_state(mon.id, "dead")
    assert lease_holders(reg.devices(), reg.extensions())["loop7"] == frozenset()
    with pytest.raises(RegistryError, match="ml-extension cannot share leases"):
        reg.claim(legs.id, ["loop7"])
    with pytest.raises(RegistryError, match="unknown parameter"):
        reg.add("ml-extension", {"pid": pid, "claims": "loop7"})
    with pytest.raises(RegistryError, match="not a device name"):
        reg.claim(mon.id, ["../etc"])
    with pytest.raises(RegistryError, match="no extension with id 99"):
        reg.claim(99, [])
    reg.remove(mon.id)
    assert lease_holders(reg.devices(), reg.extensions()) == {
        "ublkb3": {legs.id}, "loop7": frozenset()}
