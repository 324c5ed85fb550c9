"""The benchmark runner behind ``ublkml bench [--quick] [--out DIR] [--json] [--skip GROUP]``.

Three groups, each a ublkml device next to the kernel (or nbdkit) device it
should be compared with, measured with identical fio jobs (:mod:`bench.jobs`),
and a fourth, ``overhead``, of ublkml null devices with and without the
kernel agent's eBPF accounting, the ML scorer and the drive monitor:

======== ===================================== =======================================
group    baseline                              ublkml
======== ===================================== =======================================
null     kernel ``null_blk`` (blk-mq, no IRQ)  ``ublkml add -t null``
loop     kernel loop, ``--direct-io=on``       ``ublkml add -t loop -f FILE`` (same file)
python   nbdkit Python plug-in + kernel NBD    ``ublkml add -t python`` (same RamStore)
overhead ``ublkml add -t null`` (plain)        the same device with eBPF accounting
                                               attached; ``ublkml add -t null --score``;
                                               the plain device watched by
                                               ``ublkml monitor run``
======== ===================================== =======================================

The overhead group measures only 4k randread QD32 on 1 queue, in rounds
(plain, accounting, monitor, scoring, in an order that changes from round to
round), and its goals compare medians.

Where to measure: the figures of one report must come from one kernel on one
machine in one sitting, or the ratios mean nothing.  Where ``/dev/ublk-control``
exists the runner measures right here (as root).  Elsewhere the command re-runs
itself with ``--in-vm`` inside the project's qemu test bed, in *one* boot
(:mod:`ublk_driver.testbed.where`), with the output directory shared into the
guest; the guest writes ``results.json`` and the host then renders the report
(matplotlib is slow under TCG).

What to run comes in a :class:`BenchConfig` (``bench.cli`` builds it from the
command line).

Order: group by group, and within a group the baseline and the ublkml device
are set up side by side and measured alternately, workload by workload, so
that the two figures of a comparison are taken seconds apart.

Robustness: each device lives in a context manager that tears it down
(``ublkml del``, ``losetup -d``, ``nbd-client -d``, ``rmmod null_blk``) whatever
happens; a failed setup or measurement becomes an ``error`` record in
results.json (which is rewritten after every measurement, so a killed run
still leaves what it measured) and the run goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import sampler as sampler_mod
from bench.jobs import (
    QUICK_CASES,
    WORKLOADS,
    FioError,
    Workload,
    fio_job_text,
    parse_fio_json,
    workload_by_name,
)
from bench.report import GOALS
from ublk_driver.blockdev import parse_schedulers
from ublk_driver.core.errors import UblkError
from ublk_driver.core.process import cpu_seconds
from ublk_driver.scratch import ScratchUnavailableError, ram_ext4, unload_module, with_sbin
from ublk_driver.testbed.where import run_in_testbed

__all__ = [
    "DEVICES",
    "GROUPS",
    "BenchConfig",
    "BenchError",
    "Case",
    "DeviceSpec",
    "MissingToolError",
    "accounting_attached",
    "measure",
    "monitor_running",
    "overhead_cases",
    "plan_cases",
    "run_in_vm",
    "say",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
GROUPS = ("null", "loop", "python", "overhead")

#: Time per measurement.  The full run has 66 measurements: 10 s + 2 s ramp
#: each (plus fio's start-up, slow under TCG) keeps it near 20 minutes.
FULL_RUNTIME, FULL_RAMP = 10.0, 2.0
#: --quick is a smoke test of the whole chain, not a measurement to quote.
QUICK_RUNTIME, QUICK_RAMP = 2.0, 1.0
#: Seconds a measurement costs beyond runtime + ramp (fio start-up under TCG),
#: and a device set-up; only for the time estimate and the VM timeout.
_CASE_OVERHEAD, _SETUP_OVERHEAD, _BOOT_OVERHEAD = 4.0, 4.0, 30.0
#: ... and the start and stop of the monitor of a monitor round (Python, numpy,
#: onnxruntime and the eBPF programs loading: 23-27 s to its first tick under TCG).
_MONITOR_OVERHEAD = 25.0

DEPTH = 128                  # hardware queue depth of every device
NULL_GB = 16                 # null_blk and ublkml null: 16 GiB, no memory behind them
LOOP_BYTES = 512 << 20       # the loop group's backing file
RAM_BYTES = 256 << 20        # the python group's RamStore
#: The test bed: as many vCPUs as the project's machines have cores (more would
#: only time-share them), and room for the tmpfs file and two RamStores.
VM_CPUS, VM_MEMORY_MB = 2, 4096
#: Alternations of the overhead group (plain, accounting on, monitor on, scoring
#: on): the goals compare medians.  Full: 20 measurements, about 8 min; --quick: 12.
OVERHEAD_ROUNDS_FULL, OVERHEAD_ROUNDS_QUICK = 5, 3
#: Rounds of the cases the pair groups' goals are computed from (the headline 4k
#: randread QD32 on 1 and 2 queues, QD1 on 1 queue), in every pair group: the
#: goals compare medians, because a single run's ratio moves 10-20 % between
#: runs under TCG.  Full: about 9 minutes more than one round; --quick: 1.
GOAL_ROUNDS_FULL, GOAL_ROUNDS_QUICK = 3, 1
#: (workload, queues) of those cases, from the goals themselves (a scaling
#: goal also needs its 1-queue figure; the overhead goals have their rounds).
GOAL_CASES: frozenset[tuple[str, int]] = frozenset(
    case for g in GOALS if g.kind != "median_iops_ratio"
    for case in ((g.workload, g.queues), *([(g.workload, 1)] if g.kind == "scaling" else [])))
OVERHEAD_WORKLOAD, OVERHEAD_QUEUES = "4k-randread-qd32", 1
#: The kernel agent instance the overhead group attaches (pins under
#: /sys/fs/bpf/ublkml/<instance>/ while measuring).
ACCOUNTING_INSTANCE = "bench-overhead"
#: ``ublkml monitor run`` options of the monitor rounds, besides ``--drive``: the
#: one drive only (``--no-devices``: not the drives of the other ublkml devices
#: alive meanwhile), no kernel agent to register with, no smartctl (a null
#: device has no SMART).  Its priority is the default one, nice -10, as a user
#: runs it.
MONITOR_ARGS = ("--no-devices", "--no-agent", "--no-smart", "--interval", "1",
                "--window", "10")
#: Seconds the monitor may take from its start to its first tick that lists the
#: drive (Python, numpy and onnxruntime importing, the model and the eBPF
#: programs loading: slow under TCG), and to stop after SIGINT before it is killed.
MONITOR_START_TIMEOUT, MONITOR_STOP_TIMEOUT = 60.0, 30.0

#: Debian packages that provide each external tool, for error messages.
TOOL_PACKAGES = {
    "fio": "fio",
    "nbdkit": "nbdkit",
    "nbd-client": "nbd-client",
    "losetup": "mount",
    "modprobe": "kmod",
    "rmmod": "kmod",
}


class BenchError(UblkError):
    """A set-up or measurement failed; the message is one line for the report."""


class MissingToolError(BenchError):
    """An external program is not installed; the message names the Debian package."""

    def __init__(self, tool: str, package: str | None = None) -> None:
        pkg = package or TOOL_PACKAGES.get(tool, tool)
        super().__init__(f"{tool} not found: install the Debian package {pkg} "
                         f"(apt-get install {pkg})")
        self.tool = tool


# ---------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a group."""

    name: str
    group: str
    role: str
    """``baseline`` (kernel or nbdkit) or ``ublkml``."""
    baseline: str | None
    """For a ublkml device, the device it is compared with."""
    max_queues: int
    """Most hardware queues the device can have (kernel loop: 1)."""
    tools: tuple[str, ...]
    description: str
    single_queue_reason: str = ""


DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("null_blk", "null", "baseline", None, 2, ("modprobe", "rmmod"),
               f"kernel null_blk: queue_mode=2 (blk-mq), irqmode=0, {NULL_GB} GiB, "
               f"hw_queue_depth={DEPTH}, submit_queues=1|2"),
    DeviceSpec("ublkml-null", "null", "ublkml", "null_blk", 2, (),
               f"ublkml add -t null --size {NULL_GB}G -q 1|2 -d {DEPTH}"),
    DeviceSpec("kernel-loop", "loop", "baseline", None, 1, ("losetup", "modprobe"),
               f"kernel loop (losetup --direct-io=on) on a {LOOP_BYTES >> 20} MiB file on ext4 "
               "over brd (RAM)",
               single_queue_reason="the kernel loop driver has a single hardware queue"),
    DeviceSpec("ublkml-loop", "loop", "ublkml", "kernel-loop", 2, (),
               f"ublkml add -t loop -f FILE -q 1|2 -d {DEPTH} (O_DIRECT), same file"),
    DeviceSpec("nbdkit-python", "python", "baseline", None, 2,
               ("nbdkit", "nbd-client", "modprobe"),
               f"nbdkit python bench/nbdkit_ramdisk.py (RamStore, {RAM_BYTES >> 20} MiB, "
               "parallel) over the kernel NBD client on a Unix socket; "
               "-connections 2 for 2 queues"),
    DeviceSpec("ublkml-python", "python", "ublkml", "nbdkit-python", 2, (),
               f"ublkml add -t python --plugin bench.ramstore:RamStoreTarget "
               f"({RAM_BYTES >> 20} MiB) -q 1|2 -d {DEPTH}: the default, a queue thread "
               "with 1 queue, a process per queue with 2 (RamStore is fork_safe)"),
    DeviceSpec("ublkml-python-threads", "python", "ublkml", "nbdkit-python", 2, (),
               "the same as ublkml-python with --queue-threads: every queue a thread of "
               "the server, the queues' plug-in code taking turns on one GIL"),
    DeviceSpec("ublkml-null-off", "overhead", "baseline", None, 1, (),
               f"ublkml add -t null --size {NULL_GB}G -q 1 -d {DEPTH}, plain: the 'off' "
               "side of both overhead goals"),
    DeviceSpec("ublkml-null-acct", "overhead", "ublkml", "ublkml-null-off", 1, (),
               "the same device as ublkml-null-off with the kernel agent's eBPF accounting "
               "attached and the device watched (kernel_agent.accounting.BpfAccounting, "
               "slow-I/O events off), only while it is measured"),
    DeviceSpec("ublkml-null-score", "overhead", "ublkml", "ublkml-null-off", 1, (),
               f"ublkml add -t null --size {NULL_GB}G -q 1 -d {DEPTH} --score (the reference "
               "ONNX fail-slow model; completion records on)"),
    DeviceSpec("ublkml-null-monitor", "overhead", "ublkml", "ublkml-null-off", 1, (),
               "the same device as ublkml-null-off watched by the drive monitor, a process "
               "of its own at nice -10 (ublkml monitor run --drive /dev/ublkbN "
               + " ".join(MONITOR_ARGS) + ": eBPF block tracepoints, one tick a second), "
               "started before and stopped after each of its measurements"),
)


def device_by_name(name: str) -> DeviceSpec:
    for d in DEVICES:
        if d.name == name:
            return d
    raise KeyError(name)


@dataclass(frozen=True)
class Case:
    """One measurement: a workload on a device with a number of queues."""

    device: DeviceSpec
    workload: Workload
    queues: int
    round: int = 0
    """The alternation (0, 1, ...) of an overhead case or a repeated goal case."""
    repeated: bool = False
    """One of several rounds of a goal case (see GOAL_CASES); overhead cases always are."""

    @property
    def in_rounds(self) -> bool:
        return self.repeated or self.device.group == "overhead"

    @property
    def title(self) -> str:
        title = f"{self.device.name} {self.workload.label} q{self.queues}"
        return title + (f" round {self.round + 1}" if self.in_rounds else "")

    @property
    def applicable(self) -> bool:
        return self.queues <= self.device.max_queues


def _order(case: Case) -> tuple[int, int, int, int, int]:
    # Group, queue count, workload, then baseline before ublkml: the two
    # figures of each comparison are taken one right after the other (see
    # _Run.pair), which matters on a machine shared with other VMs.  The
    # overhead group goes round by round, each round in its own order.
    # Rounds of a goal case reverse the pair's order every other round, for
    # the reason _overhead_position gives.
    position = (_overhead_position(case) if case.device.group == "overhead"
                else -DEVICES.index(case.device) if case.repeated and case.round % 2
                else DEVICES.index(case.device))
    return (GROUPS.index(case.device.group), case.queues, WORKLOADS.index(case.workload),
            case.round, position)


def _overhead_position(case: Case) -> int:
    """Where a device comes within its overhead round: the rows of a Williams
    design.  With a fixed order (off, accounting, scoring) the place in the
    round biased the ratios: the device always measured last came out a few
    percent *faster* than the plain one.  Here, over n rounds of n devices
    (n even; 2n rounds for n odd), every device takes every place once and
    follows every other device once."""
    names = [d.name for d in DEVICES if d.group == "overhead"]
    return _williams_row(len(names), case.round).index(names.index(case.device.name))


