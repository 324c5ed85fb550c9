"""The admin socket of a real server: `ublkml status` over the socket, gone after `del`,
and its completion paths mapped to the drives under them."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ublk_driver.ublk_helpers import device, ublkml
from ublk_driver.admin import fallback_path, socket_path
from ublk_driver.scratch import with_sbin

pytestmark = pytest.mark.ublk

#: no udev in the test bed: libdevmapper makes the /dev/mapper nodes itself
_ENV = {**with_sbin(dict(os.environ)), "DM_DISABLE_UDEV": "1"}


def test_status_over_the_socket_and_socket_removed_on_delete() -> None:
    state_dir = os.environ.get("UBLKML_STATE_DIR", "/run/ublkml")
    with device("-t", "mem", "--size", "16M", "-q", "1", "-d", "32") as d:
        doc = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
        sock = doc["socket"]    # in the state dir, or beside it where that cannot hold one
        assert sock in (socket_path(d.dev_id, state_dir),
                        fallback_path(socket_path(d.dev_id, state_dir)))
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert doc["dev_id"] == d.dev_id and doc["bdev"] == d.bdev
        assert doc["pid"] == d.info["pid"]
        assert doc["queues"] == 1 and doc["depth"] == 32
        assert doc["target"] == {"target": "mem", "size": 16 << 20}
        assert "legs" not in doc and doc["faults"] == {} and doc["jobs"] == []
        assert doc["paths"] == [{"index": 0, "name": "mem", "backing": None, "drives": [],
                                 "no_drive": "the mem target keeps its data in the server's "
                                             "memory"}]
        text = ublkml("status", "-n", str(d.dev_id)).stdout
        assert text.startswith(f"ublk device {d.dev_id} ({d.bdev}): mem 16M, 1 queue(s)")
        assert "  path 0 mem  - -> no drive (the mem target keeps its data" in text
    assert not os.path.exists(sock)
    proc = ublkml("status", "-n", str(d.dev_id), check=False)
    assert proc.returncode == 1 and "is the server running?" in proc.stderr


def _run(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=_ENV)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def _loop(img: Path, size: int) -> Iterator[tuple[str, str]]:
    """A loop device over a new ``size``-byte file: (name, "MAJ:MIN")."""
    with open(img, "wb") as f:
        f.truncate(size)
    # the test bed's kernel has loop as a module, loaded by no one else
    subprocess.run(["modprobe", "loop"], check=False, capture_output=True, env=_ENV)
    path = _run("losetup", "-f", "--show", str(img)).strip()
    try:
        rdev = os.stat(path).st_rdev
        yield os.path.basename(path), f"{os.major(rdev)}:{os.minor(rdev)}"
    finally:
        subprocess.run(["losetup", "-d", path], check=False, env=_ENV)


@contextlib.contextmanager
def _dm_linear(name: str, under: str, sectors: int) -> Iterator[str]:
    subprocess.run(["modprobe", "dm_mod"], check=False, capture_output=True, env=_ENV)
    _run("dmsetup", "create", "--noudevsync", name, "--table",
         f"0 {sectors} linear {under} 0")
    try:
        yield f"/dev/mapper/{name}"
    finally:
        subprocess.run(["dmsetup", "remove", "--noudevsync", name], check=False, env=_ENV)


@contextlib.contextmanager
def _ext4(dev: str, mnt: Path) -> Iterator[Path]:
    _run("mkfs.ext4", "-q", "-F", dev)
    mnt.mkdir()
    _run("mount", dev, str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, env=_ENV)


def _lsblk_leaves(dev: str) -> list[dict[str, str]]:
    """util-linux's independent answer: the leaves of ``lsblk -s``."""
    doc = json.loads(_run("lsblk", "-J", "-s", "-o", "NAME,MAJ:MIN", dev))
    out: list[dict[str, str]] = []
    todo = list(doc["blockdevices"])
    while todo:
        n = todo.pop()
        if n.get("children"):
            todo.extend(n["children"])
        else:
            out.append({"name": n["name"], "dev": n["maj:min"]})
    return out


def test_status_names_the_drives_under_loop_and_mirror_backings(tmp_path: Path) -> None:
    """A loop target over a file on ext4 on dm-linear over loop device A: status
    names A (through the dm device's slaves, as lsblk does).  Then a mirror with
    that file as leg 0 and loop device B itself as leg 1: leg 0 -> A, leg 1 -> B."""
    with _loop(tmp_path / "a.img", 64 << 20) as (a_name, a_dev), \
            _loop(tmp_path / "b.img", 16 << 20) as (b_name, b_dev), \
            _dm_linear(f"ublkml-drives-{os.getpid()}", f"/dev/{a_name}", (64 << 20) >> 9
                       ) as dm, \
            _ext4(dm, tmp_path / "mnt") as mnt:
        a = {"name": a_name, "dev": a_dev}
        assert _lsblk_leaves(dm) == [a]
        backing = str(mnt / "backing.img")
        with open(backing, "wb") as f:
            f.truncate(16 << 20)
        with device("-t", "loop", "-f", backing, "-q", "1", "-d", "16") as d:
            doc = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
            assert doc["paths"] == [{"index": 0, "name": "loop", "backing": backing,
                                     "drives": [a], "no_drive": None}]
            text = ublkml("status", "-n", str(d.dev_id)).stdout
            assert f"  path 0 loop  {backing} -> {a_name} ({a_dev})\n" in text
        with device("-t", "mirror", "--leg", backing, "--leg", f"/dev/{b_name}",
                    "-q", "1", "-d", "16") as d:
            doc = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
            assert doc["paths"] == [
                {"index": 0, "name": "leg0", "backing": backing, "drives": [a],
                 "no_drive": None},
                {"index": 1, "name": "leg1", "backing": f"/dev/{b_name}",
                 "drives": [{"name": b_name, "dev": b_dev}], "no_drive": None}]
            assert [leg["leg"] for leg in doc["legs"]] == [0, 1]
