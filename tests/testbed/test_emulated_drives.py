"""The test bed's emulated drives: real NVMe and SATA hardware under qemu, read
with smartctl and turned critical through qemu's QMP from inside the guest.

Two kinds:
* ``@pytest.mark.ublk`` tests run in the test bed against the real emulated
  drives, the guest's real nvme/ahci drivers, the real smartctl and qemu's real
  QMP monitor (they share one boot with the other ublk tests: kept short, and
  every drive they change is set back);
* host unit tests of the pure parts (qemu options, manifest, discovery, QMP
  reply matching), each saying which piece it fakes.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import stat
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ublk_driver.testbed import _vm, emulator
from ublk_driver.testbed.emulator import (
    EmulatedDrive,
    EmulatorError,
    set_smart_critical_warning,
    smart_critical_warning,
)

pytest_plugins = ["pytester"]

SMARTCTL_DISK_FAILING = 0x08  # smartctl exit status bit 3: "SMART status ... DISK FAILING"
SMARTCTL_CANNOT_RUN = 0x03  # bits 0-1: bad command line, device open failed


def smartctl(device: str) -> tuple[int, dict[str, Any]]:
    """``smartctl --json -a device``: its exit status and its JSON document."""
    proc = subprocess.run(["smartctl", "--json", "-a", device], capture_output=True,
                          text=True, timeout=120, check=False)
    doc = json.loads(proc.stdout)
    assert not proc.returncode & SMARTCTL_CANNOT_RUN, (proc.returncode, doc.get("smartctl"))
    return proc.returncode, doc


def _nvme(drives: list[EmulatedDrive]) -> list[EmulatedDrive]:
    return [d for d in drives if d.kind == "nvme"]


# --------------------------------------------------------------------------
# In the test bed
# --------------------------------------------------------------------------


@pytest.mark.ublk
def test_drives_exist_with_their_serials_and_healthy_smart(
    emulated_drives: list[EmulatedDrive],
) -> None:
    assert [(d.qemu_id, d.kind, d.serial, d.size_bytes) for d in emulated_drives] == [
        (s.id, s.kind, s.serial, s.size_bytes) for s in _vm.EMULATED_DRIVES
    ]
    for drive in emulated_drives:
        assert stat.S_ISBLK(os.stat(drive.path).st_mode), drive
        sectors = int(Path(f"/sys/block/{drive.name}/size").read_text())
        assert sectors * 512 == drive.size_bytes, drive
        status, doc = smartctl(drive.controller)
        assert doc["serial_number"] == drive.serial
        assert doc["smart_status"]["passed"] is True, doc["smart_status"]
        assert not status & SMARTCTL_DISK_FAILING, status
        if drive.kind == "nvme":
            assert doc["nvme_smart_health_information_log"]["critical_warning"] == 0
            assert smart_critical_warning(drive) == 0


@pytest.mark.ublk
def test_critical_warning_fails_the_smart_status(emulated_drives: list[EmulatedDrive]) -> None:
    target, other = _nvme(emulated_drives)
    try:
        set_smart_critical_warning(target, 2)  # temperature outside its thresholds
        assert smart_critical_warning(target) == 2
        status, doc = smartctl(target.controller)
        assert doc["nvme_smart_health_information_log"]["critical_warning"] == 2
        assert doc["smart_status"]["passed"] is False, doc["smart_status"]
        assert status & SMARTCTL_DISK_FAILING, status
        # Per controller: the other drive stays healthy.
        status, doc = smartctl(other.controller)
        assert doc["smart_status"]["passed"] is True and not status & SMARTCTL_DISK_FAILING
    finally:
        set_smart_critical_warning(target, 0)
    status, doc = smartctl(target.controller)
    assert doc["smart_status"]["passed"] is True and not status & SMARTCTL_DISK_FAILING
    # qemu refuses bits it does not model, in one line.
    with pytest.raises(EmulatorError, match=r"qemu refused qom-set: .+") as refused:
        set_smart_critical_warning(target, 0x80)
    assert "\n" not in str(refused.value)
    ata = next(d for d in emulated_drives if d.kind == "ata")
    with pytest.raises(EmulatorError, match="only the emulated NVMe drives"):
        set_smart_critical_warning(ata, 1)


def _direct_read_ms(device: str, count: int) -> list[float]:
    """Milliseconds each of ``count`` 4 KiB O_DIRECT reads takes (1 MiB apart)."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        times = []
        for i in range(count):
            start = time.perf_counter()
            assert os.preadv(fd, [buf], i << 20) == 4096
            times.append((time.perf_counter() - start) * 1000)
        return times
    finally:
        os.close(fd)


