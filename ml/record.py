"""Recording labelled drive telemetry from the project's own devices.

``ublkml ml record OUT_DIR`` serves a mirror (``--legs`` legs, files on ext4
over brd, else on tmpfs) in this process with completion records on, runs a
seeded fio mixed random load on it, and injects seeded fault schedules into
some legs (``Server.set_fault``): constant slowdowns, bursts and ramps of 2x to
20x from an onset, and healthy legs, some of them with rare short hiccups.
Every leg stays ACTIVE (no leg policy), so reads go round robin to all legs and
every leg serves reads and all writes.  Each run is one *host* whose drives
are the legs; ``--hosts`` runs one after another.

The completion records of each leg (one per leg I/O: its own latency, the
injected delay included) are folded per leg and second into the Perseus
layout :mod:`ml.telemetry` reads::

    OUT/<host>/<YYYY-MM-DD>.csv   ts,disk_id,throughput,latency   (1-s rows)
    OUT/labels.csv                host,disk_id   (the legs labelled fail-slow)
    OUT/injected.csv              host,disk_id,kind,fault,onset_s,slow
    OUT/recording.json            the plan, what was measured, window_s

``ts`` is Unix time in seconds, ``throughput`` bytes per second moved by the
leg's successful reads and writes, ``latency`` their mean latency in
microseconds; a second in which a leg completed nothing has no row.  Detection
and training read ``window_s`` (30 s: 30 rows per window, like the 30 rows of
a 30-min window of 60-s telemetry) from ``recording.json``.

Labels: a leg is fail-slow when it was given a constant, burst or ramp
slowdown (or a fixed delay) - persistently slow from its onset, if only in
episodes; a hiccup leg (a few hundred ms of slowness a minute, at most ~3 % of
the time) is healthy, as in the synthetic data's noisy drives.

Reproducible: the plan of host *k* (its workload, which legs are slow, how,
from when) depends only on ``--seed``, ``--mix``, ``--legs``, ``--minutes`` and
*k*; fio's offsets are seeded too.  The measured latencies are not
deterministic (a real device), so two recordings of the same plan differ in
their numbers, not in their faults and labels.  ``--resume`` continues an
interrupted recording (or adds hosts to it) with the same plan.

Natively where ``/dev/ublk-control`` exists (as root), else in one boot of the
qemu test bed with ``OUT_DIR`` as its writable share.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ublk_driver.core.errors import UblkError
from ublk_driver.faults import FaultSpec
from ublk_driver.scratch import ScratchUnavailableError, ram_ext4
from ublk_driver.testbed.where import needs_testbed, run_in_testbed

REPO_ROOT = Path(__file__).resolve().parent.parent
FORMAT = 1
INTERVAL_S = 1
#: detection / training window for recorded telemetry: 30 one-second rows
WINDOW_S = 30.0
WARMUP_S = 2.0              # fio runs this long before the recorded period starts
TAIL_S = 1.0                # and this long after it
DRAIN_S = 0.1               # how often the reader drains the completion records
RECORD_CAPACITY = 1 << 16   # records kept per queue between drains
LEG_MIB = 64
LEGS_FS_BYTES = 640 << 20   # ext4 on brd for the legs; more legs than fit go on tmpfs
KINDS = ("healthy", "hiccup", "const", "burst", "ramp", "delay")
SLOW_KINDS = ("const", "burst", "ramp", "delay", "given")
VM_CPUS, VM_MEMORY_MB = 2, 4096
_READ, _WRITE = 0, 1        # ublk_driver.uapi.Op


class RecordError(UblkError, ValueError):
    """A recording cannot run or failed (one line: what to do)."""


# ---- the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class FaultMix:
    """How faults and workloads are drawn (ranges are uniform unless said)."""

    slow_fraction: float = 0.25                 # per leg; at most legs // 2 per host
    hiccup_fraction: float = 0.15               # of the healthy legs
    kinds: tuple[tuple[str, float], ...] = (("const", 0.4), ("burst", 0.35), ("ramp", 0.25))
    slowdown: tuple[float, float] = (2.0, 20.0)  # log-uniform
    onset: tuple[float, float] = (0.0, 0.6)      # fraction of the recorded period
    burst_period_s: tuple[float, float] = (4.0, 20.0)
    burst_duty: tuple[float, float] = (0.2, 0.7)
    ramp_fraction: tuple[float, float] = (0.3, 0.8)  # of the time left after the onset
    delay_us: tuple[float, float] = (1000.0, 10000.0)  # log-uniform (healthy legs: ~0.5-1 ms)
    hiccup_period_s: tuple[float, float] = (20.0, 60.0)
    hiccup_on_ms: tuple[float, float] = (200.0, 600.0)
    hiccup_slow: tuple[float, float] = (5.0, 20.0)
    # the host's workload
    read_mix: tuple[int, int] = (50, 90)         # % reads
    iops: tuple[float, float] = (300.0, 1500.0)  # log-uniform, reads + writes
    depth: tuple[int, int] = (4, 16)
    large_fraction: float = 0.3                  # hosts with 4k-64k blocks, else 4k
    bursty_fraction: float = 0.5                 # hosts with an on/off 64k reader too


#: ``train`` makes training sets, ``heldout`` test sets (other seeds, a shifted
#: mix: more bursts, fixed delays, later onsets, more hiccups, wider loads);
#: ``none`` injects nothing (``--fault`` still applies).
MIXES: dict[str, FaultMix] = {
    "train": FaultMix(),
    "heldout": FaultMix(kinds=(("const", 0.3), ("burst", 0.35), ("ramp", 0.2),
                               ("delay", 0.15)),
                        onset=(0.0, 0.7), burst_period_s=(3.0, 30.0), burst_duty=(0.15, 0.8),
                        hiccup_fraction=0.25, read_mix=(40, 95), iops=(200.0, 2000.0),
                        depth=(2, 32), large_fraction=0.5, bursty_fraction=0.6),
    "none": FaultMix(slow_fraction=0.0, hiccup_fraction=0.0),
}


@dataclass(frozen=True)
class LegPlan:
    leg: int
    kind: str                 # one of KINDS, or "given" (--fault)
    fault: str                # FaultSpec text, "" for none
    onset_s: float
    slow: bool                # the label

    def spec(self) -> FaultSpec | None:
        return FaultSpec.parse(self.fault) if self.fault else None


@dataclass(frozen=True)
class Workload:
    read_mix: int
    iops: int
    depth: int
    block: str                # "4k" or "4k-64k"
    bursty: bool
    randseed: int


@dataclass(frozen=True)
class HostPlan:
    host: str
    index: int
    seconds: int
    workload: Workload
    legs: tuple[LegPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "index": self.index, "seconds": self.seconds,
                "workload": asdict(self.workload), "legs": [asdict(lp) for lp in self.legs]}


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _slow_leg(rng: np.random.Generator, mix: FaultMix, leg: int, seconds: int) -> LegPlan:
    names = [k for k, _ in mix.kinds]
    weights = np.array([w for _, w in mix.kinds], dtype=np.float64)
    kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    f = round(_loguniform(rng, *mix.slowdown), 2)
    onset = round(float(rng.uniform(*mix.onset)) * seconds, 1)
    if kind == "const":
        spec = FaultSpec(slow=f)
    elif kind == "burst":
        period = int(rng.uniform(*mix.burst_period_s) * 1000)
        on = max(int(period * rng.uniform(*mix.burst_duty)), 1)
        spec = FaultSpec(slow=f, mode="burst", burst_period_ms=period, burst_on_ms=on)
    elif kind == "ramp":
        ramp = max(int((seconds - onset) * rng.uniform(*mix.ramp_fraction) * 1000), 1000)
        spec = FaultSpec(slow=f, mode="ramp", ramp_ms=ramp)
    elif kind == "delay":
        spec = FaultSpec(delay_us=int(_loguniform(rng, *mix.delay_us)))
    else:  # pragma: no cover - MIXES only name the kinds above
        raise RecordError(f"unknown fault kind {kind!r}")
    return LegPlan(leg, kind, str(spec), onset, True)


def plan_host(seed: int, index: int, legs: int, seconds: int, mix: FaultMix,
              given: dict[int, FaultSpec] | None = None) -> HostPlan:
    """The plan of host ``index``: a function of its arguments only."""
    rng = np.random.default_rng([seed, index, legs, seconds])
    w = Workload(read_mix=int(rng.integers(mix.read_mix[0], mix.read_mix[1] + 1)),
                 iops=round(_loguniform(rng, *mix.iops)),
                 depth=int(rng.integers(mix.depth[0], mix.depth[1] + 1)),
                 block="4k-64k" if rng.random() < mix.large_fraction else "4k",
                 bursty=bool(rng.random() < mix.bursty_fraction),
                 randseed=int(rng.integers(1, 1 << 31)))
    slow = rng.random(legs) < mix.slow_fraction
    order = rng.permutation(legs)
    for d in order[legs // 2:]:       # at most legs // 2 slow: peers stay mostly healthy
        if slow.sum() > legs // 2:
            slow[d] = False
    hiccup = (rng.random(legs) < mix.hiccup_fraction) & ~slow
    plans = []
    for leg in range(legs):
        # Every leg draws the same numbers whatever its kind: changing one
        # leg's kind leaves the others' plans alone.
        sub = np.random.default_rng([seed, index, legs, seconds, leg + 1])
        if given is not None:
            spec = given.get(leg)
            plans.append(LegPlan(leg, "given", str(spec), 0.0, True) if spec is not None
                         else LegPlan(leg, "healthy", "", 0.0, False))
        elif slow[leg]:
            plans.append(_slow_leg(sub, mix, leg, seconds))
        elif hiccup[leg]:
            period = int(sub.uniform(*mix.hiccup_period_s) * 1000)
            on = int(sub.uniform(*mix.hiccup_on_ms))
            spec = FaultSpec(slow=round(float(sub.uniform(*mix.hiccup_slow)), 2), mode="burst",
                             burst_period_ms=period, burst_on_ms=on)
            plans.append(LegPlan(leg, "hiccup", str(spec),
                                 round(float(sub.uniform(0, 0.2)) * seconds, 1), False))
        else:
            plans.append(LegPlan(leg, "healthy", "", 0.0, False))
    return HostPlan(f"r{seed}h{index:03d}", index, seconds, w, tuple(plans))


# ---- records -> per-leg, per-second rows ---------------------------------------------


class Aggregator:
    """Folds completion records into per-leg, per-second sums (vectorised).

    Second ``s`` holds the records answered in ``[t0 + s, t0 + s + 1)`` s
    (CLOCK_MONOTONIC, as the records' ``t_ns``); only successful reads and
    writes count towards throughput and latency, failed ones are counted.
    """

    def __init__(self, legs: int, seconds: int, t0_ns: int) -> None:
        self.legs, self.seconds, self.t0_ns = legs, seconds, t0_ns
        n = legs * seconds
        self.count = np.zeros(n, dtype=np.int64)
        self.bytes = np.zeros(n, dtype=np.float64)
        self.lat_ns = np.zeros(n, dtype=np.float64)
        self.errors = np.zeros(n, dtype=np.int64)
        self.records = 0        # every record seen
        self.outside = 0        # before t0, after the period, other ops or paths

    def add(self, recs: npt.NDArray[Any]) -> None:
        if recs.size == 0:
            return
        self.records += int(recs.size)
        rel = recs["t_ns"].astype(np.int64) - np.int64(self.t0_ns)
        sec = np.floor_divide(rel, 1_000_000_000)
        path = recs["path"].astype(np.int64)
        op = recs["op"]
        ok = (sec >= 0) & (sec < self.seconds) & (path < self.legs) & (
            (op == _READ) | (op == _WRITE))
        self.outside += int(recs.size - ok.sum())
        good = ok & (recs["result"] >= 0)
        n = self.legs * self.seconds
        idx = path * self.seconds + sec
        gi = idx[good]
        self.count += np.bincount(gi, minlength=n)
        self.bytes += np.bincount(gi, weights=recs["length"][good].astype(np.float64),
                                  minlength=n)
        self.lat_ns += np.bincount(gi, weights=recs["lat_ns"][good].astype(np.float64),
                                   minlength=n)
        self.errors += np.bincount(idx[ok & (recs["result"] < 0)], minlength=n)

    def rows(self, ts0: int) -> list[tuple[int, int, float, float]]:
        """(ts, leg, throughput B/s, mean latency us), time-ordered, for every
        leg-second with at least one successful completion."""
        c = self.count.reshape(self.legs, self.seconds)
        b = self.bytes.reshape(self.legs, self.seconds)
        lat = self.lat_ns.reshape(self.legs, self.seconds)
        out = []
        for s in range(self.seconds):
            for leg in range(self.legs):
                if c[leg, s]:
                    out.append((ts0 + s, leg, b[leg, s] / INTERVAL_S,
                                lat[leg, s] / c[leg, s] / 1000.0))
        return out

    def summary(self) -> dict[str, Any]:
        c = self.count.reshape(self.legs, self.seconds)
        return {"records": self.records, "outside_period": self.outside,
                "completions_per_leg": c.sum(axis=1).tolist(),
                "failed_per_leg": self.errors.reshape(self.legs, self.seconds).sum(
                    axis=1).tolist(),
                "empty_leg_seconds": int((c == 0).sum())}


def disk_id(leg: int) -> str:
    return f"leg{leg}"


def write_host(out: Path, host: str, rows: list[tuple[int, int, float, float]]) -> list[str]:
    """``out/<host>/<UTC day>.csv`` (one file per day); returns the file names."""
    d = out / host
    d.mkdir(parents=True, exist_ok=True)
    days: dict[str, list[str]] = {}
    for ts, leg, tput, lat in rows:
        day = _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d")
        days.setdefault(day, []).append(f"{ts},{disk_id(leg)},{tput:.0f},{lat:.1f}\n")
    for day, lines in days.items():
        _atomic_write(d / f"{day}.csv", "ts,disk_id,throughput,latency\n" + "".join(lines))
    return sorted(f"{day}.csv" for day in days)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- fio ------------------------------------------------------------------------------


def fio_job(bdev: str, w: Workload, runtime_s: float) -> str:
    """A mixed random load; with ``bursty`` a 64k reader that comes and goes."""
    reads = max(round(w.iops * w.read_mix / 100), 1)
    writes = max(w.iops - reads, 1)
    bs = "bs=4k\n" if w.block == "4k" else "bsrange=4k-64k\n"
    text = ("[global]\nioengine=io_uring\ndirect=1\n"
            f"filename={bdev}\ntime_based=1\nruntime={runtime_s:g}\n"
            f"randseed={w.randseed}\nnorandommap=1\n"
            "[mixed]\nrw=randrw\n"
            f"rwmixread={w.read_mix}\n{bs}iodepth={w.depth}\n"
            f"rate_iops={reads},{writes}\nrate_process=poisson\n")
    if w.bursty:
        text += ("[bursts]\nrw=randread\nbs=64k\niodepth=4\n"
                 f"rate_iops={max(w.iops // 4, 10)}\n"
                 "thinktime=3000000\nthinktime_blocks=" + str(max(w.iops // 2, 20)) + "\n")
    return text


# ---- one host ---------------------------------------------------------------------------


@dataclass
class HostResult:
    plan: HostPlan
    files: list[str]
    rows: int
    measured: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "files": self.files, "rows": self.rows,
                **self.measured}


def _make_leg(path: Path, size: int) -> None:
    """Written zeros, not a sparse file: reads then touch real blocks."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        os.fsync(f.fileno())


@contextlib.contextmanager
def leg_storage(work: Path, need: int, say: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """A RAM file system for the legs: ext4 on brd (no io-wq workers, as a
    real file system on a block device), else tmpfs."""
    if need <= LEGS_FS_BYTES - (64 << 20):
        mnt = work / "legs"
        try:
            with ram_ext4(mnt, LEGS_FS_BYTES) as facts:
                yield {**facts, "dir": str(mnt)}
                return
        except ScratchUnavailableError as e:
            say(f"ext4 on brd unavailable ({e}): legs on tmpfs")
    else:
        say(f"{need >> 20} MiB of legs do not fit the brd disk: legs on tmpfs")
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else work
    d = Path(tempfile.mkdtemp(prefix="ublkml-record-", dir=base))
    try:
        yield {"filesystem": "tmpfs", "dir": str(d)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


Rows = list[tuple[int, int, float, float]]


def record_host(plan: HostPlan, storage: Path, leg_bytes: int,
                say: Callable[[str], None]) -> tuple[HostResult, Rows]:
    """Serve a mirror of the plan's legs, load it, inject its faults, fold the records."""
    from ublk_driver.server import Server, ServerConfig
    from ublk_driver.targets import MirrorTarget

    n = len(plan.legs)
    paths = [storage / f"{plan.host}-leg{i}.img" for i in range(n)]
    for p in paths:
        _make_leg(p, leg_bytes)
    server = Server(MirrorTarget([str(p) for p in paths]),
                    ServerConfig(queues=1, depth=64, record_capacity=RECORD_CAPACITY))
    server.start()
    try:
        return _load_and_record(server, plan, storage, say)
    finally:
        problems = server.shutdown()
        for p in paths:
            with contextlib.suppress(OSError):
                p.unlink()
        if problems:
            say(f"  warning: {'; '.join(problems)}")


def _load_and_record(server: Any, plan: HostPlan, storage: Path,
                     say: Callable[[str], None]) -> tuple[HostResult, Rows]:
    legs = len(plan.legs)
    job = storage / f"{plan.host}.fio"
    job.write_text(fio_job(server.bdev, plan.workload, WARMUP_S + plan.seconds + TAIL_S))
    server.read_completions()  # the kernel's partition scan: not part of the run
    proc = subprocess.Popen(["fio", "--output-format=json", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The clock starts with fio's first I/O (fio takes seconds to start on a
    # loaded test bed, and its run time counts from there), plus a warm-up.
    clock: dict[str, Any] = {}
    started = threading.Event()
    stop = threading.Event()
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.wait(DRAIN_S):
                recs = server.read_completions()
                if "agg" not in clock:
                    if recs.size == 0:
                        continue
                    t0 = int(recs["t_ns"].min()) + int(WARMUP_S * 1e9)
                    clock["ts0"] = round(time.time() + (t0 - time.monotonic_ns()) / 1e9)
                    clock["agg"] = Aggregator(legs, plan.seconds, t0)
                    clock["t0"] = t0
                    started.set()
                clock["agg"].add(recs)
            if "agg" in clock:
                clock["agg"].add(server.read_completions())
        except BaseException as e:  # reported by the main thread
            failure.append(e)
            started.set()

    th = threading.Thread(target=reader, name="record-reader", daemon=True)
    th.start()
    deadline = time.monotonic() + 120
    while not started.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            timed_out = proc.poll() is None
            proc.kill()
            stop.set()
            _, err = proc.communicate()
            last = err.strip().splitlines()[-1:] or ["(no output)"]
            raise RecordError(f"fio issued no I/O on {server.bdev}"
                              + (" within 120 s" if timed_out else
                                 f" (exit {proc.returncode}): {last[0]}"))
    if failure:
        proc.kill()
        proc.wait()
        stop.set()
        raise RecordError(f"reading the completion records failed: {failure[0]}")
    t0 = int(clock["t0"])
    set_at: dict[int, float] = {}
    try:
        events = sorted((lp.onset_s, lp.leg, lp.spec()) for lp in plan.legs if lp.fault)
        next_report = 30.0
        for onset, leg, spec in events:
            while True:
                now = (time.monotonic_ns() - t0) / 1e9
                if now >= next_report and now < plan.seconds:
                    say(f"  {next_report:.0f}/{plan.seconds} s")
                    next_report += 30
                if now >= onset or proc.poll() is not None:
                    break
                time.sleep(min(0.02, onset - now))
            if proc.poll() is not None:
                break
            server.set_fault(leg, spec)
            set_at[leg] = round((time.monotonic_ns() - t0) / 1e9, 3)
        while proc.poll() is None:
            now = (time.monotonic_ns() - t0) / 1e9
            if now >= next_report and now < plan.seconds:
                say(f"  {next_report:.0f}/{plan.seconds} s")
                next_report += 30
            if now > plan.seconds + TAIL_S + 120:
                proc.kill()
                raise RecordError(f"fio did not finish {plan.seconds + 120:.0f} s after "
                                  "its run time")
            time.sleep(0.2)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop.set()
        th.join(30)
    if failure:
        raise RecordError(f"reading the completion records failed: {failure[0]}")
    doc = _fio_doc(out, err, proc.returncode)
    dropped = int(server.records_dropped())
    if dropped:
        say(f"  warning: {dropped} completion records dropped (the reader fell behind)")
    agg: Aggregator = clock["agg"]
    rows = agg.rows(int(clock["ts0"]))
    measured = {"fault_set_at_s": {str(k): v for k, v in sorted(set_at.items())},
                "records_dropped": dropped, **agg.summary(), "fio": doc}
    return HostResult(plan, [], len(rows), measured), rows


def _fio_doc(out: str, err: str, code: int | None) -> dict[str, Any]:
    start = out.find("{")
    try:
        doc = json.loads(out[start:]) if start >= 0 else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not doc.get("jobs"):
        last = (err or out).strip().splitlines()[-1:] or ["(no output)"]
        raise RecordError(f"fio failed ({code}) without a report: {last[0]}")
    summary: dict[str, Any] = {}
    for j in doc["jobs"]:
        if j.get("error"):
            raise RecordError(f"fio job {j['jobname']} failed with error {j['error']}")
        summary[j["jobname"]] = {"read_iops": round(j["read"]["iops"], 1),
                                 "write_iops": round(j["write"]["iops"], 1)}
    return summary


# ---- a recording: several hosts, written as they finish ------------------------------------


@dataclass(frozen=True)
class RecordConfig:
    seed: int = 0
    mix: str = "train"
    legs: int = 4
    minutes: float = 3.0
    hosts: int = 1
    leg_mib: int = LEG_MIB
    faults: tuple[tuple[int, str], ...] = ()   # --fault LEG:SPEC (overrides the mix)

    @property
    def seconds(self) -> int:
        return round(self.minutes * 60)

    def validate(self) -> None:
        from ublk_driver import _bindings

        if self.mix not in MIXES:
            raise RecordError(f"unknown mix {self.mix!r} (known: {', '.join(MIXES)})")
        if not 2 <= self.legs <= _bindings.MAX_LEGS:
            raise RecordError(f"--legs must be 2..{_bindings.MAX_LEGS} (a mirror's legs), "
                              f"got {self.legs}")
        if not (math.isfinite(self.minutes) and 10 <= self.seconds <= 24 * 3600):
            raise RecordError(f"--minutes must give 10 s to 24 h, got {self.minutes!r}")
        if not 1 <= self.hosts <= 10_000:
            raise RecordError(f"--hosts must be 1..10000, got {self.hosts}")
        if not 8 <= self.leg_mib <= 4096:
            raise RecordError(f"--leg-mib must be 8..4096, got {self.leg_mib}")
        if self.seed < 0:
            raise RecordError(f"--seed must be >= 0, got {self.seed}")
        for leg, _ in self.faults:
            if not 0 <= leg < self.legs:
                raise RecordError(f"--fault names leg {leg}; the mirror has legs "
                                  f"0..{self.legs - 1}")

    def given(self) -> dict[int, FaultSpec] | None:
        if not self.faults:
            return None
        return {leg: FaultSpec.parse(text) for leg, text in self.faults}

    def plans(self) -> list[HostPlan]:
        mix, given = MIXES[self.mix], self.given()
        return [plan_host(self.seed, k, self.legs, self.seconds, mix, given)
                for k in range(self.hosts)]

    def identity(self) -> dict[str, Any]:
        """What must match for --resume (the host count may grow)."""
        d = asdict(self)
        d.pop("hosts")
        d["faults"] = [list(f) for f in self.faults]
        return d


def parse_fault_arg(text: str) -> tuple[int, str]:
    """``LEG:SPEC`` (``1:slow=10``) -> (1, canonical spec text)."""
    leg, sep, spec = text.partition(":")
    if not sep or not leg.strip().isdigit():
        raise RecordError(f"--fault {text!r}: give LEG:SPEC, for example 1:slow=10")
    return int(leg), str(FaultSpec.parse(spec))


def _labels_csv(hosts: list[dict[str, Any]]) -> str:
    lines = ["host,disk_id\n"]
    lines += [f"{h['host']},{disk_id(lp['leg'])}\n" for h in hosts for lp in h["legs"]
              if lp["slow"]]
    return "".join(lines)


def _injected_csv(hosts: list[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["host", "disk_id", "kind", "fault", "onset_s", "slow"])
    for h in hosts:
        for lp in h["legs"]:
            w.writerow([h["host"], disk_id(lp["leg"]), lp["kind"], lp["fault"],
                        f"{lp['onset_s']:g}", int(lp["slow"])])
    return buf.getvalue()


def _load_state(out: Path, cfg: RecordConfig, resume: bool) -> dict[str, Any]:
    path = out / "recording.json"
    if path.exists():
        if not resume:
            raise RecordError(f"{out} already holds a recording: --resume to continue it "
                              "(same --seed, --mix, --legs, --minutes), or choose another "
                              "directory")
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RecordError(f"{path}: cannot read it: {e}") from None
        if state.get("config", {}).get("identity") != cfg.identity():
            raise RecordError(f"{path} was recorded with {state.get('config', {}).get('identity')}"
                              f"; --resume needs the same settings, got {cfg.identity()}")
        return state
    if out.exists() and any(p.is_dir() for p in out.iterdir()):
        raise RecordError(f"{out} already holds directories but no recording.json: "
                          "choose an empty or new directory")
    return {"format": FORMAT, "window_s": WINDOW_S, "interval_s": INTERVAL_S,
            "units": {"ts": "s (Unix time)", "throughput": "bytes/s", "latency": "us"},
            "config": {"identity": cfg.identity()}, "mix": asdict(MIXES[cfg.mix]),
            "hosts": []}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    hosts = state["hosts"]
    _atomic_write(out / "labels.csv", _labels_csv(hosts))
    _atomic_write(out / "injected.csv", _injected_csv(hosts))
    _atomic_write(out / "recording.json", json.dumps(state, indent=1) + "\n")


def summary(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    hosts = state["hosts"]
    return {"out": str(out), "hosts": len(hosts),
            "drives": sum(len(h["legs"]) for h in hosts),
            "slow_drives": sum(lp["slow"] for h in hosts for lp in h["legs"]),
            "rows": sum(h["rows"] for h in hosts),
            "records_dropped": sum(h.get("records_dropped", 0) for h in hosts),
            "window_s": state["window_s"], "labels": str(out / "labels.csv")}


def record(out: Path, cfg: RecordConfig, resume: bool = False,
           say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Record the configured hosts into ``out`` (here: needs /dev/ublk-control and root)."""
    cfg.validate()
    if os.geteuid() != 0:
        raise RecordError("recording creates ublk devices: run it as root")
    if shutil.which("fio") is None:
        raise RecordError("fio is missing (Debian package fio; `make setup` installs it)")
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, cfg, resume)
    done = {h["host"] for h in state["hosts"]}
    todo = [p for p in cfg.plans() if p.host not in done]
    state["config"].update({"hosts": max(cfg.hosts, len(state["hosts"]))})
    if not todo:
        say(f"all {cfg.hosts} host(s) already recorded in {out}")
        _save_state(out, state)
        return summary(out, state)
    with tempfile.TemporaryDirectory(prefix="ublkml-record-") as tmp, \
            leg_storage(Path(tmp), cfg.legs * cfg.leg_mib << 20, say) as fs:
        state["environment"] = {"kernel": os.uname().release, "in_vm": _in_vm(),
                                "filesystem": fs["filesystem"]}
        for i, plan in enumerate(todo):
            faults = ", ".join(f"leg {lp.leg} {lp.kind} {lp.fault} from {lp.onset_s:g} s"
                               for lp in plan.legs if lp.fault) or "no faults"
            w = plan.workload
            say(f"host {plan.host} ({i + 1}/{len(todo)}): {cfg.legs} legs on "
                f"{fs['filesystem']}, {plan.seconds} s, {w.iops} IOPS {w.read_mix}% reads "
                f"{w.block} QD {w.depth}{' + bursts' if w.bursty else ''}; {faults}")
            res, rows = record_host(plan, Path(fs["dir"]), cfg.leg_mib << 20, say)
            res.files = write_host(out, plan.host, rows)
            state["hosts"].append(res.to_dict())
            _save_state(out, state)
            per_leg = res.measured["completions_per_leg"]
            say(f"  {res.rows} rows; completions per leg {per_leg}"
                + (f"; {res.measured['records_dropped']} records dropped"
                   if res.measured["records_dropped"] else ""))
    return summary(out, state)


def _in_vm() -> bool:
    from ublk_driver.testbed import in_vm

    return bool(in_vm())


# ---- command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT_DIR", help="where the telemetry tree goes")
    p.add_argument("--hosts", type=int, default=1, help="runs (hosts) to record (default 1)")
    p.add_argument("--legs", type=int, default=4, help="mirror legs = drives per host "
                   "(2..8, default 4)")
    p.add_argument("--minutes", type=float, default=3.0,
                   help="recorded minutes per host (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the plan (default 0)")
    p.add_argument("--mix", choices=sorted(MIXES), default="train",
                   help="fault and workload mix: train (default), heldout or none")
    p.add_argument("--fault", action="append", default=[], metavar="LEG:SPEC",
                   help="instead of the mix: this fault on LEG of every host from the start "
                   "(labelled slow), e.g. 1:slow=10; repeatable")
    p.add_argument("--leg-mib", type=int, default=LEG_MIB,
                   help=f"size of each leg in MiB (default {LEG_MIB})")
    p.add_argument("--resume", action="store_true", help="continue (or extend with more "
                   "--hosts) the recording in OUT_DIR")
    p.add_argument("--vm-timeout", type=float, metavar="S",
                   help="test bed: kill it after S seconds (default: from the plan)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)


def config_from(args: argparse.Namespace) -> RecordConfig:
    faults = tuple(parse_fault_arg(t) for t in args.fault)
    if len({leg for leg, _ in faults}) != len(faults):
        raise RecordError("--fault names a leg twice")
    return RecordConfig(seed=args.seed, mix=args.mix, legs=args.legs, minutes=args.minutes,
                        hosts=args.hosts, leg_mib=args.leg_mib, faults=faults)


def _forwarded(args: argparse.Namespace, out: Path) -> list[str]:
    argv = [str(out), "--hosts", str(args.hosts), "--legs", str(args.legs),
            "--minutes", repr(args.minutes), "--seed", str(args.seed), "--mix", args.mix,
            "--leg-mib", str(args.leg_mib)]
    for f in args.fault:
        argv += ["--fault", f]
    if args.resume:
        argv.append("--resume")
    return argv


def estimate_s(cfg: RecordConfig) -> float:
    """Wall time of a recording in the test bed (TCG): run time plus set-up per host."""
    return cfg.hosts * (cfg.seconds + WARMUP_S + TAIL_S + 15 + cfg.legs * cfg.leg_mib / 64) + 30


def main(args: argparse.Namespace) -> int:
    """``ublkml ml record``: here, or in the test bed when this kernel has no ublk."""
    quiet = args.quiet or args.json

    def say(msg: str) -> None:
        if not quiet or args.in_vm:
            print(f"record: {msg}", file=sys.stderr, flush=True)

    cfg = config_from(args)
    cfg.validate()
    out = Path(args.out).resolve()
    if needs_testbed(args.in_vm):
        result = _in_testbed(args, cfg, out, quiet, say)
    else:
        result = record(out, cfg, args.resume, say)
    if args.in_vm:
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.quiet:
        say(", ".join(f"{k} {v}" for k, v in result.items()))
    return 0


def _in_testbed(args: argparse.Namespace, cfg: RecordConfig, out: Path, quiet: bool,
                say: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "recording.json").exists() and not args.resume:
        raise RecordError(f"{out} already holds a recording: --resume to continue it, or "
                          "choose another directory")
    run_in_testbed(["ml", "record"], _forwarded(args, out), share=out, doing="recording",
                   estimate_s=estimate_s(cfg),
                   timeout=args.vm_timeout or 2 * estimate_s(cfg) + 600,
                   memory_mb=VM_MEMORY_MB, cpus=VM_CPUS, stream=None if quiet else sys.stderr,
                   keep_console=False, cwd=REPO_ROOT, say=say).check()
    state = json.loads((out / "recording.json").read_text())
    return summary(out, state)
