"""The test bed's emulated drives, seen from inside the guest.

Every test-bed boot gets real emulated hardware (:data:`~ublk_driver.testbed._vm.EMULATED_DRIVES`):
two NVMe controllers with one namespace each and one SATA disk on AHCI, over
sparse files on the host.  The guest's own drivers (nvme, ahci) drive them,
so ``smartctl`` reads a real NVMe SMART/health log and real ATA SMART data.

qemu's NVMe controller has a run-time property, ``smart_critical_warning``,
that sets the Critical Warning byte of its SMART/health log.  The guest
reaches qemu's QMP monitor through the virtio-serial port ``org.ublkml.qmp``
(``/dev/vportNpM``), so a test turns a drive critical from where it runs::

    from ublk_driver.testbed.emulator import emulated_drives, set_smart_critical_warning

    drive = next(d for d in emulated_drives() if d.kind == "nvme")
    set_smart_critical_warning(drive, 2)   # smartctl -a /dev/nvmeX: FAILED
    ...
    set_smart_critical_warning(drive, 0)   # other tests share the drives

Conventions: the drives are found by serial number in sysfs (the kernel
numbers NVMe controllers in probe order, which is not qemu's order); every
failure raises :class:`EmulatorError` (a :class:`TestbedError`) whose message
says what to do, e.g. outside the test bed.  Only this module talks QMP.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import select
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from ublk_driver.testbed._vm import GUEST_EMULATOR_MANIFEST, DriveSpec, TestbedError, in_vm

__all__ = [
    "MANIFEST_ENV",
    "SMART_CRITICAL_WARNING_BITS",
    "EmulatedDrive",
    "EmulatorError",
    "QmpChannel",
    "emulated_drives",
    "parse_manifest",
    "qmp_execute",
    "set_smart_critical_warning",
    "smart_critical_warning",
]

#: Overrides where the manifest is read from (default: the control share's
#: ``/run/ublkml/emulator.json``, which only the test bed has).
MANIFEST_ENV = "UBLKML_TESTBED_EMULATOR"

#: The Critical Warning bits qemu's NVMe controller accepts (NVMe base spec,
#: SMART/Health log byte 0); any other bit is refused by qemu.
SMART_CRITICAL_WARNING_BITS = {
    0x01: "available spare below threshold",
    0x02: "temperature outside its thresholds",
    0x04: "NVM subsystem reliability degraded",
    0x08: "media placed in read-only mode",
    0x10: "volatile memory backup device failed",
}

#: Serialises guest processes: a virtio-serial port opens once at a time.
_QMP_LOCK = "/run/ublkml-qmp.lock"
_NVME_NAMESPACE = re.compile(r"nvme\d+n\d+")
_SCSI_DISK = re.compile(r"sd[a-z]+")


class EmulatorError(TestbedError):
    """The emulated drives or their QMP port are missing, or qemu refused a command.

    ``str(err)`` is one line saying what went wrong and what to do.
    """

    __test__ = False


@dataclass(frozen=True)
class EmulatedDrive:
    """One emulated drive as the guest sees it."""

    name: str
    """Block device name: ``nvme0n1`` (the namespace) or ``sda``."""
    kind: Literal["nvme", "ata"]
    serial: str
    """Serial number, as sysfs and smartctl report it (``UBLKML-NVME0``)."""
    controller: str
    """The node to give smartctl: ``/dev/nvme0`` (the NVMe controller, whose
    SMART/health log this is) or, for ATA, the disk itself (``/dev/sda``)."""
    qom_path: str
    """The qemu device behind it (``/machine/peripheral/nvme0``)."""
    size_bytes: int
    qemu_id: str
    """qemu's device id (``nvme0``); need not match the guest's numbering."""

    @property
    def path(self) -> str:
        """The block device node (``/dev/nvme0n1``)."""
        return f"/dev/{self.name}"


# --------------------------------------------------------------------------
# The manifest the host writes, and the drives in sysfs
# --------------------------------------------------------------------------


def _manifest_path() -> str:
    return os.environ.get(MANIFEST_ENV) or GUEST_EMULATOR_MANIFEST


def parse_manifest(text: str) -> tuple[str, list[DriveSpec]]:
    """The QMP port name and the drives from the manifest's JSON text
    (written by :func:`ublk_driver.testbed._vm.prepare_emulator`)."""
    try:
        doc = json.loads(text)
        port = doc["qmp_port"]
        drives = [
            DriveSpec(id=str(d["id"]), kind=str(d["kind"]), serial=str(d["serial"]),
                      size_bytes=int(d["size_bytes"]))
            for d in doc["drives"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise EmulatorError(
            f"the emulator manifest is malformed ({exc!r}): the host and guest run "
            "different ublkml versions? re-run the tests"
        ) from exc
    if not isinstance(port, str) or any(d.kind not in ("nvme", "ata") for d in drives):
        raise EmulatorError("the emulator manifest names an unknown drive kind or port: "
                            "the host and guest run different ublkml versions? re-run the tests")
    return port, drives


def _load_manifest() -> tuple[str, list[DriveSpec]]:
    path = _manifest_path()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if not in_vm():
            raise EmulatorError(
                "emulated drives exist only inside the ublkml test bed: mark the test "
                "@pytest.mark.ublk (it then runs there) or use `ublkml vm run`"
            ) from None
        raise EmulatorError(
            f"this test bed was booted without emulated drives ({path} is missing): "
            "boot it with testbed.run(..., emulated_drives=True), the default"
        ) from None
    except OSError as exc:
        raise EmulatorError(f"cannot read the emulator manifest {path}: {exc}") from exc
    return parse_manifest(text)


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace").strip()
    except OSError:
        return None


def _ata_serial(block: Path) -> str | None:
    """The serial of a SCSI disk: VPD page 0x80 (unit serial number), which
    libata fills with the ATA serial; a 4-byte header precedes it."""
    try:
        page = (block / "device" / "vpd_pg80").read_bytes()
    except OSError:
        return None
    return page[4:].decode(errors="replace").strip(" \0") or None


def _find_in_sysfs(sys_root: Path) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """({nvme serial: (namespace, controller)}, {ata serial: disk}) from sysfs."""
    controllers: dict[str, str] = {}
    for ctrl in sorted((sys_root / "class" / "nvme").glob("nvme*")):
        serial = _read(ctrl / "serial")
        if serial:
            controllers[serial] = ctrl.name
    nvme: dict[str, tuple[str, str]] = {}
    ata: dict[str, str] = {}
    for block in sorted((sys_root / "block").glob("*")):
        if _NVME_NAMESPACE.fullmatch(block.name):
            # device/ is the controller, or with native multipath the
            # subsystem: both have the serial.
            serial = _read(block / "device" / "serial")
            if serial in controllers and serial not in nvme:
                nvme[serial] = (block.name, controllers[serial])
        elif _SCSI_DISK.fullmatch(block.name):
            serial = _ata_serial(block)
            if serial:
                ata[serial] = block.name
    return nvme, ata


def emulated_drives(*, timeout: float = 20.0, sys_root: str = "/sys") -> list[EmulatedDrive]:
    """The test bed's emulated drives, in the host's order (NVMe first).

    Waits up to ``timeout`` seconds for them to appear (the drivers probe
    them while the guest's command starts).  Raises :class:`EmulatorError`
    outside the test bed, in a test bed booted without them, or when one
    does not show up.
    """
    _, specs = _load_manifest()
    error_file = Path(_manifest_path()).with_name("emulator.error")
    deadline = time.monotonic() + timeout
    while True:
        # Stage 2 writes it when the drives' drivers failed to load.
        failure = _read(error_file)
        if failure is not None:
            lines = [line.strip() for line in failure.splitlines() if line.strip()]
            raise EmulatorError(f"the test bed could not load the emulated drives' drivers: "
                                f"{'; '.join(lines)}")
        nvme, ata = _find_in_sysfs(Path(sys_root))
        found: list[EmulatedDrive] = []
        missing: list[DriveSpec] = []
        for spec in specs:
            if spec.kind == "nvme" and spec.serial in nvme:
                name, ctrl = nvme[spec.serial]
                found.append(EmulatedDrive(name, "nvme", spec.serial, f"/dev/{ctrl}",
                                           spec.qom_path, spec.size_bytes, spec.id))
            elif spec.kind == "ata" and spec.serial in ata:
                name = ata[spec.serial]
                found.append(EmulatedDrive(name, "ata", spec.serial, f"/dev/{name}",
                                           spec.qom_path, spec.size_bytes, spec.id))
            else:
                missing.append(spec)
        if not missing:
            return found
        if time.monotonic() >= deadline:
            names = ", ".join(f"{s.id} ({s.kind}, serial {s.serial})" for s in missing)
            raise EmulatorError(
                f"emulated drive(s) {names} did not appear within {timeout:g} s: see the "
                "guest kernel log (dmesg) for nvme/ahci errors"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------
# QMP over the virtio-serial port
# --------------------------------------------------------------------------


def _qmp_port_device(name: str) -> str:
    """``/dev/vportNpM`` of the virtio-serial port called ``name`` (there is
    no udev in the guest, so no /dev/virtio-ports/ links)."""
    for port in sorted(Path("/sys/class/virtio-ports").glob("vport*")):
        if _read(port / "name") == name:
            return f"/dev/{port.name}"
    raise EmulatorError(
        f"no virtio-serial port named {name} in this guest: the test bed's qemu was "
        "started without its QMP port (run(..., emulated_drives=True) adds it)"
    )


class QmpChannel:
    """QMP over one open file descriptor: send a command, wait for the reply
    that carries its id.

    The port's QMP connection lives as long as qemu, across the guest's
    opens: the greeting, events and replies to earlier users may still be
    queued when a new user opens the port.  Every command therefore carries a
    fresh id, and everything else read is skipped.
    """

    def __init__(self, fd: int, *, timeout: float = 10.0) -> None:
        self._fd = fd
        self._timeout = timeout
        self._buffer = b""

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EmulatorError(
                    f"qemu's QMP monitor did not answer within {self._timeout:g} s: "
                    "is the guest or the host overloaded? retry"
                )
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                raise EmulatorError("qemu's QMP port closed: the test bed is shutting down")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _send(self, data: bytes, deadline: float) -> None:
        while data:
            if time.monotonic() >= deadline:
                raise EmulatorError("cannot write to qemu's QMP port: it stays full; retry")
            _, ready, _ = select.select([], [self._fd], [], max(deadline - time.monotonic(), 0))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    data = data[os.write(self._fd, data):]

    def execute(self, command: str, arguments: Mapping[str, object] | None = None, *,
                accept_error: bool = False) -> Any:
        """Run one QMP command and return its ``return`` value.

        qemu's error reply raises :class:`EmulatorError` with qemu's own
        description, unless ``accept_error`` (then the error object is returned).
        """
        ident = f"ublkml-{uuid.uuid4().hex}"
        request: dict[str, object] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = dict(arguments)
        deadline = time.monotonic() + self._timeout
        self._send(json.dumps(request).encode() + b"\n", deadline)
        while True:
            line = self._readline(deadline)
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # the tail of a line an earlier user left half read
            if not isinstance(reply, dict) or reply.get("id") != ident:
                continue  # the greeting, an event, or a reply to someone else
            if "error" in reply:
                if accept_error:
                    return reply["error"]
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise EmulatorError(
                    f"qemu refused {command}: {error.get('desc', reply['error'])}"
                )
            return reply.get("return")


def _open_port(device: str, deadline: float) -> int:
    while True:
        try:
            return os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            # EBUSY: open elsewhere (a process outside our lock, e.g. a shell).
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise EmulatorError(f"cannot open qemu's QMP port {device}: {exc}") from exc
        time.sleep(0.05)


@contextlib.contextmanager
def _qmp_session(timeout: float) -> Iterator[QmpChannel]:
    port, _ = _load_manifest()
    device = _qmp_port_device(port)
    with open(_QMP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd = _open_port(device, time.monotonic() + timeout)
        try:
            channel = QmpChannel(fd, timeout=timeout)
            # Needed once per connection, and the connection outlives this
            # open: a later session gets an error for it, which is fine.
            channel.execute("qmp_capabilities", accept_error=True)
            yield channel
        finally:
            os.close(fd)


def qmp_execute(command: str, arguments: Mapping[str, object] | None = None, *,
                timeout: float = 10.0) -> Any:
    """Run one QMP command on the test bed's qemu, from inside the guest, and
    return its result (e.g. ``qmp_execute("query-status")``)."""
    with _qmp_session(timeout) as channel:
        return channel.execute(command, arguments)


def _require_nvme(drive: EmulatedDrive) -> None:
    if drive.kind != "nvme":
        raise EmulatorError(
            f"{drive.name} is an {drive.kind.upper()} drive: only the emulated NVMe drives "
            "have a settable SMART critical warning"
        )


def set_smart_critical_warning(drive: EmulatedDrive, value: int) -> None:
    """Set the Critical Warning byte of ``drive``'s NVMe SMART/health log.

    Non-zero makes ``smartctl -H`` report FAILED (bits in
    :data:`SMART_CRITICAL_WARNING_BITS`, e.g. 2 = temperature); 0 makes it
    healthy again.  The drives are shared by the session's tests: set it back.
    """
    _require_nvme(drive)
    if not 0 <= value <= 0xFF:
        raise ValueError(f"critical warning {value} is not a byte (0..255)")
    qmp_execute("qom-set", {"path": drive.qom_path, "property": "smart_critical_warning",
                            "value": value})


def smart_critical_warning(drive: EmulatedDrive) -> int:
    """The Critical Warning byte qemu currently reports for ``drive``."""
    _require_nvme(drive)
    value = qmp_execute("qom-get", {"path": drive.qom_path,
                                    "property": "smart_critical_warning"})
    return int(cast(int, value))
