"""Kernel-side accounting of block devices: eBPF, or ``/sys/block`` as a fall-back.

:class:`BpfAccounting` loads ``bpf/blkacct.bpf.o`` (compiled when the package
is built, by setup.py's ``build_bpf``; never here), attaches it to the block tracepoints
(``tp_btf`` where the kernel has BTF, else the classic trace events) and pins
its maps under ``/sys/fs/bpf/ublkml/<instance>/``: the agent's sysfs-like
interface, readable by any root process (:class:`PinnedAccounting`, or
``bpftool map dump pinned ...``) for as long as the agent runs.

Devices are kernel ``dev_t`` values (``MAJOR << 20 | MINOR``, the kernel's
internal encoding, which is what the tracepoints see).  Counters start at
zero when a device is watched.  Where eBPF cannot be used (not root, no BTF,
no libbpf, the object missing or refused), :func:`sysfs_stats` reads the
kernel's cumulative ``/sys/block/<dev>/stat`` instead, and every result says
which source it came from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_agent import _libbpf
from kernel_agent.errors import AgentError, BpfUnavailableError, UnknownDeviceError

#: The objects sit next to this module: in site-packages for an installed wheel,
#: in the source tree for a checkout or an editable install (libbpf opens a real
#: file, so a path rather than an importlib.resources Traversable).
BPF_DIR = Path(__file__).resolve().parent / "bpf"
OBJECT_PATH = BPF_DIR / "blkacct.bpf.o"
#: Written instead of the objects by a build with UBLKML_NO_BPF=1 (setup.py's NO_BPF_NOTE).
NO_BPF_NOTE = BPF_DIR / "NO_BPF"
BPFFS = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"
PIN_ROOT = f"{BPFFS}/ublkml"

OPS = ("read", "write", "flush", "discard", "other")
NR_OPS = len(OPS)
NR_SLOTS = 32
EV_SLOW = 1
EV_ERROR = 2
MAPS = ("ka_slots", "ka_devices", "ka_stats", "ka_events")
#: Watched devices per agent instance (KA_MAX_DEVS): the programs find a
#: device by comparing its dev_t with this many slots.
MAX_DEVS = 16

# Mirrors of blkacct.bpf.c's structures (tests compare sizes with its BTF).
CFG = struct.Struct("<QQQQ")                                 # struct ka_dev_cfg
F_PRECISE = 1
STATS = struct.Struct(f"<{NR_OPS}Q{NR_OPS}QQqQQQ{NR_SLOTS}Q")  # struct ka_dev_stats
EVENT = struct.Struct("<QQQIIIiII")                          # struct ka_event
KEY = struct.Struct("<I")
SLOTS = struct.Struct(f"<{MAX_DEVS}I")                        # struct ka_slots


def kdev(major: int, minor: int) -> int:
    """The kernel's internal dev_t (what the tracepoints report)."""
    return (major << 20) | minor


def kdev_split(dev: int) -> tuple[int, int]:
    return dev >> 20, dev & ((1 << 20) - 1)