def _williams_row(n: int, row: int) -> list[int]:
    """Row ``row`` of a Williams design for ``n`` treatments: 0, 1, n-1, 2, n-2, ...
    shifted by the row; for an odd ``n`` the second n rows are the first n reversed."""
    first, lo, hi = [0], 1, n - 1
    while lo <= hi:
        first.append(lo)
        if lo != hi:
            first.append(hi)
        lo, hi = lo + 1, hi - 1
    out = [(x + row) % n for x in first]
    if n % 2 and (row // n) % 2:
        out.reverse()
    return out


def overhead_cases(rounds: int) -> list[Case]:
    """The overhead group: every device of it, ``rounds`` times, 4k randread QD32, 1 queue."""
    w = workload_by_name(OVERHEAD_WORKLOAD)
    return [Case(d, w, OVERHEAD_QUEUES, r) for r in range(rounds)
            for d in DEVICES if d.group == "overhead"]


def _goal_rounds(case: Case, goal_rounds: int) -> list[Case]:
    """``case`` once, or ``goal_rounds`` times if the goals are computed from it.

    Rounds of a pair come one after the other per round (baseline, ublkml;
    baseline, ublkml; ...: see _order), so each round is a side-by-side pair.
    A case that cannot be measured (n/a) is recorded once.
    """
    if (goal_rounds < 2 or not case.applicable
            or (case.workload.name, case.queues) not in GOAL_CASES):
        return [case]
    return [Case(case.device, case.workload, case.queues, r, repeated=True)
            for r in range(goal_rounds)]


def plan_cases(*, quick: bool, skip: Sequence[str] = (), rounds: int | None = None,
               goal_rounds: int | None = None) -> list[Case]:
    """Every case of the run, in the order they are measured (n/a ones included)."""
    if quick:
        pairs = [Case(device_by_name(d), workload_by_name(w), q) for d, w, q in QUICK_CASES]
        n_goal = goal_rounds or GOAL_ROUNDS_QUICK
        overhead = overhead_cases(rounds or OVERHEAD_ROUNDS_QUICK)
    else:
        pairs = [Case(d, w, q) for d in DEVICES if d.group != "overhead"
                 for w in WORKLOADS for q in (1, 2)]
        n_goal = goal_rounds or GOAL_ROUNDS_FULL
        overhead = overhead_cases(rounds or OVERHEAD_ROUNDS_FULL)
    cases = [r for c in pairs for r in _goal_rounds(c, n_goal)] + overhead
    return sorted((c for c in cases if c.device.group not in skip), key=_order)


def estimate_seconds(cases: Sequence[Case], runtime: float, ramp: float) -> float:
    """Rough wall time of the measurements (set-ups included, boot excluded)."""
    measured = [c for c in cases if c.applicable]
    setups = len({(c.device.name, c.queues) for c in measured})  # one per device and count
    monitors = sum(1 for c in measured if c.device.name == "ublkml-null-monitor")
    return (len(measured) * (runtime + ramp + _CASE_OVERHEAD) + setups * _SETUP_OVERHEAD
            + monitors * _MONITOR_OVERHEAD)


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures and how (the ``ublkml bench`` options that matter to it)."""

    quick: bool = False
    """A smoke test of the whole chain (fewer cases, shorter jobs), not figures to quote."""
    skip: tuple[str, ...] = ()
    """Groups left out."""
    runtime: float | None = None
    """Seconds measured per job (None: FULL_RUNTIME, or QUICK_RUNTIME with ``quick``)."""
    ramp: float | None = None
    """Seconds of warm-up per job, not counted (None: by ``quick`` as ``runtime``)."""
    profile: bool = False
    """Record the servers' CPU time and sample them with py-spy."""
    rounds: int | None = None
    """Rounds of the overhead group (None: by ``quick``)."""
    goal_rounds: int | None = None
    """Rounds of the goals' cases (None: by ``quick``)."""
    poll_us: int | None = None
    """Hybrid polling for every ublkml device (``ublkml add --poll-us``)."""

    def timing(self) -> tuple[float, float]:
        """(runtime, ramp) in seconds."""
        runtime = self.runtime if self.runtime is not None else (
            QUICK_RUNTIME if self.quick else FULL_RUNTIME)
        ramp = self.ramp if self.ramp is not None else (QUICK_RAMP if self.quick else FULL_RAMP)
        return float(runtime), float(ramp)

    def cases(self) -> list[Case]:
        return plan_cases(quick=self.quick, skip=self.skip, rounds=self.rounds,
                          goal_rounds=self.goal_rounds)

    def to_args(self) -> list[str]:
        """The ``ublkml bench`` options that give this configuration back."""
        out: list[str] = ["--quick"] if self.quick else []
        for g in self.skip:
            out += ["--skip", g]
        if self.runtime is not None:
            out += ["--runtime", f"{self.runtime:g}"]
        if self.ramp is not None:
            out += ["--ramp", f"{self.ramp:g}"]
        if self.profile:
            out.append("--profile")
        if self.rounds is not None:
            out += ["--rounds", str(self.rounds)]
        if self.goal_rounds is not None:
            out += ["--goal-rounds", str(self.goal_rounds)]
        if self.poll_us is not None:
            out += ["--poll-us", str(self.poll_us)]
        return out


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _sh(argv: Sequence[str], *, what: str, timeout: float = 120, check: bool = True,
        cwd: Path = REPO_ROOT, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command (in the repository with :func:`_child_env` unless told otherwise);
    failures become one-line :class:`BenchError` messages."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, check=False, env=_child_env() if env is None else env)
    except FileNotFoundError:
        raise MissingToolError(argv[0]) from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        text = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
        raise BenchError(f"{what} failed (exit {proc.returncode}): {text[-1]}")
    return proc


def _child_env() -> dict[str, str]:
    """The environment of the commands we run: the repository importable
    (``bench.ramstore`` is loaded by the ublkml server), sbin on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return with_sbin(env)


def check_tool(tool: str) -> None:
    """Raise :class:`MissingToolError` if ``tool`` is not installed."""
    _which(tool)


def _which(tool: str) -> str:
    found = shutil.which(tool, path=_child_env()["PATH"])
    if found is None:
        raise MissingToolError(tool)
    return found


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _read(path: str | Path, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _hw_queues(bdev: str) -> int | None:
    """Number of blk-mq hardware queues of a block device (from sysfs)."""
    try:
        return len(os.listdir(f"/sys/block/{os.path.basename(bdev)}/mq"))
    except OSError:
        return None


def _scheduler(bdev: str) -> str | None:
    """The active I/O scheduler of a block device (from sysfs; None if unknown)."""
    return parse_schedulers(_read(f"/sys/block/{os.path.basename(bdev)}/queue/scheduler"))[1]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write then rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Devices: each a context manager that always tears down what it set up
# ---------------------------------------------------------------------------


@dataclass
class Handle:
    """A live device: its block device path, facts for the report, its server."""

    path: str
    attrs: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    """The user-space server process (ublkml daemon, nbdkit), for --profile."""


@dataclass
class Context:
    """What the device set-ups share within one run."""

    outdir: Path
    scratch: Path
    python: str = sys.executable
    loop_file: Path | None = None
    loop_file_info: dict[str, Any] = field(default_factory=dict)
    ublkml_args: tuple[str, ...] = ()
    """Added to every ``ublkml add`` (``--poll-us``)."""


def _rmmod(module: str) -> None:
    if not unload_module(module):
        say(f"warning: could not unload {module}")


@contextlib.contextmanager
def null_blk_device(queues: int, ctx: Context) -> Iterator[Handle]:
    """The kernel's null_blk with ``queues`` submission queues."""
    if Path("/sys/module/null_blk").exists():
        # Loaded by someone else (or a previous crashed run): the module
        # parameters only apply at load time, so it must go first.
        _sh(["rmmod", "null_blk"], what="rmmod null_blk (it was loaded before the benchmark)")
    params = ["nr_devices=1", "queue_mode=2", f"submit_queues={queues}", "irqmode=0",
              f"gb={NULL_GB}", f"hw_queue_depth={DEPTH}", "bs=512"]
    _sh(["modprobe", "null_blk", *params], what="modprobe null_blk")
    try:
        path = "/dev/nullb0"
        _wait_for(lambda: os.path.exists(path), 10, path)
        # null_blk adds poll_queues (default 1) to its hardware queues; fio
        # does not poll (no hipri), so only the others carry this I/O.
        poll = int(_read("/sys/module/null_blk/parameters/poll_queues", "0") or 0)
        total = _hw_queues(path)
        yield Handle(path, {"module_params": " ".join(params),
                            "hw_queues": None if total is None else total - poll,
                            "poll_queues": poll})
    finally:
        _rmmod("null_blk")


def _ublkml(args: Sequence[str], ctx: Context, what: str) -> subprocess.CompletedProcess[str]:
    return _sh([ctx.python, "-m", "ublk_driver", *args], what=what, timeout=180)


@contextlib.contextmanager
def ublkml_device(add_args: Sequence[str], ctx: Context) -> Iterator[Handle]:
    """``ublkml add ... --json``, then ``ublkml del -n ID`` when done."""
    add_args = [*add_args, *ctx.ublkml_args]
    proc = _ublkml(["add", *add_args, "--json"], ctx, "ublkml add " + " ".join(add_args))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        info = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"ublkml add printed no device description: {proc.stdout!r}"
                         ) from None
    try:
        path = str(info["bdev"])
        _wait_for(lambda: os.path.exists(path), 10, path)
        attrs = {k: info[k] for k in ("dev_id", "target", "queues", "depth", "block_size",
                                      "size", "direct_io", "plugin", "backing") if k in info}
        attrs["hw_queues"] = _hw_queues(path)
        attrs["engine"] = engine_fingerprint()
        if "--score" in add_args:
            attrs["score"] = True
        yield Handle(path, attrs, pid=int(info["pid"]) if "pid" in info else None)
    finally:
        try:
            _ublkml(["del", "-n", str(info["dev_id"])], ctx, "ublkml del")
        except BenchError as e:
            say(f"warning: {e}")


@contextlib.contextmanager
def kernel_loop_device(queues: int, ctx: Context) -> Iterator[Handle]:
    """``losetup --direct-io=on`` on the run's backing file (one hardware queue)."""
    assert ctx.loop_file is not None
    _sh(["modprobe", "loop"], what="modprobe loop", check=False)  # may be built in
    proc = _sh(["losetup", "--direct-io=on", "-f", "--show", str(ctx.loop_file)],
               what="losetup --direct-io=on")
    dev = proc.stdout.strip()
    try:
        name = os.path.basename(dev)
        dio = _read(f"/sys/block/{name}/loop/dio") == "1"
        if not dio:
            say(f"warning: {dev} runs without direct I/O: the comparison is unfair")
        yield Handle(dev, {"direct_io": dio, "backing": str(ctx.loop_file),
                           "hw_queues": _hw_queues(dev),
                           "block_size": int(_read(f"/sys/block/{name}/queue/"
                                                   "logical_block_size", "0"))})
    finally:
        _sh(["losetup", "-d", dev], what=f"losetup -d {dev}", check=False)


def _nbdkit_python_available() -> None:
    nbdkit = _which("nbdkit")
    proc = _sh([nbdkit, "python", "--dump-plugin"], what="nbdkit python --dump-plugin",
               check=False)
    if proc.returncode != 0:
        raise MissingToolError("nbdkit python plug-in", "nbdkit-plugin-python")


def _free_nbd() -> str:
    for i in range(64):
        name = f"nbd{i}"
        if not os.path.exists(f"/sys/block/{name}"):
            break
        if _read(f"/sys/block/{name}/size", "0") == "0" and \
                not os.path.exists(f"/sys/block/{name}/pid"):
            return f"/dev/{name}"
    raise BenchError("no free /dev/nbdN device (modprobe nbd nbds_max=...)")


@contextlib.contextmanager
def nbdkit_device(queues: int, ctx: Context) -> Iterator[Handle]:
    """nbdkit's Python plug-in serving RamStore, over the kernel NBD client."""
    sock = ctx.scratch / f"nbdkit-q{queues}.sock"
    log_path = ctx.outdir / "logs" / f"nbdkit-q{queues}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    script = REPO_ROOT / "bench" / "nbdkit_ramdisk.py"
    with open(log_path, "w") as log:
        try:
            # -f: stay in the foreground, so that this process owns (and ends) it;
            # --exit-with-parent: and it dies with us even if we are killed.
            proc = subprocess.Popen(
                [_which("nbdkit"), "-f", "-U", str(sock), "--exit-with-parent", "python",
                 str(script), f"size={RAM_BYTES}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, env=_child_env())
        except FileNotFoundError:
            raise MissingToolError("nbdkit") from None
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                tail = _read(log_path).splitlines()[-1:] or ["(no output)"]
                raise BenchError(f"nbdkit exited with status {proc.returncode}: {tail[0]}")
            return sock.exists()

        _wait_for(ready, 60, "nbdkit's socket")
        _sh(["modprobe", "nbd"], what="modprobe nbd", check=False)  # may be built in
        _wait_for(lambda: os.path.exists("/sys/block/nbd0"), 10, "/dev/nbd0 (modprobe nbd)")
        dev = _free_nbd()
        argv = [_which("nbd-client"), "-unix", str(sock), dev, "-b", "4096"]
        if queues > 1:
            argv += ["-connections", str(queues)]  # one hardware queue per connection
        _sh(argv, what="nbd-client")
        try:
            name = os.path.basename(dev)
            _wait_for(lambda: _read(f"/sys/block/{name}/size", "0") != "0", 10,
                      f"{dev} to connect")
            yield Handle(dev, {"connections": queues, "hw_queues": _hw_queues(dev),
                               "block_size": 4096, "size": RAM_BYTES}, pid=proc.pid)
        finally:
            _sh(["nbd-client", "-d", dev], what=f"nbd-client -d {dev}", check=False)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def open_device(spec: DeviceSpec, queues: int, ctx: Context) -> contextlib.AbstractContextManager[
        Handle]:
    """The context manager that sets up ``spec`` with ``queues`` hardware queues."""
    q = ["-q", str(queues), "-d", str(DEPTH)]
    if spec.name == "null_blk":
        return null_blk_device(queues, ctx)
    if spec.name in ("ublkml-null", "ublkml-null-off"):
        return ublkml_device(["-t", "null", "--size", f"{NULL_GB}G", *q], ctx)
    if spec.name == "ublkml-null-score":
        return ublkml_device(["-t", "null", "--size", f"{NULL_GB}G", *q, "--score"], ctx)
    if spec.name == "kernel-loop":
        return kernel_loop_device(queues, ctx)
    if spec.name == "ublkml-loop":
        assert ctx.loop_file is not None
        return ublkml_device(["-t", "loop", "-f", str(ctx.loop_file), *q], ctx)
    if spec.name == "nbdkit-python":
        return nbdkit_device(queues, ctx)
    if spec.name in ("ublkml-python", "ublkml-python-threads"):
        threads = ["--queue-threads"] if spec.name == "ublkml-python-threads" else []
        return ublkml_device(["-t", "python", "--plugin", "bench.ramstore:RamStoreTarget",
                              "--plugin-arg", f"size={RAM_BYTES}", *q, *threads], ctx)
    raise KeyError(spec.name)


#: The loop group's file system: ext4 on a RAM block device (brd), a little
#: larger than the backing file (see ublk_driver.scratch for why not tmpfs).
LOOP_FS_BYTES = LOOP_BYTES + (128 << 20)


def _tmpfs_dir() -> Path:
    """Where the loop group's backing file goes: RAM (tmpfs), so that the
    comparison measures the two loop drivers and not a disk.  tmpfs takes
    O_DIRECT since Linux 6.6; /dev/shm is tmpfs on Debian and in the test bed."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def create_backing_file(path: Path, size: int) -> dict[str, Any]:
    """Fill ``path`` with ``size`` bytes of non-zero data; report O_DIRECT support.

    Written, not sparse: reading a hole is cheaper than reading data and
    would flatter whichever driver happened to hit holes.
    """
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
        o_direct = True
    except OSError:
        o_direct = False
    fs = _sh(["stat", "-f", "-c", "%T", str(path)], what="stat -f", check=False).stdout.strip()
    return {"path": str(path), "size": size, "filesystem": fs or "?", "o_direct": o_direct}


@contextlib.contextmanager
def accounting_attached(path: str) -> Iterator[dict[str, Any]]:
    """The kernel agent's eBPF accounting, attached and watching ``path``, for the block.

    The same in-process API as ``python -m kernel_agent.overhead`` (its "on"
    rounds): :class:`kernel_agent.accounting.BpfAccounting` loads, attaches and
    pins the programs, ``watch`` adds the device's dev_t with slow-I/O events
    off.  Yields a dict that is filled, when the block ends, with the attach
    mode and the I/Os the programs counted; none counted is an error (the
    programs did not see the device, so "on" would not have been on).
    """
    from kernel_agent.accounting import BpfAccounting, bpf_unavailable_reason, resolve_device

    reason = bpf_unavailable_reason()
    if reason:
        raise BenchError(f"eBPF accounting unavailable: {reason}")
    bd = resolve_device(path)
    info: dict[str, Any] = {"instance": ACCOUNTING_INSTANCE, "dev": bd.majmin}
    with BpfAccounting(ACCOUNTING_INSTANCE) as acc:
        acc.watch(bd)
        info["attach"] = acc.attach
        yield info
        info["ios_counted"] = acc.stats(bd).total_ios
    if not info["ios_counted"]:
        raise BenchError(f"eBPF accounting counted no I/O on {bd.name} ({bd.majmin})")


@contextlib.contextmanager
def monitor_running(path: str, *, python: str = sys.executable, log_path: Path | None = None,
                    scratch: Path | None = None,
                    start_timeout: float = MONITOR_START_TIMEOUT) -> Iterator[dict[str, Any]]:
    """``ublkml monitor run`` watching ``path`` with eBPF, for the block.

    The real command, a process of its own (``python -m ublk_driver monitor run
    --drive PATH`` with :data:`MONITOR_ARGS`), with its state and the agent's
    directory in a temporary directory (``UBLKML_STATE_DIR``,
    ``UBLKML_AGENT_DIR``): it touches no other device's state.  The block is
    entered once the monitor's state file lists the drive, sampled by eBPF
    (its first tick); a monitor that exits, samples from sysfs or is not
    there within ``start_timeout`` seconds is a :class:`BenchError`.  When the
    block ends the monitor gets SIGINT (killed if it has not stopped within
    :data:`MONITOR_STOP_TIMEOUT` s), and the yielded dict is filled with what it
    did: source, ticks and intervals with I/O during the block, tick duration,
    its CPU seconds.  No interval with I/O in its last window is an error: the
    monitor did not see the measurement, so "on" would not have been on.
    """
    from ml.monitor import read_state

    drive = os.path.basename(os.path.realpath(path))
    state_dir = Path(tempfile.mkdtemp(prefix="ublkml-bench-monitor-", dir=scratch))
    env = {**_child_env(), "UBLKML_STATE_DIR": str(state_dir),
           "UBLKML_AGENT_DIR": str(state_dir / "agent")}
    argv = [python, "-m", "ublk_driver", "monitor", "run", "--drive", path, *MONITOR_ARGS]
    log_file = log_path or state_dir / "monitor.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"drive": drive, "args": " ".join(MONITOR_ARGS)}
    try:
        with open(log_file, "w") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        info["pid"] = proc.pid
        t_start = time.monotonic()
        try:
            def exited() -> BenchError:
                tail = _read(log_file).splitlines()[-1:] or ["(no output)"]
                return BenchError(f"ublkml monitor run exited with status {proc.returncode} "
                                  f"before watching {drive}: {tail[0]}")

            def ready() -> bool:
                if proc.poll() is not None:
                    raise exited()
                d = ((read_state(str(state_dir)) or {}).get("drives") or {}).get(drive)
                if d is None:
                    return False
                if d.get("source") != "ebpf":
                    raise BenchError(f"the monitor samples {drive} from {d.get('source')}, "
                                     f"not eBPF: {d.get('source_note')}")
                return True

            _wait_for(ready, start_timeout, f"the monitor's first tick on {drive} (its log: "
                      f"{log_file})")
            first = read_state(str(state_dir)) or {}
            info["start_s"] = round(time.monotonic() - t_start, 2)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            yield info
            cpu1, wall = cpu_seconds(proc.pid), time.monotonic() - t0
            last = read_state(str(state_dir)) or {}
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(MONITOR_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    say(f"warning: the monitor (pid {proc.pid}) did not stop within "
                        f"{MONITOR_STOP_TIMEOUT:.0f} s of SIGINT: killed")
                    proc.kill()
                    proc.wait(10)
        info["exit"] = proc.returncode
        final = read_state(str(state_dir)) or last  # written once more as it stops
        d = (final.get("drives") or {}).get(drive) or {}
        stats, stats0 = final.get("stats") or {}, first.get("stats") or {}
        info.update(
            source=d.get("source"), source_note=d.get("source_note"),
            nice=(final.get("priority") or {}).get("nice"),
            priority_note=(final.get("priority") or {}).get("note"),
            ticks=int(stats.get("ticks") or 0) - int(stats0.get("ticks") or 0),
            late_ticks=int(stats.get("late_ticks") or 0),
            errors=int(stats.get("errors") or 0),
            tick_ms_p50=stats.get("tick_ms_p50"), tick_ms_max=stats.get("tick_ms_max"),
            samples=int(d.get("samples") or 0),
            samples_total=int(d.get("samples_total") or 0),
            judged_by=d.get("judged_by"), wall_s=round(wall, 3),
            cpu_s=None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 3))
        if info["cpu_s"] is not None and wall > 0:
            info["cpu_share"] = round(info["cpu_s"] / wall, 4)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    if not info["samples"]:
        raise BenchError(f"the monitor saw no I/O on {drive} during the measurement "
                         f"({info['ticks']} ticks, source {info['source']})")


BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def _bpf_prog_stats(prefix: str = "ka_") -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of the loaded programs whose names start with prefix."""
    proc = _sh([_which("bpftool"), "-j", "prog", "show"], what="bpftool prog show")
    out: dict[str, tuple[int, int]] = {}
    for prog in json.loads(proc.stdout or "[]"):
        name = str(prog.get("name", ""))
        if name.startswith(prefix) and "run_cnt" in prog:
            t, n = out.get(name, (0, 0))
            out[name] = (t + int(prog["run_time_ns"]), n + int(prog["run_cnt"]))
    return out


def bpf_cost(case: Case, handle: Handle, ctx: Context, *, runtime: float,
             ramp: float) -> dict[str, Any]:
    """What the accounting programs cost per I/O, by the kernel's own count.

    IOPS ratios under TCG swing by +-10 % between rounds, more than the
    effect they are meant to show; ``kernel.bpf_stats_enabled`` makes the
    kernel time every program run, which is a direct measurement.  It is a
    separate measurement because the timing itself (two clock reads per
    run) would weigh on an "on" round.
    """
    try:
        old = Path(BPF_STATS_SYSCTL).read_text().strip()
        Path(BPF_STATS_SYSCTL).write_text("1")
    except OSError as e:
        raise BenchError(f"cannot enable {BPF_STATS_SYSCTL}: {e.strerror}") from None
    try:
        with accounting_attached(handle.path) as acct:
            before = _bpf_prog_stats()
            figures = measure_case(case, handle, ctx, runtime=runtime, ramp=ramp,
                                   profile=False)
            after = _bpf_prog_stats()
    finally:
        with contextlib.suppress(OSError):
            Path(BPF_STATS_SYSCTL).write_text(old)
    progs = {name: {"run_time_ns": t - before.get(name, (0, 0))[0],
                    "run_cnt": n - before.get(name, (0, 0))[1]}
             for name, (t, n) in after.items()}
    total_ns = sum(p["run_time_ns"] for p in progs.values())
    ios = int(acct.get("ios_counted", 0))
    if not ios or not total_ns:
        raise BenchError("bpf_stats: the accounting programs did not run")
    ns_per_io = total_ns / ios
    iops = float(figures["iops"])
    return {"programs": progs, "ios": ios, "ns_per_io": ns_per_io, "iops": iops,
            # share of one CPU's time the programs take at this rate
            "cpu_share": ns_per_io * iops / 1e9}


# ---------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------


def _task_cpu(pid: int, children: bool = True) -> dict[int, tuple[str, int, int]]:
    """tid -> (thread name, utime, stime in clock ticks) of every thread of
    ``pid`` and of its child processes (``--queue-processes`` servers)."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        stat = _read(f"/proc/{pid}/task/{tid}/stat")
        if not stat:
            continue
        # The name (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        name = _read(f"/proc/{pid}/task/{tid}/comm", "?")
        out[int(tid)] = (name, int(fields[11]), int(fields[12]))
        if children:
            for child in _read(f"/proc/{pid}/task/{tid}/children").split():
                out.update(_task_cpu(int(child), children=False))
    return out


def cpu_profile(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
                wall: float, iops: float) -> dict[str, Any]:
    """Server CPU use during one measurement, from /proc (no py-spy needed).

    ``cpu_us_per_io`` divides the server's CPU time by the I/Os of the whole
    wall time (ramp and fio's start-up included, when fewer I/Os happen), so
    it slightly *under*states the cost per I/O; it is for comparing devices
    and runs, not an exact figure.
    """
    tick = os.sysconf("SC_CLK_TCK")
    threads: list[dict[str, Any]] = []
    user = system = 0.0
    for tid, (name, ut, st) in after.items():
        ut0, st0 = before.get(tid, (name, 0, 0))[1:]
        du, ds = (ut - ut0) / tick, (st - st0) / tick
        user += du
        system += ds
        threads.append({"tid": tid, "name": name, "user_s": round(du, 3),
                        "sys_s": round(ds, 3)})
    threads.sort(key=lambda t: -(float(t["user_s"]) + float(t["sys_s"])))
    total = user + system
    return {
        "wall_s": round(wall, 3),
        "user_s": round(user, 3),
        "sys_s": round(system, 3),
        "cpu_util": round(total / wall, 3) if wall > 0 else None,
        "cpu_us_per_io": round(total / (iops * wall) * 1e6, 2) if wall > 0 and iops > 0
        else None,
        "threads": threads[:8],
    }


def run_fio(job_path: Path, out_path: Path, timeout: float) -> str:
    """Run fio on a job file; its JSON document as text."""
    try:
        proc = subprocess.Popen([_which("fio"), "--output-format=json",
                                 f"--output={out_path}", str(job_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_child_env())
    except FileNotFoundError:
        raise MissingToolError("fio") from None
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        # fio blocked in the kernel on a wedged device cannot die until the
        # device is torn down: do not wait for it forever.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        raise BenchError(f"fio did not finish within {timeout:.0f} s (device hung?)") from None
    text = _read(out_path)
    if proc.returncode != 0:
        line = (err.strip() or "(no output)").splitlines()[-1]
        if not text:
            raise BenchError(f"fio failed (exit {proc.returncode}): {line}")
        # fio may exit non-zero but still write the per-job error into its JSON,
        # which parse_fio_json turns into a precise message.
    return text


def measure_case(case: Case, handle: Handle, ctx: Context, *, runtime: float, ramp: float,
                 profile: bool) -> dict[str, Any]:
    """fio on the live device; the figures (raises BenchError/FioError)."""
    stem = f"{case.device.name}-{case.workload.name}-q{case.queues}"
    if case.in_rounds:
        stem += f"-r{case.round + 1}"
    jobs_dir, fio_dir = ctx.outdir / "jobs", ctx.outdir / "fio"
    jobs_dir.mkdir(exist_ok=True)
    fio_dir.mkdir(exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    job = fio_job_text(handle.path, case.workload, queues=case.queues, runtime=runtime,
                       ramp=ramp, cpus=cpus)
    job_path = jobs_dir / f"{stem}.fio"
    job_path.write_text(job)
    out_path = fio_dir / f"{stem}.json"
    with contextlib.suppress(FileNotFoundError):
        out_path.unlink()
    before = _task_cpu(handle.pid) if profile and handle.pid else {}
    sampler = None
    if profile and handle.pid and (exe := sampler_mod.find_py_spy()):
        (ctx.outdir / "profiles").mkdir(exist_ok=True)
        sampler = sampler_mod.Sampler(exe, handle.pid, ctx.outdir / "profiles" / f"{stem}.txt",
                                      delay=ramp, duration=runtime)
    t0 = time.monotonic()
    text = run_fio(job_path, out_path, timeout=runtime + ramp + 180)
    wall = time.monotonic() - t0
    after = _task_cpu(handle.pid) if profile and handle.pid else {}
    result = parse_fio_json(text, case.workload.direction)
    figures = result.to_dict()
    if profile and handle.pid:
        figures["profile"] = cpu_profile(before, after, wall, result.iops)
        figures["profile"]["samples"] = (sampler.result() if sampler else
                                         {"error": "py-spy not installed (extra: bench)"})
    return figures


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _fio_version() -> str:
    try:
        return _sh([_which("fio"), "--version"], what="fio --version").stdout.strip()
    except BenchError:
        return "unknown"


def _environment() -> dict[str, Any]:
    from ublk_driver.testbed import in_vm

    vm = in_vm()
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "environment": "vm" if vm else "native",
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "cpus": len(os.sched_getaffinity(0)),
        "memory_mib": mem_kb // 1024,
        "python": sys.version.split()[0],
    }


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=20, check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def _git_dirty() -> list[str]:
    """Files changed from the commit: the figures are of the working tree, not the commit."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                               "--untracked-files=no"],
                              capture_output=True, text=True, timeout=20, check=False)
        if proc.returncode == 0:
            return [line[3:] for line in proc.stdout.splitlines() if line.strip()]
    return []


def engine_fingerprint() -> str | None:
    """sha256 (12 hex digits) of the compiled engine the ublkml servers load.

    Recorded at each ublkml device set-up: the guest sees the host's live tree,
    so a rebuild during a run would otherwise go unnoticed.
    """
    for so in sorted((REPO_ROOT / "ublk_driver").glob("_ublkml_cffi*.so")):
        with contextlib.suppress(OSError):
            return hashlib.sha256(so.read_bytes()).hexdigest()[:12]
    return None


def _record(case: Case, meta: dict[str, Any]) -> dict[str, Any]:
    w = case.workload
    return {
        "group": case.device.group, "device": case.device.name, "role": case.device.role,
        "baseline": case.device.baseline, "workload": w.name, "label": w.label,
        "rw": w.rw, "bs": w.bs, "depth": w.depth, "queues": case.queues,
        "numjobs": case.queues, "in_flight": w.depth * case.queues,
        "fio_version": meta["fio_version"], "kernel": meta["kernel"],
        "environment": meta["environment"], "date": _now(),
        **({"round": case.round} if case.in_rounds else {}),
    }


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that every device is torn down."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


class _Run:
    """The state of one measuring run: the results document and the progress count."""

    def __init__(self, config: BenchConfig, outdir: Path, cases: list[Case]) -> None:
        self.config = config
        self.runtime, self.ramp = config.timing()
        self.cases = cases
        self.total = sum(1 for c in cases if c.applicable)
        self.index = 0
        self.code = 0
        self.started = time.monotonic()
        self.results_path = outdir / "results.json"
        env = _environment()
        self.meta: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "date": _now(), "quick": config.quick,
            "runtime_s": self.runtime, "ramp_s": self.ramp, "fio_version": _fio_version(),
            "git_commit": _git_commit(), "git_dirty": _git_dirty(),
            "engine": engine_fingerprint(), "skipped_groups": sorted(config.skip),
            "profile": config.profile, "poll_us": config.poll_us,
            "goal_rounds": max((c.round + 1 for c in cases if c.repeated), default=1),
            **env,
            "devices": {d.name: {"group": d.group, "role": d.role, "baseline": d.baseline,
                                 "description": d.description} for d in DEVICES},
        }
        self.doc: dict[str, Any] = {"meta": self.meta, "results": []}

    def save(self) -> None:
        """Rewrite results.json (after every measurement: a killed run keeps its figures)."""
        self.meta["elapsed_s"] = round(time.monotonic() - self.started, 1)
        _write_json(self.results_path, self.doc)

    def add(self, rec: dict[str, Any]) -> None:
        self.doc["results"].append(rec)
        self.save()

    def group(self, group: str, ctx: Context) -> None:
        """Every case of one group (device set-ups in order, each torn down after use)."""
        group_cases = [c for c in self.cases if c.device.group == group]
        if group == "overhead":
            if group_cases:
                self.overhead(group_cases, ctx)
            return
        group_error: str | None = None
        with contextlib.ExitStack() as stack:
            if group == "loop" and any(c.applicable for c in group_cases):
                group_error = self._loop_backing(ctx, stack)
            for queues, batch in itertools.groupby(group_cases, key=lambda c: c.queues):
                self.pair(queues, list(batch), ctx, group_error)

    def _loop_backing(self, ctx: Context, stack: contextlib.ExitStack) -> str | None:
        """Create the loop group's backing file (ext4 on brd, else tmpfs); an error or None."""
        directory = ctx.scratch
        fs: dict[str, Any] = {}
        try:
            fs = stack.enter_context(ram_ext4(ctx.scratch / "loopfs", LOOP_FS_BYTES))
            directory = ctx.scratch / "loopfs"
        except ScratchUnavailableError as e:
            say(f"warning: no ext4 on brd for the loop group ({e}); using tmpfs, where "
                 "io_uring punts file I/O to worker threads")
            fs = {"fallback": str(e)}
        try:
            ctx.loop_file = directory / "loop-backing.img"
            ctx.loop_file_info = {**create_backing_file(ctx.loop_file, LOOP_BYTES), **fs}
            self.meta["loop_backing"] = ctx.loop_file_info
            if not ctx.loop_file_info["o_direct"]:
                say("warning: the backing file's file system refuses O_DIRECT")
        except (OSError, BenchError) as e:
            return f"cannot create the backing file: {e}"
        return None

    def pair(self, queues: int, batch: list[Case], ctx: Context,
             group_error: str | None) -> None:
        """The cases of a group with one queue count: both devices set up side by side.

        The baseline and the ublkml device are live at the same time and
        measured alternately, workload by workload, so that the two figures
        of each pair are taken seconds apart: on a machine shared with other
        VMs the load changes over minutes, and it then weighs on both alike.
        An idle device costs nothing (its server sleeps in io_uring_enter).
        """
        specs = list(dict.fromkeys(c.device for c in batch))
        handles: dict[str, Handle] = {}
        errors: dict[str, str | None] = {}
        try:
            with contextlib.ExitStack() as stack:
                for spec in specs:
                    if queues > spec.max_queues:
                        continue
                    error = group_error or _preflight(spec)
                    if error is None:
                        try:
                            handles[spec.name] = stack.enter_context(
                                open_device(spec, queues, ctx))
                        except Exception as e:  # recorded; the other device still runs
                            error = f"setting up {spec.name} with {queues} queue(s): {e}"
                    errors[spec.name] = error
                for case in batch:
                    if not case.applicable:
                        reason = case.device.single_queue_reason
                        rec = _record(case, self.meta)
                        rec.update(status="n/a", reason=reason)
                        say(f"{case.title}: n/a ({reason})")
                        self.add(rec)
                    else:
                        name = case.device.name
                        self.one(case, handles.get(name), ctx, errors.get(name))
        except Exception as e:  # a failed tear-down must not stop the other groups
            say(f"warning: tearing down the {specs[0].group} devices (q{queues}) failed: {e}")

    def overhead(self, cases: list[Case], ctx: Context) -> None:
        """The overhead group: a plain and a ``--score`` ublkml null device side by side.

        Round after round, in an order that changes (see _overhead_position):
        the plain device ("off"), the same device with the eBPF accounting
        attached only for that measurement, the same device watched by the
        drive monitor (a process started for that measurement), the scoring
        device.  The programs are detached (and their maps unpinned), and the
        monitor stopped, before the next measurement, so that the others never
        run with them.
        """
        self.meta["overhead_rounds"] = max(c.round for c in cases) + 1
        self.meta["overhead_order"] = "rotated"  # see _overhead_position
        plain = device_by_name("ublkml-null-off")
        handles: dict[str, Handle] = {}
        errors: dict[str, str | None] = {}
        try:
            with contextlib.ExitStack() as stack:
                for spec in dict.fromkeys(c.device for c in cases):
                    if spec.name in _ON_THE_PLAIN_DEVICE:
                        continue  # the plain device, with the programs or the monitor
                    try:
                        handles[spec.name] = stack.enter_context(
                            open_device(spec, OVERHEAD_QUEUES, ctx))
                        errors[spec.name] = None
                    except Exception as e:  # recorded; the other device still runs
                        errors[spec.name] = (f"setting up {spec.name} with "
                                             f"{OVERHEAD_QUEUES} queue(s): {e}")
                for case in cases:
                    if case.device.name in _ON_THE_PLAIN_DEVICE:
                        self.one(case, handles.get(plain.name), ctx, errors.get(plain.name),
                                 accounting=case.device.name == "ublkml-null-acct",
                                 monitor=case.device.name == "ublkml-null-monitor")
                    else:
                        name = case.device.name
                        self.one(case, handles.get(name), ctx, errors.get(name))
                if plain.name in handles:
                    self._bpf_cost(next(c for c in cases if c.device.name == plain.name),
                                   handles[plain.name], ctx)
        except Exception as e:  # a failed tear-down must not stop the run
            say(f"warning: tearing down the overhead devices failed: {e}")

    def _bpf_cost(self, case: Case, handle: Handle, ctx: Context) -> None:
        print("bpf_stats: cost of the accounting programs per I/O ... ", end="",
              file=sys.stderr, flush=True)
        try:
            cost = bpf_cost(case, handle, ctx, runtime=self.runtime, ramp=self.ramp)
        except (BenchError, FioError, OSError) as e:
            self.meta["bpf_cost"] = {"error": str(e)}
            print(f"ERROR: {e}", file=sys.stderr, flush=True)
            return
        self.meta["bpf_cost"] = cost
        print(f"{cost['ns_per_io']:,.0f} ns per I/O ({cost['cpu_share']:.1%} of a CPU at "
              f"{cost['iops']:,.0f} IOPS)", file=sys.stderr, flush=True)
        self.save()

    def one(self, case: Case, handle: Handle | None, ctx: Context, error: str | None,
            *, accounting: bool = False, monitor: bool = False) -> None:
        """Measure one case, or record why it could not be measured.

        ``accounting``: with the kernel agent's eBPF accounting attached to the
        device during the measurement (:func:`accounting_attached`);
        ``monitor``: with the drive monitor watching it (:func:`monitor_running`).
        """
        self.index += 1
        rec = _record(case, self.meta)
        print(f"[{self.index}/{self.total}] {case.title} ... ", end="", file=sys.stderr,
              flush=True)
        if handle is None:
            rec.update(status="error", error=error or "device not set up")
        else:
            # The I/O scheduler in front of each device, as measured: a
            # single-queue disk gets mq-deadline unless its driver says
            # otherwise, and that alone moves IOPS by ~30 % here.
            rec["device_attrs"] = {**handle.attrs, "scheduler": _scheduler(handle.path)}
            try:
                if accounting:
                    with accounting_attached(handle.path) as acct:
                        figures = measure_case(case, handle, ctx, runtime=self.runtime,
                                               ramp=self.ramp, profile=self.config.profile)
                    figures["accounting"] = acct
                elif monitor:
                    log = ctx.outdir / "logs" / f"monitor-r{case.round + 1}.log"
                    with monitor_running(handle.path, python=ctx.python, log_path=log,
                                         scratch=ctx.scratch) as mon:
                        figures = measure_case(case, handle, ctx, runtime=self.runtime,
                                               ramp=self.ramp, profile=self.config.profile)
                    figures["monitor"] = mon
                else:
                    figures = measure_case(case, handle, ctx, runtime=self.runtime,
                                           ramp=self.ramp, profile=self.config.profile)
                rec.update(status="ok", **figures)
            except (BenchError, FioError, OSError) as e:
                rec.update(status="error", error=str(e))
            except Exception as e:  # a bug here must not lose the other figures
                rec.update(status="error", error=f"{type(e).__name__}: {e}")
        if rec["status"] == "ok":
            lat = rec["lat_us"]
            print(f"{rec['iops']:,.0f} IOPS, {rec['bw_mib_s']:,.1f} MiB/s, "
                  f"p50 {lat['p50']:,.1f} us, p99 {lat['p99']:,.1f} us",
                  file=sys.stderr, flush=True)
        else:
            self.code = 1
            print(f"ERROR: {rec['error']}", file=sys.stderr, flush=True)
        self.add(rec)


#: Overhead cases measured on ublkml-null-off's device, with something switched on.
_ON_THE_PLAIN_DEVICE = ("ublkml-null-acct", "ublkml-null-monitor")


def measure(config: BenchConfig, outdir: Path) -> tuple[dict[str, Any], int]:
    """Measure every case here (ublk must work); returns (results document, exit code)."""
    run = _Run(config, outdir, config.cases())
    meta = run.meta
    say(f"{run.total} measurements ({run.runtime:g} s + {run.ramp:g} s ramp each), about "
         f"{estimate_seconds(run.cases, run.runtime, run.ramp) / 60:.0f} min, on "
         f"{meta['environment']} kernel {meta['kernel']} with {meta['fio_version']}")
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    scratch = Path(tempfile.mkdtemp(prefix="ublkml-bench-", dir=_tmpfs_dir()))
    try:
        ctx = Context(outdir=outdir, scratch=scratch,
                      ublkml_args=() if config.poll_us is None else ("--poll-us",
                                                                      str(config.poll_us)))
        for group in GROUPS:
            run.group(group, ctx)
    except (KeyboardInterrupt, _Terminated):
        meta["interrupted"] = True
        say("interrupted: devices torn down, partial results kept")
        run.code = 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(scratch, ignore_errors=True)
        run.save()
    return run.doc, run.code


_preflight_cache: dict[str, str | None] = {}


def _preflight(spec: DeviceSpec) -> str | None:
    """A one-line error if a tool the device needs is missing, else None."""
    if spec.name not in _preflight_cache:
        error: str | None = None
        try:
            for tool in spec.tools:
                _which(tool)
            if spec.name == "nbdkit-python":
                _nbdkit_python_available()
        except BenchError as e:
            error = str(e)
        _preflight_cache[spec.name] = error
    return _preflight_cache[spec.name]


# ---------------------------------------------------------------------------
# Host side: re-run in the test bed
# ---------------------------------------------------------------------------


def _count_qemu() -> int:
    """qemu processes on this host other than our own test bed's (another test
    bed competes with ours for the CPUs: the main source of noise)."""
    n = 0
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or not _read(f"/proc/{pid}/comm").startswith("qemu-system"):
            continue
        stat = _read(f"/proc/{pid}/stat")
        ppid = stat[stat.rfind(")") + 2:].split()[1:2]
        if ppid != [me]:
            n += 1
    return n


class NoiseSampler:
    """Samples the host's load and the other qemu processes while the test bed runs.

    Snapshots before and after miss another test bed that ran for ten minutes
    in between; a sample every few seconds does not.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-noise", daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append((_count_qemu(), os.getloadavg()[0]))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> NoiseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        qemus = [q for q, _ in self.samples]
        loads = [load for _, load in self.samples]
        return {"samples": len(self.samples), "other_qemu_max": max(qemus),
                "other_qemu_share": round(sum(1 for q in qemus if q) / len(qemus), 3),
                "loadavg_mean": round(sum(loads) / len(loads), 2),
                "loadavg_max": round(max(loads), 2)}


def run_in_vm(config: BenchConfig, outdir: Path, timeout: float | None = None
              ) -> tuple[dict[str, Any] | None, int]:
    """Measure everything in one boot of the test bed; (results document, exit code).

    The guest writes results.json into ``outdir`` (shared); the host adds its own
    facts (load, other qemu processes, boot time).  None when the guest wrote no
    results (the code then says why: the guest's, or 125 if the test bed failed).
    """
    runtime, ramp = config.timing()
    estimate = estimate_seconds(config.cases(), runtime, ramp) + _BOOT_OVERHEAD
    host: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                            "loadavg_before": list(os.getloadavg()),
                            "other_qemu_before": _count_qemu()}
    results_path = outdir / "results.json"
    with NoiseSampler() as sampler:
        vm = run_in_testbed(["bench"], ["--out", str(outdir), *config.to_args()],
                            share=outdir, doing="measuring", estimate_s=estimate,
                            timeout=timeout or max(900.0, 2.5 * estimate + 300),
                            memory_mb=VM_MEMORY_MB, cpus=VM_CPUS, stream=sys.stderr,
                            console_log=outdir / "logs" / "vm-console.log", cwd=REPO_ROOT,
                            say=say)
    if vm.error is not None:
        say(f"error: {vm.failure()}")
    else:
        (outdir / "logs" / "vm-dmesg.log").write_text(vm.kernel_log)
        host.update(vm_boot_s=vm.boot_seconds, vm_total_s=vm.total_seconds)
    host.update(loadavg_after=list(os.getloadavg()), other_qemu_after=_count_qemu(),
                during=sampler.summary())
    if not results_path.exists():
        say(f"the guest wrote no {results_path}")
        return None, vm.code or 1
    doc: dict[str, Any] = json.loads(results_path.read_text())
    doc["meta"]["host"] = host
    doc["meta"]["vm"] = {"accel": "tcg", "cpus": VM_CPUS, "memory_mib": VM_MEMORY_MB,
                         "boot_s": host.get("vm_boot_s"), "total_s": host.get("vm_total_s")}
    _write_json(results_path, doc)
    return doc, vm.code