@pytest.mark.ublk
def test_dm_delay_makes_an_emulated_drive_slow(emulated_drives: list[EmulatedDrive]) -> None:
    """A dm-delay target (20 ms on reads, none on writes) over nvme1's namespace:
    the way a test makes one drive slow underneath a file system."""
    drive = next(d for d in emulated_drives if d.qemu_id == "nvme1")
    subprocess.run(["modprobe", "dm_delay"], check=True, capture_output=True)
    sectors = int(Path(f"/sys/block/{drive.name}/size").read_text())
    name = "ublkml-test-delay"
    table = f"0 {sectors} delay {drive.path} 0 20 {drive.path} 0 0"
    # No udev in the guest: --noudevsync, and the node is found by its minor.
    subprocess.run(["dmsetup", "create", "--noudevsync", name, "--table", table],
                   check=True, capture_output=True)
    try:
        minor = subprocess.run(["dmsetup", "info", "-c", "--noheadings", "-o", "minor", name],
                               check=True, capture_output=True, text=True).stdout.strip()
        raw = statistics.median(_direct_read_ms(drive.path, 6))
        delayed = statistics.median(_direct_read_ms(f"/dev/dm-{minor}", 6))
        assert delayed >= 15 and delayed - raw >= 15, (raw, delayed)
    finally:
        subprocess.run(["dmsetup", "remove", "--noudevsync", name], check=True,
                       capture_output=True)


# --------------------------------------------------------------------------
# On the host: the pure parts
# --------------------------------------------------------------------------


def test_qemu_command_adds_the_drives_and_the_qmp_port(tmp_path: Path) -> None:
    image = _vm.TestbedImage("6.12.117+deb12-amd64", "linux-image-x", tmp_path)
    plain = " ".join(_vm.qemu_command(image, ctl_dir="/c"))
    assert "nvme" not in plain and "virtserialport" not in plain
    cmd = _vm.qemu_command(image, ctl_dir="/c", emulator_dir="/c/dr,ives")
    devices = [cmd[i + 1] for i, word in enumerate(cmd) if word == "-device"]
    assert "nvme,id=nvme0,serial=UBLKML-NVME0,drive=nvme0-disk" in devices
    assert "nvme,id=nvme1,serial=UBLKML-NVME1,drive=nvme1-disk" in devices
    assert "ahci,id=ahci0" in devices
    assert "ide-hd,id=sata0,bus=ahci0.0,drive=sata0-disk,serial=UBLKML-SATA0" in devices
    assert f"virtserialport,bus=vser0.0,chardev=qmp-guest,name={_vm.QMP_PORT_NAME}" in devices
    drives = [cmd[i + 1] for i, word in enumerate(cmd) if word == "-drive"]
    assert drives[0].startswith("file=/c/dr,,ives/nvme0.img,if=none,id=nvme0-disk,format=raw")
    chardevs = [cmd[i + 1] for i, word in enumerate(cmd) if word == "-chardev"]
    # The listener comes first, so that qemu's own client of it can connect.
    assert chardevs == ["socket,id=qmp-monitor,path=/c/dr,,ives/qmp.sock,server=on,wait=off",
                        "socket,id=qmp-guest,path=/c/dr,,ives/qmp.sock"]
    assert cmd[cmd.index("-mon") + 1] == "chardev=qmp-monitor,mode=control"


