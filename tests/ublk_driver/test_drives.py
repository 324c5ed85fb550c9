"""ublk_driver.drives: paths to the drives under them, and the targets' completion paths.

Three kinds of test:

- the host's real sysfs, for what this host has: its root file system
  (ext4 on a whole virtio disk), loop devices (``losetup``, as root), ext4
  mounted on a loop device, tmpfs, overlay, proc.  util-linux
  (``findmnt``, ``lsblk -s``) is the independent answer they are checked
  against;
- a fake sysfs tree (a temporary directory laid out as ``/sys`` is) ONLY for
  the shapes this host's kernel cannot make: it has no device-mapper, no md, no
  NVMe and no partition-table parser, so partitions, dm, md and NVMe
  namespaces exist here only as files.  The test bed (a real dm device over a
  loop device) is in admin/test_admin_ublk.py;
- a property test over generated sysfs trees, cycles included, against a
  reachability model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ublk_driver
from ublk_driver.core.errors import UblkError
from ublk_driver.drives import (
    Drive,
    DriveLookupError,
    drives_of,
    resolve,
    resolve_dev,
    resolve_fd,
    why_no_drive,
)
from ublk_driver.targets import (
    CompletionPath,
    LoopTarget,
    MemTarget,
    MirrorTarget,
    NullTarget,
    PluginBackend,
    Target,
)

SBIN_ENV = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True,
                          timeout=60, env=SBIN_ENV).stdout


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (losetup, mount)")


def lsblk_leaves(device: str) -> list[tuple[str, str]]:
    """util-linux's answer: the leaves of ``lsblk -s`` (the devices under ``device``)."""
    doc = json.loads(sh("lsblk", "-J", "-s", "-o", "NAME,MAJ:MIN", device))

    def leaves(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
        children = node.get("children") or []
        if not children:
            yield node["name"], node["maj:min"]
        for c in children:
            yield from leaves(c)

    return sorted({leaf for top in doc["blockdevices"] for leaf in leaves(top)})


def mount_of(path: str) -> tuple[str, str, str]:
    """(MAJ:MIN, source, fstype) of the file system holding ``path``, by findmnt."""
    out = sh("findmnt", "-n", "-r", "-o", "MAJ:MIN,SOURCE,FSTYPE", "-T", path)
    majmin, source, fstype = out.strip().splitlines()[-1].split(" ")
    return majmin, source, fstype


def pairs(drives: tuple[Drive, ...]) -> list[tuple[str, str]]:
    return sorted((d.name, d.dev) for d in drives)


@dataclass
class Loop:
    path: str      # /dev/loopN
    name: str      # loopN
    dev: str       # MAJ:MIN, from the node's st_rdev
    mnt: Path | None = None


@contextlib.contextmanager
def loop_device(img: Path, size: int = 32 << 20) -> Iterator[Loop]:
    need_root()
    with open(img, "wb") as f:
        f.truncate(size)
    path = sh("losetup", "-f", "--show", str(img)).strip()
    try:
        rdev = os.stat(path).st_rdev
        yield Loop(path, os.path.basename(path), f"{os.major(rdev)}:{os.minor(rdev)}")
    finally:
        subprocess.run(["losetup", "-d", path], check=False, env=SBIN_ENV)


@contextlib.contextmanager
def mounted(source: str, mnt: Path, *opts: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", *opts, source, str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, env=SBIN_ENV)


@pytest.fixture
def ext4_on_loop(tmp_path: Path) -> Iterator[Loop]:
    """ext4 made on a real loop device and mounted (``Loop.mnt``)."""
    with loop_device(tmp_path / "disk.img") as lo:
        sh("mkfs.ext4", "-q", "-F", lo.path)
        with mounted(lo.path, tmp_path / "mnt") as mnt:
            lo.mnt = mnt
            yield lo


# ---- the host's real sysfs --------------------------------------------------------------


def test_a_file_on_the_root_fs_resolves_to_the_disk_lsblk_names(tmp_path: Path) -> None:
    f = tmp_path / "data"
    f.write_bytes(b"x")
    majmin, source, fstype = mount_of(str(f))
    if majmin.startswith("0:"):
        pytest.fail(f"{tmp_path} is on {fstype}, not on a block device: run the tests "
                    "with TMPDIR on a disk-backed file system")
    want = lsblk_leaves(source)
    assert want, source
    assert pairs(drives_of(str(f))) == want
    assert pairs(drives_of(str(tmp_path))) == want       # a directory: the same
    assert why_no_drive(str(f)) is None
    # and a block device path directly: the same disk
    assert pairs(drives_of(source)) == want


def test_a_loop_device_is_a_drive_and_its_backing_file_is_not_followed(tmp_path: Path
                                                                       ) -> None:
    with loop_device(tmp_path / "disk.img") as lo:
        got = drives_of(lo.path)
        assert got == (Drive(lo.name, *map(int, lo.dev.split(":"))),)
        assert pairs(got) == lsblk_leaves(lo.path)
        assert got[0].path == lo.path and got[0].dev == lo.dev
        # the backing file sits on the root disk; the loop device stands for itself
        assert pairs(got) != pairs(drives_of(str(tmp_path / "disk.img")))
        link = tmp_path / "by-name"
        link.symlink_to(lo.path)                          # as /dev/disk/by-id/... are
        assert drives_of(str(link)) == got


def test_a_file_on_ext4_on_a_loop_device_resolves_to_the_loop_device(
        ext4_on_loop: Loop) -> None:
    assert ext4_on_loop.mnt is not None
    f = ext4_on_loop.mnt / "backing.img"
    f.write_bytes(b"\0" * 4096)
    assert mount_of(str(f))[0] == ext4_on_loop.dev
    got = resolve(str(f))
    assert pairs(got.drives) == [(ext4_on_loop.name, ext4_on_loop.dev)]
    assert got.reason is None and got.path == str(f)
    # an open file keeps its drive after its name is gone
    fd = os.open(f, os.O_RDONLY)
    try:
        f.unlink()
        with pytest.raises(DriveLookupError):
            resolve(str(f))
        assert pairs(resolve_fd(fd, "the deleted file").drives) == [
            (ext4_on_loop.name, ext4_on_loop.dev)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("fstype", ["tmpfs", "overlay"])
def test_file_systems_without_a_block_device_have_no_drive_and_say_why(
        tmp_path: Path, fstype: str) -> None:
    need_root()
    mnt = tmp_path / "mnt"
    opts = ["-t", fstype]
    if fstype == "overlay":
        for d in ("lower", "upper", "work"):
            (tmp_path / d).mkdir()
        opts += ["-o", f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
                       f"workdir={tmp_path}/work"]
    with mounted(fstype, mnt, *opts):
        f = mnt / "file"
        f.write_bytes(b"x")
        majmin = mount_of(str(f))[0]
        assert majmin.startswith("0:")
        assert drives_of(str(f)) == ()
        reason = why_no_drive(str(f))
        assert reason == (f"{f} is on {fstype} (device {majmin}), a file system with no "
                          "block device of its own")


def test_proc_and_character_devices_have_no_drive() -> None:
    assert drives_of("/proc/self") == ()
    reason = why_no_drive("/proc/self")
    assert reason is not None and "is on proc (device 0:" in reason
    assert why_no_drive("/dev/null") == ("/dev/null is a character device: no block device "
                                         "is behind it")


def test_a_missing_path_is_a_one_line_ublk_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(DriveLookupError) as e:
        drives_of(missing)
    assert isinstance(e.value, UblkError) and isinstance(e.value, OSError)
    assert e.value.errno == errno.ENOENT
    assert str(e.value) == f"cannot find the drives of {missing}: No such file or directory"
    with pytest.raises(DriveLookupError):
        why_no_drive(missing)
    with pytest.raises(DriveLookupError, match="cannot find the drives of fd 99999"):
        resolve_fd(99999, "fd 99999")


def test_drive_fields() -> None:
    d = Drive("nvme0n1", 259, 0)
    assert (d.dev, d.path, d.to_dict()) == ("259:0", "/dev/nvme0n1",
                                             {"name": "nvme0n1", "dev": "259:0"})
    assert Drive("cciss!c0d0", 104, 0).path == "/dev/cciss/c0d0"
    assert ublk_driver.drives_of is drives_of and ublk_driver.Drive is Drive


# ---- a fake sysfs, for the shapes this host lacks -----------------------------------------


class FakeSysfs:
    """A directory laid out as /sys is for block devices: ``devices/.../NAME`` with
    ``dev``, ``partition`` (partitions, inside their disk's directory), ``slaves/``
    (relative links, as the kernel makes them), ``dm/`` and ``md/``; and
    ``dev/block/MAJ:MIN`` links to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "dev" / "block").mkdir(parents=True, exist_ok=True)
        self.dirs: dict[str, Path] = {}

    def _node(self, d: Path, name: str, major: int, minor: int) -> Path:
        d.mkdir(parents=True)
        (d / "dev").write_text(f"{major}:{minor}\n")
        (d / "slaves").mkdir()
        (d / "holders").mkdir()
        link = self.root / "dev" / "block" / f"{major}:{minor}"
        link.symlink_to(os.path.relpath(d, link.parent))
        self.dirs[name] = d
        return d

    def disk(self, name: str, major: int, minor: int,
             parent: str = "devices/pci0000:00/0000:00:1f.2/ata1/host0/block") -> Path:
        return self._node(self.root / parent / name, name, major, minor)

    def partition(self, disk: str, name: str, major: int, minor: int, number: int = 1
                  ) -> Path:
        d = self._node(self.dirs[disk] / name, name, major, minor)
        (d / "slaves").rmdir()                    # partitions have no slaves/
        (d / "partition").write_text(f"{number}\n")
        return d

    def stacked(self, kind: str, name: str, major: int, minor: int, members: list[str]
                ) -> Path:
        d = self._node(self.root / "devices" / "virtual" / "block" / name, name, major, minor)
        (d / kind).mkdir()                        # dm/ or md/
        for m in members:
            self.member(name, m)
        return d

    def member(self, holder: str, member: str) -> None:
        link = self.dirs[holder] / "slaves" / member
        link.symlink_to(os.path.relpath(self.dirs[member], link.parent))


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


def got(fake: FakeSysfs, major: int, minor: int) -> list[tuple[str, str]]:
    return pairs(resolve_dev(major, minor, sysfs=str(fake.root)).drives)


def test_fake_partition_resolves_to_its_disk(fake: FakeSysfs) -> None:
    fake.disk("sda", 8, 0)
    fake.partition("sda", "sda1", 8, 1)
    fake.partition("sda", "sda2", 8, 2, number=2)
    assert got(fake, 8, 2) == [("sda", "8:0")]
    assert got(fake, 8, 0) == [("sda", "8:0")]


def test_fake_nvme_partition_resolves_to_its_namespace(fake: FakeSysfs) -> None:
    fake.disk("nvme0n1", 259, 0, parent="devices/pci0000:00/0000:00:04.0/nvme/nvme0")
    fake.partition("nvme0n1", "nvme0n1p2", 259, 2, number=2)
    assert got(fake, 259, 2) == [("nvme0n1", "259:0")]


def test_fake_lvm_over_md_raid1_over_partitions(fake: FakeSysfs) -> None:
    for i, n in enumerate(("sdc", "sdd")):
        fake.disk(n, 8, 32 + 16 * i)
        fake.partition(n, f"{n}1", 8, 33 + 16 * i)
    fake.stacked("md", "md0", 9, 0, ["sdc1", "sdd1"])
    fake.stacked("dm", "dm-1", 253, 1, ["md0"])
    assert got(fake, 253, 1) == [("sdc", "8:32"), ("sdd", "8:48")]
    # a partition of the md array: the array, then its members
    fake.partition("md0", "md0p1", 259, 7)
    assert got(fake, 259, 7) == [("sdc", "8:32"), ("sdd", "8:48")]
    r = resolve_dev(253, 1, sysfs=str(fake.root))
    assert [d.name for d in r.drives] == ["sdc", "sdd"] and r.reason is None


def test_fake_dm_over_two_partitions_of_one_disk_names_it_once(fake: FakeSysfs) -> None:
    fake.disk("sdb", 8, 16)
    fake.partition("sdb", "sdb1", 8, 17)
    fake.partition("sdb", "sdb2", 8, 18, number=2)
    fake.stacked("dm", "dm-0", 253, 0, ["sdb1", "sdb2"])
    assert got(fake, 253, 0) == [("sdb", "8:16")]


def test_fake_dm_and_md_without_members_have_no_drive(fake: FakeSysfs) -> None:
    fake.stacked("dm", "dm-3", 253, 3, [])
    fake.stacked("md", "md1", 9, 1, [])
    r = resolve_dev(253, 3, sysfs=str(fake.root))
    assert r.drives == ()
    assert r.reason == "253:3: dm-3 is a device-mapper device with no underlying device"
    assert resolve_dev(9, 1, sysfs=str(fake.root)).reason == (
        "9:1: md1 is an md array with no member device")
    # one good member is enough: no reason then
    fake.disk("sde", 8, 64)
    fake.stacked("dm", "dm-4", 253, 4, ["dm-3", "sde"])
    r = resolve_dev(253, 4, sysfs=str(fake.root))
    assert pairs(r.drives) == [("sde", "8:64")] and r.reason is None


def test_fake_cycle_and_dangling_member_end(fake: FakeSysfs) -> None:
    fake.stacked("dm", "dm-5", 253, 5, [])
    fake.stacked("dm", "dm-6", 253, 6, ["dm-5"])
    fake.member("dm-5", "dm-6")                    # only a broken tree has this
    r = resolve_dev(253, 5, sysfs=str(fake.root))
    assert r.drives == () and r.reason == "253:5: no whole disk found"
    fake.disk("sdf", 8, 80)
    fake.stacked("dm", "dm-7", 253, 7, ["sdf"])
    (fake.dirs["dm-7"] / "slaves" / "gone").symlink_to("../../nowhere")
    assert got(fake, 253, 7) == [("sdf", "8:80")]


def test_fake_unknown_number_and_anonymous(fake: FakeSysfs) -> None:
    r = resolve_dev(8, 99, sysfs=str(fake.root))
    assert r.drives == () and r.reason == (
        f"device 8:99 is not in {fake.root}/dev/block (gone, or sysfs is not mounted)")
    assert resolve_dev(0, 40, sysfs=str(fake.root)).reason == (
        "device 0:40 is anonymous (major 0): no block device is behind it")


def test_fake_block_device_node_goes_through_its_rdev(fake: FakeSysfs, tmp_path: Path
                                                      ) -> None:
    """A real block device node (mknod; never opened) for dm-2, resolved through
    the fake tree: the path API takes st_rdev for a block device."""
    need_root()
    fake.disk("sdg", 8, 96)
    fake.stacked("dm", "dm-2", 253, 2, ["sdg"])
    node = tmp_path / "dm-2"
    os.mknod(node, 0o600 | 0o060000, os.makedev(253, 2))
    assert pairs(drives_of(str(node), sysfs=str(fake.root))) == [("sdg", "8:96")]


# ---- a property: generated trees against a reachability model ---------------------------


@dataclass
class Shape:
    """A generated block-device graph: kinds, partitions' disks, members."""

    kinds: list[str]                               # disk | dm | md | part
    parent: dict[int, int] = field(default_factory=dict)       # partition -> disk
    members: dict[int, list[int]] = field(default_factory=dict)


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    n = draw(st.integers(1, 8))
    kinds = [draw(st.sampled_from(["disk", "dm", "md", "part"])) for _ in range(n)]
    kinds[0] = "disk" if kinds[0] == "part" else kinds[0]   # a partition needs a disk first
    shape = Shape(kinds)
    for i, k in enumerate(kinds):
        if k == "part":
            disks = [j for j in range(i) if kinds[j] != "part"]
            shape.parent[i] = draw(st.sampled_from(disks))
        else:
            # any node, itself and later ones included: cycles are allowed
            shape.members[i] = sorted(draw(st.sets(st.integers(0, n - 1), max_size=3)))
    return shape


def build(shape: Shape, root: Path) -> FakeSysfs:
    fake = FakeSysfs(root)
    name = [f"n{i}" for i in range(len(shape.kinds))]
    for i, k in enumerate(shape.kinds):
        if k == "part":
            fake.partition(name[shape.parent[i]], name[i], 8, i)
        elif k == "disk":
            fake.disk(name[i], 8, i)
        else:
            fake.stacked(k, name[i], 8, i, [])
    for i, ms in shape.members.items():
        for m in ms:
            fake.member(name[i], name[m])
    return fake


def model(shape: Shape, start: int) -> set[int]:
    """Leaves reachable from ``start``, by a fixed point (not the walk under test)."""
    def succ(i: int) -> list[int]:
        return [shape.parent[i]] if i in shape.parent else shape.members.get(i, [])

    reach = {start}
    while True:
        more = reach | {j for i in reach for j in succ(i)}
        if more == reach:
            break
        reach = more
    return {i for i in reach if shape.kinds[i] == "disk" and not shape.members.get(i)}


@settings(max_examples=150, deadline=None)
@given(shapes(), st.data())
def test_resolution_matches_reachability(shape: Shape, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(shape.kinds) - 1))
    # tmpfs where there is one: a tree costs ~3 ms there, ~80 ms on this host's /tmp
    root = Path(tempfile.mkdtemp(prefix="fakesys",
                                 dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        fake = build(shape, root)
        r = resolve_dev(8, start, sysfs=str(root))
        want = model(shape, start)
        assert [d.minor for d in r.drives] == sorted(want)          # ordered, no duplicates
        assert all(d.name == f"n{d.minor}" and d.major == 8 for d in r.drives)
        for d in r.drives:                                          # whole disks, leaves
            assert not (fake.dirs[d.name] / "partition").exists()
            assert not os.listdir(fake.dirs[d.name] / "slaves")
        assert (r.reason is None) == bool(want)
    finally:
        shutil.rmtree(root)


# ---- the targets' completion paths ----------------------------------------------------------


def test_null_and_mem_have_one_path_and_no_drive() -> None:
    assert NullTarget(1 << 20).completion_paths() == [CompletionPath(
        0, "null", None, (), "the null target stores nothing: its I/O reaches no drive")]
    p = MemTarget(1 << 20).completion_paths()
    assert [x.to_dict() for x in p] == [{
        "index": 0, "name": "mem", "backing": None, "drives": [],
        "no_drive": "the mem target keeps its data in the server's memory"}]


def test_loop_and_mirror_paths_are_the_drives_under_their_backing_files(
        ext4_on_loop: Loop, tmp_path: Path) -> None:
    assert ext4_on_loop.mnt is not None
    leg0 = ext4_on_loop.mnt / "leg0.img"
    leg0.write_bytes(b"\0" * (1 << 20))
    with loop_device(tmp_path / "disk1.img", 4 << 20) as bare:     # a leg on a bare device
        loop = LoopTarget(str(leg0), direct=False)
        try:
            assert [p.to_dict() for p in loop.completion_paths()] == [{
                "index": 0, "name": "loop", "backing": str(leg0),
                "drives": [{"name": ext4_on_loop.name, "dev": ext4_on_loop.dev}],
                "no_drive": None}]
        finally:
            loop.close()
        mirror = MirrorTarget([str(leg0), bare.path], size=1 << 20, direct=False)
        try:
            paths = mirror.completion_paths()
            assert [(p.index, p.name, p.backing, pairs(p.drives), p.no_drive)
                    for p in paths] == [
                (0, "leg0", str(leg0), [(ext4_on_loop.name, ext4_on_loop.dev)], None),
                (1, "leg1", bare.path, [(bare.name, bare.dev)], None)]
        finally:
            mirror.close()
        # once closed, the paths are looked up by name
        assert pairs(mirror.completion_paths()[1].drives) == [(bare.name, bare.dev)]


class _Declares(Target):
    def __init__(self, declared: Any) -> None:
        self.declared = declared

    def size(self) -> int:
        return 1 << 20

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def drives(self) -> Any:
        if isinstance(self.declared, Exception):
            raise self.declared
        return self.declared


class _Silent(_Declares):
    drives = Target.drives    # the default: none


def test_plugin_paths_are_what_it_declares(tmp_path: Path) -> None:
    root_disk = drives_of(str(tmp_path))
    sda = Drive("sda", 8, 0)

    def path0(declared: Any) -> CompletionPath:
        [p] = PluginBackend(_Declares(declared), "t:T", timeout=0).completion_paths()
        assert (p.index, p.name, p.backing) == (0, "python", None)
        return p

    assert path0([str(tmp_path), sda]).drives == tuple(sorted({*root_disk, sda}))
    assert path0([sda, sda]).drives == (sda,)
    p = path0([str(tmp_path / "missing")])
    assert p.drives == () and p.no_drive == (
        f"cannot find the drives of {tmp_path / 'missing'}: No such file or directory")
    assert path0([42]).no_drive == ("plug-in t:T: drives() returned 42, neither a path "
                                    "nor a ublk_driver.drives.Drive")
    assert path0(RuntimeError("no")).no_drive == "plug-in t:T: drives() raised RuntimeError('no')"
    [p] = PluginBackend(_Silent(None), "t:S", timeout=0).completion_paths()
    assert p.drives == () and p.no_drive == (
        "plug-in t:S declares no drives (its class may define drives())")