@dataclass(frozen=True)
class BlockDevice:
    """A whole block device, named as in /sys/block."""

    name: str
    major: int
    minor: int

    @property
    def dev(self) -> int:
        return kdev(self.major, self.minor)

    @property
    def majmin(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def sysfs(self) -> Path:
        return Path("/sys/block") / self.name


def resolve_device(spec: str) -> BlockDevice:
    """``loop0``, ``/dev/loop0`` or ``7:0`` -> the device (must exist)."""
    name = spec
    if ":" in spec and not spec.startswith("/"):
        link = Path("/sys/dev/block") / spec
        if not link.exists():
            raise UnknownDeviceError(f"no block device {spec} (no {link})")
        name = link.resolve().name
    elif spec.startswith("/"):
        try:
            st = os.stat(spec)
        except OSError as e:
            raise UnknownDeviceError(f"no block device {spec}: {e.strerror}") from None
        if not (st.st_mode & 0o170000) == 0o060000:
            raise UnknownDeviceError(f"{spec} is not a block device")
        return resolve_device(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    devfile = Path("/sys/class/block") / name / "dev"
    try:
        majmin = devfile.read_text().strip()
    except OSError:
        raise UnknownDeviceError(f"no block device {spec!r} (no {devfile})") from None
    if not (Path("/sys/block") / name).exists():
        raise UnknownDeviceError(f"{name} is a partition: watch the whole device")
    major, minor = (int(x) for x in majmin.split(":"))
    return BlockDevice(name, major, minor)


@dataclass
class DeviceStats:
    """The kernel's view of one device (from eBPF since it was watched, or sysfs)."""

    device: str
    dev: str
    source: str                      # "ebpf" or "sysfs"
    attach: str | None = None        # "tp_btf", "tracepoint" (ebpf only)
    ios: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    in_flight: int | None = 0        # None: not counted (completion-only accounting)
    errors: int | None = None        # sysfs does not count errors
    slow_ios: int | None = None
    latency_sum_ns: int | None = None
    latency_hist_us: dict[str, int] | None = None  # "[lo, hi)" us -> count
    events_dropped: int | None = None
    note: str = ""

    @property
    def total_ios(self) -> int:
        return sum(self.ios.values())

    @property
    def mean_latency_us(self) -> float | None:
        if self.latency_sum_ns is None or not self.total_ios:
            return None
        return self.latency_sum_ns / self.total_ios / 1000.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": self.device, "dev": self.dev, "source": self.source,
            "attach": self.attach,
            "ops": {op: {"ios": self.ios.get(op, 0), "bytes": self.bytes.get(op, 0)}
                    for op in OPS},
            "total_ios": self.total_ios, "in_flight": self.in_flight, "errors": self.errors,
            "slow_ios": self.slow_ios, "mean_latency_us": self.mean_latency_us,
            "latency_hist_us": self.latency_hist_us, "events_dropped": self.events_dropped,
        }
        if self.note:
            out["note"] = self.note
        return out


def _hist_label(slot: int) -> str:
    lo = 0 if slot == 0 else 1 << slot
    return f"[{lo}, {1 << (slot + 1)})" if slot < NR_SLOTS - 1 else f"[{lo}, inf)"


def decode_stats(raw: bytes, ncpus: int) -> tuple[int, ...]:
    """Sum a PERCPU_ARRAY value (one ``struct ka_dev_stats`` per possible CPU)."""
    step = (STATS.size + 7) // 8 * 8
    total = [0] * (2 * NR_OPS + 5 + NR_SLOTS)
    for cpu in range(ncpus):
        for i, v in enumerate(STATS.unpack_from(raw, cpu * step)):
            total[i] += v
    return tuple(total)


def stats_from_values(bd: BlockDevice, values: tuple[int, ...], attach: str) -> DeviceStats:
    ios = dict(zip(OPS, values[:NR_OPS], strict=True))
    nbytes = dict(zip(OPS, values[NR_OPS:2 * NR_OPS], strict=True))
    errors, in_flight, slow, lat_sum, dropped = values[2 * NR_OPS:2 * NR_OPS + 5]
    hist_vals = values[2 * NR_OPS + 5:]
    hist = {_hist_label(i): n for i, n in enumerate(hist_vals) if n}
    return DeviceStats(device=bd.name, dev=bd.majmin, source="ebpf", attach=attach, ios=ios,
                       bytes=nbytes, in_flight=in_flight, errors=errors, slow_ios=slow,
                       latency_sum_ns=lat_sum, latency_hist_us=hist, events_dropped=dropped)


@dataclass(frozen=True)
class BlockEvent:
    """A slow or failed I/O, from the ring buffer."""

    ts_ns: int
    lat_ns: int
    sector: int
    dev: int
    nbytes: int
    op: str
    error: int
    kind: int

    @classmethod
    def decode(cls, data: bytes) -> BlockEvent:
        ts, lat, sector, dev, nbytes, op, error, kind, _ = EVENT.unpack_from(data)
        return cls(ts, lat, sector, dev, nbytes, OPS[op] if op < NR_OPS else "other", error,
                   kind)

    def to_json(self) -> dict[str, Any]:
        major, minor = kdev_split(self.dev)
        kinds = [k for k, bit in (("slow", EV_SLOW), ("error", EV_ERROR)) if self.kind & bit]
        return {"event": "+".join(kinds) or "io", "dev": f"{major}:{minor}", "op": self.op,
                "bytes": self.nbytes, "sector": self.sector, "latency_us": self.lat_ns / 1000,
                "error": self.error, "ktime_ns": self.ts_ns}


def _missing_object_reason(object_path: Path = OBJECT_PATH) -> str | None:
    """Why the compiled eBPF object is absent and how to get it, or None if it is there."""
    if object_path.exists():
        return None
    needs = "with clang, libbpf-dev and bpftool installed"
    note = object_path.parent / NO_BPF_NOTE.name
    if note.exists():
        return (f"{object_path} is missing: {note.read_text().strip()}; "
                f"rebuild without UBLKML_NO_BPF, {needs}")
    checkout = object_path.parent.parent.parent
    if (checkout / "setup.py").exists():
        return (f"{object_path} is missing: build it with `python setup.py build_bpf --inplace` "
                f"in {checkout} ({needs}; scripts/setup.sh does this)")
    return (f"{object_path} is missing from this installation: rebuild and reinstall the "
            f"ublkml wheel {needs} (its build compiles the object)")


def bpf_load_unavailable_reason(object_path: Path, capabilities: str) -> str | None:
    """Why no BPF object can be loaded here (its file, root, libbpf), or None."""
    missing = _missing_object_reason(object_path)
    if missing:
        return missing
    if os.geteuid() != 0:
        return f"not root (loading BPF programs needs {capabilities})"
    if not _libbpf.libbpf_available():
        return "libbpf.so.1 not found (Debian: apt-get install libbpf1)"
    return None


def bpf_unavailable_reason(object_path: Path = OBJECT_PATH) -> str | None:
    """Why eBPF accounting cannot work here, or None if it may."""
    reason = bpf_load_unavailable_reason(object_path, "CAP_BPF and CAP_PERFMON")
    if reason:
        return reason
    if not Path("/sys/kernel/btf/vmlinux").exists() and not Path(
            "/sys/kernel/tracing/events/block").exists() and not Path(
            "/sys/kernel/debug/tracing/events/block").exists():
        return "the kernel has neither BTF nor block trace events"
    return None


def _mount(fstype: str, source: str, target: str, name: str, why: str = "") -> None:
    mount = shutil.which("mount") or "/bin/mount"
    proc = subprocess.run([mount, "-t", fstype, source, target], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise BpfUnavailableError(f"cannot mount {name} on {target}{why}: "
                                  f"{proc.stderr.strip()}")


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf if nothing is mounted there (needed to pin)."""
    if not os.path.ismount(BPFFS):
        _mount("bpf", "bpf", BPFFS, "bpffs")


def ensure_tracefs() -> None:
    """Mount tracefs on /sys/kernel/tracing if it is not there.

    Attaching to a classic tracepoint needs its id from tracefs, and a freshly
    booted machine may have neither tracefs nor debugfs mounted (libbpf then
    fails with a bare ENOENT). tp_btf attachment does not need it.
    """
    if not (Path(TRACEFS, "events").exists()
            or Path("/sys/kernel/debug/tracing/events").exists()):
        _mount("tracefs", "nodev", TRACEFS, "tracefs", " (tracepoint attachment needs it)")


def pin_dir(instance: str) -> str:
    if not instance or "/" in instance or instance.startswith("."):
        raise AgentError(f"bad agent instance name {instance!r}")
    return f"{PIN_ROOT}/{instance}"


class BpfAccounting:
    """The loaded, attached and pinned accounting programs of one agent instance.

    ``in_flight=False`` attaches the completion program alone (tp_btf only):
    latency comes from the request's allocation stamp, so the issue and
    requeue programs are needed only to count requests in flight.  Every
    block I/O on the machine then crosses one BPF program instead of two,
    which is what a watcher that reads counts, bytes, latency and errors
    (the drive monitor) should pay.  Devices whose queue does not stamp
    requests (iostats off) cannot be watched that way.  The classic
    tracepoints carry no stamp: there the issue program always runs.
    """

    def __init__(self, instance: str = "default", attach: str = "auto",
                 object_path: Path = OBJECT_PATH, in_flight: bool = True) -> None:
        reason = bpf_unavailable_reason(object_path)
        if reason:
            raise BpfUnavailableError(f"eBPF accounting unavailable: {reason}")
        self.instance = instance
        self.pin_dir = pin_dir(instance)
        self._links: list[_libbpf.BpfLink] = []
        self._attached: list[tuple[str, _libbpf.BpfLink]] = []
        self._pinned: list[tuple[_libbpf.BpfMap, str]] = []
        self._cfg: dict[int, list[int]] = {}
        self.ncpus = _libbpf.num_possible_cpus()
        self.in_flight = in_flight
        ensure_bpffs()
        modes = ["tp_btf", "tracepoint"] if attach == "auto" else [attach]
        errors = []
        for mode in modes:
            try:
                if mode == "tracepoint":
                    ensure_tracefs()
                self._obj = self._load(object_path, mode)
                self.attach = mode
                break
            except BpfUnavailableError as e:
                errors.append(f"{mode}: {e}")
            except _libbpf.LibbpfError as e:
                errors.append(f"{mode}: {e}" + (f"\n{e.log.strip()[-2000:]}" if e.log else ""))
        else:
            raise BpfUnavailableError("cannot load the eBPF accounting: " + "; ".join(errors))
        try:
            self._pin()
        except BaseException:
            self.close()
            raise
        self.slots_fd = self._obj.map("ka_slots").fd
        self.devices_fd = self._obj.map("ka_devices").fd
        self.stats_fd = self._obj.map("ka_stats").fd
        self.events_fd = self._obj.map("ka_events").fd

    def _load(self, object_path: Path, mode: str) -> _libbpf.BpfObject:
        obj = _libbpf.BpfObject(str(object_path))
        try:
            btf = mode == "tp_btf"
            all_btf = ("ka_btf_issue", "ka_btf_requeue", "ka_btf_complete")
            btf_progs = all_btf[-1:] if self.completion_only(mode) else all_btf
            tp_progs = ("ka_tp_issue", "ka_tp_complete")
            for name in all_btf:
                obj.program(name).set_autoload(btf and name in btf_progs)
            for name in tp_progs:
                obj.program(name).set_autoload(not btf)
            obj.load()
            for name in btf_progs if btf else tp_progs:
                link = obj.program(name).attach()
                self._links.append(link)
                self._attached.append((name, link))
        except BaseException:
            for link in self._links:
                link.destroy()
            self._links.clear()
            self._attached.clear()
            obj.close()
            raise
        return obj

    def completion_only(self, mode: str | None = None) -> bool:
        """Whether only completions are traced (no in-flight count, no precise timing)."""
        return not self.in_flight and (mode or self.attach) == "tp_btf"

    def _pin(self) -> None:
        os.makedirs(self.pin_dir, exist_ok=True)
        for name in MAPS:
            path = f"{self.pin_dir}/{name}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale pin of an agent that died
            m = self._obj.map(name)
            m.pin(path)
            self._pinned.append((m, path))

    # -- devices -------------------------------------------------------------

    def watch(self, bd: BlockDevice, slow_us: int = 0, precise: bool | None = None) -> None:
        """Start accounting ``bd`` from zero; events for I/Os slower than ``slow_us``.

        ``precise``: time issue -> complete through a per-request map (slower)
        instead of from the request's allocation stamp; None = only where the
        kernel does not stamp requests (the queue's iostats off).
        """
        if precise is None:
            try:
                precise = (bd.sysfs / "queue" / "iostats").read_text().strip() == "0"
            except OSError:
                precise = True
        if precise and self.completion_only():
            raise AgentError(f"cannot watch {bd.name} with completions alone: its queue does "
                             f"not stamp requests ({bd.sysfs}/queue/iostats is 0); turn "
                             "iostats on or watch it with the full accounting")
        slots = read_slots(self.slots_fd)
        if bd.dev in slots:
            slot = slots.index(bd.dev)
            slots[slot] = 0  # restart from zero: unseen while its counters are reset
            self._write_slots(slots)
        elif 0 in slots:
            slot = slots.index(0)
        else:
            raise AgentError(f"cannot watch {bd.name}: the agent watches {MAX_DEVS} devices "
                             "already (`ublkml agent unwatch` one)")
        key = KEY.pack(slot)
        # Counters and config first, the slot last: the programs never see a
        # watched device without them.
        zero = b"\0" * (((STATS.size + 7) // 8 * 8) * self.ncpus)
        _libbpf.map_update_elem(self.stats_fd, key, zero)
        self._cfg[bd.dev] = [slow_us * 1000, F_PRECISE if precise else 0, time.monotonic_ns()]
        _libbpf.map_update_elem(self.devices_fd, key, CFG.pack(*self._cfg[bd.dev], 0))
        slots[slot] = bd.dev
        self._write_slots(slots)

    def _write_slots(self, slots: list[int]) -> None:
        _libbpf.map_update_elem(self.slots_fd, KEY.pack(0), SLOTS.pack(*slots))

    def _slot(self, bd: BlockDevice) -> int:
        slots = read_slots(self.slots_fd)
        if bd.dev not in slots:
            raise UnknownDeviceError(f"{bd.name} ({bd.majmin}) is not watched by the agent")
        return slots.index(bd.dev)

    def set_slow_threshold(self, bd: BlockDevice, slow_us: int) -> None:
        slot = self._slot(bd)
        cfg = self._cfg[bd.dev]
        cfg[0] = slow_us * 1000
        _libbpf.map_update_elem(self.devices_fd, KEY.pack(slot), CFG.pack(*cfg, 0))

    def unwatch(self, bd: BlockDevice) -> None:
        slots = read_slots(self.slots_fd)
        if bd.dev in slots:
            slots[slots.index(bd.dev)] = 0
            self._write_slots(slots)
        self._cfg.pop(bd.dev, None)

    def watched(self) -> list[int]:
        return [dev for dev in read_slots(self.slots_fd) if dev]

    def stats(self, bd: BlockDevice) -> DeviceStats:
        st = read_stats(self.slots_fd, self.stats_fd, self.ncpus, bd, self.attach)
        if self.completion_only():
            st.in_flight = None  # only the issue program counts it, and it is not attached
        return st

    def missed_runs(self) -> int:
        """Program runs the kernel skipped (recursion protection), all devices together.

        Classic tracepoint programs share one per-CPU "a BPF program is
        running" guard: a completion that interrupts the issue program on
        the same CPU is not seen, and the kernel counts it here.  tp_btf
        programs guard themselves only, so this stays 0 for them in
        practice.  Non-zero means the counts fall short by up to this many.
        """
        progs = [name for name, _link in self._attached]
        return sum(int(self._obj.program(name).fdinfo().get("recursion_misses", "0"))
                   for name in progs)

    def ring_buffer(self, callback: Any) -> _libbpf.RingBuffer:
        """A consumer of slow/error events; ``callback(BlockEvent)``."""
        return _libbpf.RingBuffer(self.events_fd,
                                  lambda data: callback(BlockEvent.decode(data)))

    def close(self) -> None:
        """Detach and unpin: the pinned directory goes away with the agent."""
        for link in self._links:
            link.destroy()
        self._links.clear()
        for m, path in self._pinned:
            with contextlib.suppress(OSError):
                m.unpin(path)
        self._pinned.clear()
        with contextlib.suppress(OSError):
            os.rmdir(self.pin_dir)
        if getattr(self, "_obj", None) is not None:
            self._obj.close()

    def __enter__(self) -> BpfAccounting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_slots(slots_fd: int) -> list[int]:
    """The dev_t in each slot (0: free)."""
    raw = _libbpf.map_lookup_elem(slots_fd, KEY.pack(0), SLOTS.size)
    return list(SLOTS.unpack(raw)) if raw is not None else [0] * MAX_DEVS


def read_stats(slots_fd: int, stats_fd: int, ncpus: int, bd: BlockDevice,
               attach: str) -> DeviceStats:
    slots = read_slots(slots_fd)
    raw = None
    if bd.dev in slots:
        raw = _libbpf.map_lookup_elem(stats_fd, KEY.pack(slots.index(bd.dev)),
                                      ((STATS.size + 7) // 8 * 8) * ncpus)
    if raw is None:
        raise UnknownDeviceError(f"{bd.name} ({bd.majmin}) is not watched by the agent")
    return stats_from_values(bd, decode_stats(raw, ncpus), attach)


class PinnedAccounting:
    """Read another process's pinned maps (``ublkml agent stats``)."""

    def __init__(self, instance: str = "default", attach: str = "unknown") -> None:
        self.pin_dir = pin_dir(instance)
        self.instance = instance
        try:
            self.slots_fd = _libbpf.obj_get(f"{self.pin_dir}/ka_slots")
            self.stats_fd = _libbpf.obj_get(f"{self.pin_dir}/ka_stats")
        except OSError as e:
            raise BpfUnavailableError(f"no running agent's maps in {self.pin_dir}: {e}"
                                      ) from None
        self.attach = attach  # bpffs holds no plain files: the agent's state says
        self.ncpus = _libbpf.num_possible_cpus()

    def stats(self, bd: BlockDevice) -> DeviceStats:
        return read_stats(self.slots_fd, self.stats_fd, self.ncpus, bd, self.attach)

    def close(self) -> None:
        os.close(self.slots_fd)
        os.close(self.stats_fd)


# /sys/block/<dev>/stat fields (Documentation/block/stat.rst), by name.
_SYSFS_FIELDS = ("read_ios", "read_merges", "read_sectors", "read_ticks", "write_ios",
                 "write_merges", "write_sectors", "write_ticks", "in_flight", "io_ticks",
                 "time_in_queue", "discard_ios", "discard_merges", "discard_sectors",
                 "discard_ticks", "flush_ios", "flush_ticks")


def sysfs_stats(bd: BlockDevice, note: str = "") -> DeviceStats:
    """The kernel's cumulative counters since the device appeared (no histogram)."""
    try:
        parts = [int(x) for x in (bd.sysfs / "stat").read_text().split()]
    except OSError as e:
        raise UnknownDeviceError(f"cannot read {bd.sysfs}/stat: {e.strerror}") from None
    f = dict(zip(_SYSFS_FIELDS, parts, strict=False))
    ios = {"read": f.get("read_ios", 0), "write": f.get("write_ios", 0),
           "flush": f.get("flush_ios", 0), "discard": f.get("discard_ios", 0), "other": 0}
    nbytes = {"read": f.get("read_sectors", 0) * 512, "write": f.get("write_sectors", 0) * 512,
              "flush": 0, "discard": f.get("discard_sectors", 0) * 512, "other": 0}
    ticks_ms = sum(f.get(k, 0) for k in ("read_ticks", "write_ticks", "discard_ticks",
                                          "flush_ticks"))
    return DeviceStats(device=bd.name, dev=bd.majmin, source="sysfs", ios=ios, bytes=nbytes,
                       in_flight=f.get("in_flight", 0), latency_sum_ns=ticks_ms * 1_000_000,
                       note=note or "cumulative since the device appeared; no errors, "
                       "no histogram")