def test_prepare_emulator_makes_sparse_drives_and_a_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "drives"
    directory.mkdir()
    _vm.prepare_emulator(tmp_path, directory)
    for spec in _vm.EMULATED_DRIVES:
        backing = os.stat(directory / f"{spec.id}.img")
        assert backing.st_size == spec.size_bytes and backing.st_blocks == 0
    port, specs = emulator.parse_manifest((tmp_path / "emulator.json").read_text())
    assert port == _vm.QMP_PORT_NAME and specs == list(_vm.EMULATED_DRIVES)
    # What stage 2 runs: nvme; sd_mod before ahci, which probes only port 0.
    assert (tmp_path / "emulator.modules").read_text().splitlines() == [
        "nvme", "sd_mod", "ahci mask_port_map=0x1"]
    two_sata = [_vm.DriveSpec("a", "ata", "A", 1), _vm.DriveSpec("b", "ata", "B", 1)]
    assert _vm.guest_modules(two_sata) == ["sd_mod", "ahci mask_port_map=0x3"]
    assert _vm.guest_modules([]) == []
    long_dir = tmp_path / ("x" * 100)
    long_dir.mkdir()
    with pytest.raises(_vm.TestbedError, match="set TMPDIR"):
        _vm.prepare_emulator(tmp_path, long_dir)


_drive_specs = st.lists(st.builds(
    _vm.DriveSpec,
    id=st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True),
    kind=st.sampled_from(["nvme", "ata"]),
    serial=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
    size_bytes=st.integers(0, 1 << 40),
), max_size=8)


@given(_drive_specs)
def test_manifest_round_trips(specs: list[_vm.DriveSpec]) -> None:
    assert emulator.parse_manifest(_vm.emulator_manifest(specs)) == (_vm.QMP_PORT_NAME, specs)


def test_a_malformed_manifest_is_one_line() -> None:
    for text in ("{", '{"qmp_port": "p"}', '{"qmp_port": "p", "drives": [{"kind": "scsi", '
                 '"id": "x", "serial": "s", "size_bytes": 1}]}'):
        with pytest.raises(EmulatorError, match="manifest") as info:
            emulator.parse_manifest(text)
        assert "\n" not in str(info.value)


def _fake_sysfs(root: Path) -> None:
    """A sysfs tree where the kernel numbered the NVMe controllers the other
    way round from qemu's ids (async probing may do that)."""
    for ctrl, serial in (("nvme0", "UBLKML-NVME1"), ("nvme1", "UBLKML-NVME0")):
        (root / "class/nvme" / ctrl).mkdir(parents=True)
        (root / "class/nvme" / ctrl / "serial").write_text(serial.ljust(20) + "\n")
        (root / "block" / f"{ctrl}n1").mkdir(parents=True)
        (root / "block" / f"{ctrl}n1" / "device").symlink_to(root / "class/nvme" / ctrl)
    (root / "block/sda/device").mkdir(parents=True)
    (root / "block/sda/device/vpd_pg80").write_bytes(b"\0\x80\0\x14" + b"UBLKML-SATA0".ljust(20))
    (root / "block/loop0").mkdir()


def test_drives_are_found_by_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fakes sysfs (a directory tree) and the manifest; the real ones are read
    by the ublk tests above."""
    (tmp_path / "emulator.json").write_text(_vm.emulator_manifest(_vm.EMULATED_DRIVES))
    monkeypatch.setenv(emulator.MANIFEST_ENV, str(tmp_path / "emulator.json"))
    sysfs = tmp_path / "sys"
    _fake_sysfs(sysfs)
    drives = emulator.emulated_drives(sys_root=str(sysfs), timeout=0)
    assert [(d.qemu_id, d.name, d.controller, d.qom_path) for d in drives] == [
        ("nvme0", "nvme1n1", "/dev/nvme1", "/machine/peripheral/nvme0"),
        ("nvme1", "nvme0n1", "/dev/nvme0", "/machine/peripheral/nvme1"),
        ("sata0", "sda", "/dev/sda", "/machine/peripheral/sata0"),
    ]
    assert drives[2].path == "/dev/sda"
    (sysfs / "block/sda/device/vpd_pg80").unlink()
    with pytest.raises(EmulatorError, match=r"sata0 \(ata, serial UBLKML-SATA0\) did not "
                       r"appear within 0 s") as info:
        emulator.emulated_drives(sys_root=str(sysfs), timeout=0)
    assert "\n" not in str(info.value)
    (tmp_path / "emulator.error").write_text("modprobe nvme failed: FATAL: x\nmore\n")
    with pytest.raises(EmulatorError, match=r"drivers: modprobe nvme failed: FATAL: x; more$"):
        emulator.emulated_drives(sys_root=str(sysfs), timeout=5)


def test_outside_the_test_bed_the_fixture_fails_in_one_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv(emulator.MANIFEST_ENV, str(tmp_path / "absent.json"))
    monkeypatch.delenv("UBLKML_IN_VM", raising=False)
    if _vm.in_vm():
        pytest.fail("this host test must not be run inside the test bed")
    with pytest.raises(EmulatorError, match=r"mark the test @pytest.mark.ublk") as info:
        emulator.emulated_drives()
    assert "\n" not in str(info.value)
    # The project's fixture turns that into a failed set-up (an error), never a skip.
    pytester.makeconftest("from tests.conftest import emulated_drives  # noqa: F401\n")
    pytester.makepyfile("def test_wants_drives(emulated_drives):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*emulated drives exist only inside the ublkml test bed*"])


class _FakeQemu(threading.Thread):
    """qemu's side of the QMP port, scripted: reads one request and answers
    with stale lines first (greeting, event, a reply to someone else), then
    ``reply`` (with the request's id) unless it is None."""

    def __init__(self, sock: socket.socket, reply: dict[str, Any] | None) -> None:
        super().__init__(daemon=True)
        self.sock, self.reply = sock, reply
        self.request: dict[str, Any] = {}

    def run(self) -> None:
        data = b""
        while not data.endswith(b"\n"):
            data += self.sock.recv(4096)
        self.request = json.loads(data)
        stale = [b'{"QMP": {"version": {}, "capabilities": []}}', b'{"return": {}, "id": "old"}',
                 b'{"event": "RTC_CHANGE", "data": {"offset": 0}}', b'ial", "data": {}}']
        self.sock.sendall(b"\r\n".join(stale) + b"\r\n")
        if self.reply is not None:
            self.sock.sendall(json.dumps({**self.reply, "id": self.request["id"]}).encode()
                              + b"\r\n")


@pytest.mark.parametrize(("reply", "expected"), [
    ({"return": 7}, 7),
    ({"error": {"class": "GenericError", "desc": "unsupported smart critical warning bits"}},
     "qemu refused qom-get: unsupported smart critical warning bits"),
    (None, "did not answer within 0.3 s"),
])
def test_qmp_channel_matches_its_reply_by_id(
    reply: dict[str, Any] | None, expected: object,
) -> None:
    """Fakes qemu's end of the port (a socket pair): the real monitor answers
    the ublk tests above."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        qemu = _FakeQemu(theirs, reply)
        qemu.start()
        channel = emulator.QmpChannel(ours.fileno(), timeout=0.3)
        arguments = {"path": "/machine/peripheral/nvme0", "property": "smart_critical_warning"}
        if isinstance(expected, int):
            assert channel.execute("qom-get", arguments) == expected
        else:
            with pytest.raises(EmulatorError, match=str(expected)):
                channel.execute("qom-get", arguments)
        qemu.join(5)
        assert qemu.request["execute"] == "qom-get"
        assert qemu.request["arguments"] == arguments
        assert str(qemu.request["id"]).startswith("ublkml-")
