"""The fail-slow demonstration: a slow mirror leg found and routed around, end to end.

``ublkml demo`` (or ``ublkml demo failslow``), as root, natively where
``/dev/ublk-control`` exists, else in one boot of the qemu test bed
(:mod:`ublk_driver.testbed.where`):

1. the kernel agent starts (eBPF accounting, or its sysfs fall-back);
2. a two-leg mirror is created over two files on a RAM file system (ext4 on
   brd; tmpfs if brd is busy) with ``--score``, so the scorer and the leg
   policy run in its server; the agent watches it in *enforce* mode;
3. one fio process: random reads (latency logged per I/O) and, in another
   region, writes verified with crc32c as they go (``verify_backlog``); the
   healthy mirror first; then ``ublkml fault set --path 1 slow=10`` makes leg
   1 ten times slower; the policy flags it, the agent demotes it through the
   server's admin socket; later ``ublkml fault clear`` and the policy
   re-admits the leg (resync, then active) once its health probes have looked
   healthy long enough; then the healthy mirror again;
4. after the device is deleted the two legs must be byte-identical.

The healthy mirror's latency is measured in the same fio run (before the
fault and after the re-admission), and every phase is compared by the median
of its windows' percentiles (``compare``), with the difference between the
two healthy phases reported as the machine's own noise.

Results: ``results.json``, ``report.md`` and ``latency.png`` (read latency
over time, the injection, demotion, clearing and re-admission marked) in
``--out``.  ``--healthy-minutes N`` then runs a bursty mixed load with no fault
for N minutes on the same mirror, its legs re-admitted, and reports the
demotions of that run (the goal is none).

Exit status: 0 when the run completed and fio verified everything (the goals
are reported, not enforced: this is a benchmark), 1 when something failed,
2 for usage errors, 125 when the test bed failed.  The command line is
``bench.demo``; :func:`demonstrate` takes a :class:`FailslowConfig`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ublk_driver.core.errors import UblkError
from ublk_driver.core.process import cpu_seconds
from ublk_driver.scratch import ScratchUnavailableError, ram_ext4
from ublk_driver.testbed.where import needs_testbed, run_in_testbed

REPO_ROOT = Path(__file__).resolve().parent.parent
LEG_BYTES = 256 << 20
LEGS_FS_BYTES = 640 << 20    # ext4 on brd for the two legs, with room to spare
DEV_ID = 620                 # fixed, far from auto-allocated ids
AGENT_INSTANCE = "failslow"
GOAL_DETECT_S = 3.0
GOAL_P99_RATIO = 1.3
BIN_S = 0.25                 # latency-over-time bins for the plot
TICK_S = 0.1                 # the scorer's tick: the resolution of the fault's onset
READMIT_BUDGET_S = 60.0      # after clearing, wait this long at most for the re-admission
#: re-admission (active again) after the fault is cleared: the probe window
#: (3 s) must forget the slow probes, the hold (5 s) pass, the agent apply
#: the promotion and the resync finish; commands are slow on the test bed
READMIT_GOAL_S = 20.0
VM_CPUS, VM_MEMORY_MB = 2, 4096


class FailslowError(UblkError):
    """The demonstration cannot run or failed (one line: what to do)."""


def _say(msg: str) -> None:
    print(f"[failslow] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """Durations (seconds) and load.

    The healthy mirror is measured in the same fio run as the demoted one:
    before the injection and again after the re-admission.  Every phase is
    cut into windows of ``window_s``; phases are compared by their median
    window (p99 of one window, median over the windows), so one stall of a
    shared machine moves one window, not the comparison.
    """

    before_s: float = 30.0        # healthy, before the injection (baseline)
    fault_s: float = 35.0         # the fault is held this long
    after_s: float = 30.0         # healthy again, after the re-admission (baseline)
    window_s: float = 5.0         # percentiles per window; phases compare median windows
    warmup_s: float = 2.0         # left out at the start of the run
    read_iops: int = 500
    write_iops: int = 50
    read_depth: int = 8
    slow: float = 10.0
    healthy_minutes: float = 0.0  # > 0: then this long with no fault, bursty load
    cpu_hogs: int = 0             # CPU-bound processes at normal priority; -1: one per CPU

    @property
    def runtime_s(self) -> float:
        """Expected: the re-admission comes about 10 s after the clear (probe window, hold)."""
        return self.before_s + self.fault_s + 10 + self.after_s

    def estimate_s(self) -> float:
        return self.runtime_s + self.healthy_minutes * 60 + 90


QUICK = Plan(before_s=10, fault_s=14, after_s=10, window_s=2)


# ---- commands ---------------------------------------------------------------------


def _run(argv: Sequence[str], what: str, env: dict[str, str], check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise FailslowError(f"{what} failed ({proc.returncode}): {last[0]}")
    return proc


def ublkml(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "ublk_driver", *args], f"ublkml {args[0]}", env, check)


def agent(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "kernel_agent", *args], f"ublkml agent {args[0]}", env,
                check)


@contextlib.contextmanager
def leg_storage(base: Path) -> Iterator[dict[str, Any]]:
    """A RAM file system for the legs: ext4 on brd (as the benchmark's loop group), else tmpfs."""
    mnt = base / "legs"
    try:
        with ram_ext4(mnt, LEGS_FS_BYTES) as facts:
            yield {**facts, "dir": str(mnt)}
            return
    except ScratchUnavailableError as e:
        _say(f"ext4 on brd unavailable ({e}): legs on tmpfs")
    d = Path(tempfile.mkdtemp(prefix="failslow-legs", dir="/dev/shm"))
    try:
        yield {"filesystem": "tmpfs", "dir": str(d)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_legs(paths: Sequence[Path], size: int) -> None:
    """Identical legs, on disk and out of the page cache before the device starts.

    Not a copy left to writeback: dirty pages of a leg would be written back
    during the run (30 s later) and make its O_DIRECT reads wait for them
    (io_uring punts them to a worker), which doubles the read p99 of the
    run's first 40 s.
    """
    chunk = os.urandom(1 << 20)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "wb")) for p in paths]
        for _ in range(size // len(chunk)):
            for f in files:
                f.write(chunk)
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- fio ----------------------------------------------------------------------------


def fio_job(bdev: str, runtime: float, plan: Plan, lat_prefix: str, bursty: bool) -> str:
    """Reads (latency-logged) in the first half, verified writes in the second."""
    common = ("[global]\nioengine=io_uring\ndirect=1\n"
              f"filename={bdev}\ntime_based=1\nruntime={runtime:g}\nlog_unix_epoch=1\n")
    if not bursty:
        reads = ("[reads]\nrw=randread\nbs=4k\n"
                 f"iodepth={plan.read_depth}\nrate_iops={plan.read_iops}\n"
                 "offset=0\nsize=50%\n"
                 f"write_lat_log={lat_prefix}\n")
    else:
        # Bursts at full speed separated by pauses, mixed reads and writes,
        # plus larger sequential reads with their own rhythm.
        reads = ("[reads]\nrw=randrw\nrwmixread=70\nbs=4k\niodepth=32\n"
                 "offset=0\nsize=40%\nthinktime=700000\nthinktime_blocks=3000\n"
                 f"write_lat_log={lat_prefix}\n"
                 "[seqreads]\nrw=read\nbs=64k\niodepth=4\noffset=40%\nsize=10%\n"
                 "thinktime=300000\nthinktime_blocks=200\n")
    writes = ("[writes]\nrw=randwrite\nbs=4k\niodepth=4\n"
              f"rate_iops={plan.write_iops}\noffset=50%\nsize=50%\n"
              "verify=crc32c\nverify_backlog=64\nverify_fatal=1\n")
    return common + reads + writes


def read_lat_log(path: Path) -> npt.NDArray[np.float64]:
    """[n, 2]: Unix time (s) at completion and read completion latency (us)."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) >= 3 and parts[2].strip() == "0":   # ddir 0: reads
                rows.append((float(parts[0]) / 1e3, float(parts[1]) / 1e3))
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def percentiles(lat_us: npt.NDArray[np.float64]) -> dict[str, float | int | None]:
    if lat_us.size == 0:
        return {"n": 0, "p50_us": None, "p99_us": None, "p999_us": None}
    q = np.percentile(lat_us, [50, 99, 99.9])
    return {"n": int(lat_us.size), "p50_us": round(float(q[0]), 1),
            "p99_us": round(float(q[1]), 1), "p999_us": round(float(q[2]), 1)}


def window_stats(lat: npt.NDArray[np.float64], a: float, b: float,
                 window_s: float) -> list[dict[str, Any]]:
    """Percentiles of [a, b) cut into whole windows of window_s (one window if shorter)."""
    n = max(int((b - a) // window_s), 1)
    width = window_s if (b - a) >= window_s else b - a
    out = []
    for i in range(n):
        lo = a + i * width
        sel = lat[(lat[:, 0] >= lo) & (lat[:, 0] < lo + width), 1]
        out.append({**percentiles(sel), "start": round(lo, 3)})
    return out


def _median(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.median(v)), 1) if v else None


def phase_stats(lat: npt.NDArray[np.float64],
                bounds: dict[str, tuple[float | None, float | None]],
                window_s: float = 5.0) -> dict[str, Any]:
    """Per phase: percentiles of the reads that completed in [start, end), pooled and
    per window, and the median window's p50, p99 and p99.9."""
    out: dict[str, Any] = {}
    for name, (a, b) in bounds.items():
        if a is None or b is None or b <= a:
            out[name] = {**percentiles(np.empty(0)), "start": a, "end": b, "windows": [],
                         "median_p50_us": None, "median_p99_us": None,
                         "median_p999_us": None}
            continue
        sel = lat[(lat[:, 0] >= a) & (lat[:, 0] < b), 1]
        win = [w for w in window_stats(lat, a, b, window_s) if w["n"]]
        out[name] = {**percentiles(sel), "start": a, "end": b, "windows": win,
                     **{f"median_{k}": _median([w[k] for w in win])
                        for k in ("p50_us", "p99_us", "p999_us")}}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def compare(phases: dict[str, Any]) -> dict[str, Any]:
    """The demoted mirror against the healthy one, both from the same fio run.

    ``healthy``: the windows before the injection and after the
    re-admission together; ``p99_ratio``: median demoted window over median
    healthy window; ``noise_p99_ratio``: the same between the two healthy
    phases (after / before), what the machine's own variation is.
    """
    healthy = phases["before"]["windows"] + phases["after_readmission"]["windows"]
    out: dict[str, Any] = {"healthy_windows": len(healthy),
                           "demoted_windows": len(phases["after_demotion"]["windows"])}
    for q in ("p50_us", "p99_us", "p999_us"):
        h = _median([w[q] for w in healthy])
        d = phases["after_demotion"][f"median_{q}"]
        key = q.removesuffix("_us")
        out[f"healthy_{q}"], out[f"demoted_{q}"] = h, d
        out[f"{key}_ratio"] = _ratio(d, h)
        out[f"noise_{key}_ratio"] = _ratio(phases["after_readmission"][f"median_{q}"],
                                          phases["before"][f"median_{q}"])
    return out


def latency_bins(lat: npt.NDArray[np.float64], t0: float,
                 bin_s: float = BIN_S) -> dict[str, list[float]]:
    """Per-bin p50, p99 and max read latency (us) against seconds since t0, for the plot."""
    if lat.size == 0:
        return {"t": [], "p50": [], "p99": [], "max": []}
    rel = lat[:, 0] - t0
    idx = np.floor(rel / bin_s).astype(np.int64)
    out: dict[str, list[float]] = {"t": [], "p50": [], "p99": [], "max": []}
    for b in np.unique(idx):
        v = lat[idx == b, 1]
        q = np.percentile(v, [50, 99])
        out["t"].append(round(float(b * bin_s), 3))
        out["p50"].append(round(float(q[0]), 1))
        out["p99"].append(round(float(q[1]), 1))
        out["max"].append(round(float(v.max()), 1))
    return out


def fio_summary(doc: dict[str, Any]) -> dict[str, Any]:
    jobs = {}
    for j in doc.get("jobs", []):
        jobs[j["jobname"]] = {"read_ios": j["read"]["total_ios"],
                              "write_ios": j["write"]["total_ios"],
                              "read_iops": round(j["read"]["iops"], 1),
                              "write_iops": round(j["write"]["iops"], 1),
                              "error": j["error"]}
    return jobs


def _fio_doc(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise FailslowError("fio printed no JSON (see fio.log)")
    doc: dict[str, Any] = json.loads(text[start:])
    return doc


# ---- timeline -------------------------------------------------------------------------


def timeline(events: list[dict[str, Any]], leg: int, onset: float, cleared: float | None
             ) -> dict[str, float | None]:
    """Wall times of detection (demotion asked), demotion and re-admission of ``leg``."""
    def first(pred: Any, after: float | None) -> float | None:
        if after is None:
            return None
        for e in events:
            if e.get("leg") == leg and e["t"] >= after and pred(e):
                return float(e["t"])
        return None

    detected = first(lambda e: e["event"] == "request" and e["action"] == "demote_leg", onset)
    demoted = first(lambda e: (e["event"] == "answer" and e["action"] == "demote_leg"
                               and e["status"] == "applied")
                    or (e["event"] == "state" and e["new"] == "demoted"), onset)
    readmitted = first(lambda e: e["event"] == "state" and e["new"] == "active", cleared)
    return {"detected": detected, "demoted": demoted, "readmitted": readmitted}


# ---- the run --------------------------------------------------------------------------


@dataclass
class Setup:
    env: dict[str, str]
    legs: list[Path]
    bdev: str = ""
    dev_id: int = DEV_ID
    facts: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def mirror_with_agent(work: Path, plan: Plan) -> Iterator[Setup]:
    """Agent running, two-leg mirror with --score watched in enforce mode; all undone after."""
    env = dict(os.environ)
    env["UBLKML_AGENT_DIR"] = str(work / "agent")
    with leg_storage(work) as fs:
        legs = [Path(fs["dir"]) / f"leg{i}.img" for i in range(2)]
        _say(f"legs: 2 x {LEG_BYTES >> 20} MiB on {fs['filesystem']}")
        make_legs(legs, LEG_BYTES)   # the same content, as a mirror needs
        st = agent(env, "start", "--instance", AGENT_INSTANCE, "--json")
        state = json.loads(st.stdout)
        _say(f"kernel agent pid {state['pid']}: {state['source']} accounting"
             + (f" ({state['fallback_reason']})" if state.get("fallback_reason") else ""))
        s = Setup(env, legs, facts={"filesystem": fs["filesystem"],
                                    "agent_source": state["source"],
                                    "agent_fallback": state.get("fallback_reason")})
        try:
            info = json.loads(ublkml(env, "add", "-t", "mirror", "--leg", str(legs[0]),
                                     "--leg", str(legs[1]), "-n", str(DEV_ID), "-q", "1",
                                     "-d", "64", "--score", "--json").stdout)
            s.bdev = info["bdev"]
            s.facts["server_log"] = info.get("log")
            _say(f"{s.bdev}: mirror of 2 legs, scorer and leg policy in its server")
            try:
                agent(env, "watch", os.path.basename(s.bdev), "--mode", "enforce")
                yield s
            finally:
                ublkml(env, "del", "-n", str(DEV_ID), check=False)
        finally:
            agent(env, "stop", check=False)
        digests = [_sha256(p) for p in legs]
        s.facts["legs_identical"] = digests[0] == digests[1]


@contextlib.contextmanager
def cpu_hogs(n: int) -> Iterator[dict[str, Any]]:
    """``n`` busy-looping processes at nice 0 (whatever this process's nice) until exit;
    ``n`` = -1: one per CPU this process may run on.  The yielded dict gets, on exit,
    the count, the wall time and each process's CPU seconds (what shows they were busy)."""
    if n < 0:
        n = len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "import os\nos.nice(-os.nice(0))\n"
                              "while True: pass"])
            for _ in range(n)]
    facts: dict[str, Any] = {}
    if hogs:
        _say(f"{n} CPU-bound process(es) at normal priority: pids "
             f"{', '.join(str(h.pid) for h in hogs)}")
    t0 = time.monotonic()
    try:
        yield facts
    finally:
        cpu = [None if (s := cpu_seconds(h.pid)) is None else round(s, 1) for h in hogs]
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()
        if hogs:
            facts.update(cpu_hogs=n, cpu_hogs_wall_s=round(time.monotonic() - t0, 1),
                         cpu_hogs_cpu_s=cpu)


def _fio(job: Path) -> subprocess.Popen[str]:
    out = job.with_suffix(".json")
    return subprocess.Popen(["fio", "--output-format=json", f"--output={out}", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish_fio(proc: subprocess.Popen[str], out: Path, timeout: float) -> dict[str, Any]:
    """fio's JSON; an error in any job (a verify mismatch included) fails the run.

    fio stopped with SIGINT exits non-zero but still reports: its jobs' own
    error fields decide.
    """
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise FailslowError(f"fio did not finish within {timeout:.0f} s") from None
    (out.parent / f"{out.stem}-fio.log").write_text(text or "")
    try:
        doc = _fio_doc(out.read_text())
    except (OSError, ValueError):
        raise FailslowError(f"fio failed ({proc.returncode}) without a report: see "
                            f"{out.parent / (out.stem + '-fio.log')}") from None
    bad = {j["jobname"]: j["error"] for j in doc.get("jobs", []) if j["error"]}
    if bad or not doc.get("jobs"):
        raise FailslowError(f"fio reported errors {bad} (a verify mismatch is EILSEQ, 84): "
                            f"see {out.parent / (out.stem + '-fio.log')}")
    return doc


def _lat_file(prefix: Path) -> Path:
    for name in (f"{prefix}_clat.1.log", f"{prefix}_lat.1.log"):
        if Path(name).exists():
            return Path(name)
    raise FailslowError(f"fio wrote no latency log {prefix}_clat.1.log")


def _events(s: Setup) -> list[dict[str, Any]]:
    from ml.legpolicy import legs_log_file, read_events

    return read_events(legs_log_file(s.dev_id, s.env.get("UBLKML_STATE_DIR")))


def _wait(s: Setup, seen: set[str], t: float, stop: Callable[[], bool] | None = None) -> None:
    """Sleep until wall time t (or ``stop()``), reporting the leg policy's steps."""
    while True:
        for e in _events(s):
            key = json.dumps(e, sort_keys=True)
            if key not in seen:
                seen.add(key)
                if e["event"] == "request":
                    _say(f"  policy: asks to {e['action']} {e['leg']} ({e['reason']})")
                elif e["event"] == "answer":
                    _say(f"  agent: {e['action']} {e['leg']} {e['status']} ({e['reason']})")
                elif e["event"] == "state":
                    _say(f"  leg {e['leg']}: {e['old']} -> {e['new']}")
        left = t - time.time()
        if left <= 0 or (stop is not None and stop()):
            return
        time.sleep(min(0.25, left))


def run_failslow(out: Path, plan: Plan) -> dict[str, Any]:
    """The demonstration; returns the results document (also written to out/results.json)."""
    if os.geteuid() != 0:
        raise FailslowError("the demonstration creates block devices: run it as root")
    if shutil.which("fio") is None:
        raise FailslowError("fio is missing (run `make setup`)")
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"meta": {"started": datetime.datetime.now().isoformat(
        timespec="seconds"), "kernel": os.uname().release, "plan": asdict(plan),
        "in_vm": _in_vm()}}
    with tempfile.TemporaryDirectory(prefix="failslow") as tmp, \
            mirror_with_agent(Path(tmp), plan) as s:
        with cpu_hogs(plan.cpu_hogs) as hogs:
            doc["run"] = _main_run(s, plan, out)
        if plan.healthy_minutes:
            # On the same mirror, after a demotion and re-admission: a leg policy that
            # stays edgy after a fault would show here.
            doc["healthy"] = _healthy_run(s, plan, out)
        doc["events"] = _events(s)
    doc["meta"].update(s.facts)
    doc["meta"].update(hogs)
    doc["goals"] = goals(doc)
    _write_json(out / "results.json", doc)
    return doc


def _fault_seen(s: Setup, leg: int, after: float, present: bool) -> float | None:
    """When the server's scorer tick first saw ``leg``'s fault set (or cleared)."""
    for e in _events(s):
        if e["event"] == "fault" and e["leg"] == leg and e["t"] >= after \
                and (e["spec"] is not None) == present:
            return float(e["t"])
    return None


def _onset(s: Setup, asked: float, done: float, present: bool) -> float:
    """The fault's onset (or end): the tick that saw it, minus one tick, not before
    the command started; if no tick saw it, when the command returned."""
    seen = _fault_seen(s, 1, asked, present)
    return max(asked, seen - TICK_S) if seen is not None else done


def _main_run(s: Setup, plan: Plan, out: Path) -> dict[str, Any]:
    # fio runs until stopped: the phases follow events (demotion, re-admission),
    # and commands take seconds on a loaded test bed.
    budget = plan.before_s + plan.fault_s + READMIT_BUDGET_S + plan.after_s + 60
    job = out / "run.fio"
    job.write_text(fio_job(s.bdev, budget, plan, str(out / "run"), False))
    _say(f"run: fio; leg 1 {plan.slow:g}x slower after {plan.before_s:g} s, for "
         f"{plan.fault_s:g} s; then {plan.after_s:g} s after the re-admission")
    start = time.time()
    proc = _fio(job)
    seen: set[str] = set()
    try:
        _wait(s, seen, start + plan.before_s)
        t_ask = time.time()
        ublkml(s.env, "fault", "set", "-n", str(s.dev_id), "--path", "1", f"slow={plan.slow:g}")
        t_done = time.time()
        _wait(s, seen, t_done + 2 * TICK_S)
        onset = _onset(s, t_ask, t_done, True)
        _say(f"  injected slow={plan.slow:g} on leg 1 (the command took {t_done - t_ask:.2f} s;"
             f" onset {onset - t_ask:.2f} s after it started)")
        _wait(s, seen, onset + plan.fault_s)
        c_ask = time.time()
        ublkml(s.env, "fault", "clear", "-n", str(s.dev_id), "--path", "1")
        c_done = time.time()
        _wait(s, seen, c_done + 2 * TICK_S)
        cleared = _onset(s, c_ask, c_done, False)
        _say("  fault cleared on leg 1")

        def readmitted() -> bool:
            return timeline(_events(s), 1, onset, cleared)["readmitted"] is not None

        _wait(s, seen, cleared + READMIT_BUDGET_S, readmitted)
        back = timeline(_events(s), 1, onset, cleared)["readmitted"]
        _wait(s, seen, (back or time.time()) + plan.after_s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)   # fio stops its jobs and still reports
    fio_doc = _finish_fio(proc, out / "run.json", 120)
    legs = json.loads(ublkml(s.env, "leg", "-n", str(s.dev_id), "list", "--json").stdout)
    end = time.time()
    lat = read_lat_log(_lat_file(out / "run"))
    t0 = float(lat[0, 0]) if lat.size else start
    tl = timeline(_events(s), 1, onset, cleared)
    settle = 0.5  # requests queued on the slow leg before the demotion drain
    bounds: dict[str, tuple[float | None, float | None]] = {
        "before": (t0 + plan.warmup_s, onset),
        "during": (onset, tl["demoted"]),
        "after_demotion": (tl["demoted"] + settle if tl["demoted"] else None, cleared),
        "after_readmission": (tl["readmitted"] + settle if tl["readmitted"] else None, end),
    }
    rel = {k: (round(v - onset, 3) if v is not None else None) for k, v in tl.items()}
    run = {"t0": t0, "onset": onset, "fault_command_s": round(t_done - t_ask, 3),
           "cleared": cleared, **tl,
           "detect_s": rel["detected"], "demote_s": rel["demoted"],
           "readmit_after_clear_s": round(tl["readmitted"] - cleared, 3)
           if tl["readmitted"] else None,
           "phases": (phases := phase_stats(lat, bounds, plan.window_s)),
           "compare": compare(phases), "bins": latency_bins(lat, t0),
           "fio": fio_summary(fio_doc), "legs_after": legs}
    _say(f"detected {rel['detected']} s and demoted {rel['demoted']} s after the onset; "
         f"re-admitted {run['readmit_after_clear_s']} s after the clear")
    c = run["compare"]
    _say(f"read p99, median {plan.window_s:g} s window: healthy {c['healthy_p99_us']} us, "
         f"demoted {c['demoted_p99_us']} us (x{c['p99_ratio']}); healthy after / before: "
         f"x{c['noise_p99_ratio']}")
    return run


def _healthy_run(s: Setup, plan: Plan, out: Path) -> dict[str, Any]:
    runtime = plan.healthy_minutes * 60
    job = out / "healthy.fio"
    job.write_text(fio_job(s.bdev, runtime, plan, str(out / "healthy"), True))
    _say(f"healthy: {plan.healthy_minutes:g} min of bursty mixed load, no fault")
    from ml.legpolicy import summary

    start = time.time()

    def since_start() -> list[dict[str, Any]]:
        return [e for e in _events(s) if float(e.get("t", 0.0)) >= start]

    proc = _fio(job)
    seen: set[str] = {json.dumps(e, sort_keys=True) for e in _events(s)}
    try:
        t = start
        while t < start + runtime:
            t = min(t + 60, start + runtime)
            _wait(s, seen, t)
            _say(f"  {(t - start) / 60:.0f} of {plan.healthy_minutes:g} min: "
                 f"{summary(since_start())['demotions']} demotion(s)")
    except BaseException:
        proc.kill()
        raise
    fio_doc = _finish_fio(proc, out / "healthy.json", runtime + 120)
    ev = since_start()
    lat = read_lat_log(_lat_file(out / "healthy"))
    return {"minutes": plan.healthy_minutes, **summary(ev),
            "requests": sum(1 for e in ev if e["event"] == "request"),
            "margin": margin(ev, plan.healthy_minutes * 60),
            "reads": percentiles(lat[:, 1]) if lat.size else percentiles(np.empty(0)),
            "bins": latency_bins(lat, float(lat[0, 0]) if lat.size else start),
            "fio": fio_summary(fio_doc)}


def margin(events: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """How close a healthy run came to a demotion, from the legs log's ``score`` lines.

    ``max_streak``: the most consecutive flagged ticks of an active leg (a
    demotion takes ``demote_after`` = 3); ``flagged_ticks`` of ``ticks``
    scored; ``max_score``.
    """
    sc = [e for e in events if e.get("event") == "score"]
    ticks = sum(int(e["ticks"]) for e in sc)
    flagged = sum(int(e["flagged"]) for e in sc)
    return {"seconds_logged": len({round(float(e["t"])) for e in sc}), "ticks": ticks,
            "flagged_ticks": flagged,
            "flagged_share": round(flagged / ticks, 5) if ticks else None,
            "max_streak": max((int(e["streak"]) for e in sc), default=None),
            "max_score": max((float(e["max"]) for e in sc), default=None),
            "run_s": seconds}


def goals(doc: dict[str, Any]) -> dict[str, Any]:
    """The demonstration's goals, each with the measured value and whether it is met."""
    g: dict[str, Any] = {}
    if "healthy" in doc:
        h = doc["healthy"]
        g["no_demotion_healthy"] = {"value": h["demotions"], "goal": 0,
                                    "met": h["demotions"] == 0}
    if "run" in doc:
        r = doc["run"]
        d = r["demote_s"]
        g["detect_and_demote_within_3s"] = {"value": d, "goal": GOAL_DETECT_S,
                                            "met": d is not None and d <= GOAL_DETECT_S}
        ratio = r["compare"]["p99_ratio"]
        g["p99_after_demotion_vs_healthy"] = {"value": ratio, "goal": GOAL_P99_RATIO,
                                              "met": ratio is not None
                                              and ratio <= GOAL_P99_RATIO}
        g["readmitted"] = {"value": r["readmit_after_clear_s"], "goal": READMIT_GOAL_S,
                           "met": r["readmit_after_clear_s"] is not None
                           and r["readmit_after_clear_s"] <= READMIT_GOAL_S}
    g["legs_identical_after"] = {"value": doc["meta"].get("legs_identical"), "goal": True,
                                 "met": bool(doc["meta"].get("legs_identical"))}
    return g


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def _in_vm() -> bool:
    from ublk_driver.testbed import in_vm

    return bool(in_vm())


# ---- report -----------------------------------------------------------------------------


def _us(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}"


def write_report(doc: dict[str, Any], out: Path) -> Path:
    """report.md and latency.png next to results.json."""
    lines = ["# Fail-slow demonstration", ""]
    m = doc["meta"]
    lines.append(f"Kernel {m.get('kernel')}{' (qemu test bed, TCG)' if m.get('in_vm') else ''}; "
                 f"legs on {m.get('filesystem')}; agent accounting: {m.get('agent_source')}; "
                 f"started {m.get('started')}.")
    if m.get("cpu_hogs"):
        lines.append(f"Busy machine: {m['cpu_hogs']} CPU-bound process(es) at normal priority "
                     f"(CPU seconds {m['cpu_hogs_cpu_s']} in {m['cpu_hogs_wall_s']} s).")
    lines.append("")
    if "run" in doc:
        r = doc["run"]
        c = r["compare"]
        p = m["plan"]
        lines += [f"Load: 4 KiB random reads at {p['read_iops']} IOPS (QD {p['read_depth']}) "
                  f"plus 4 KiB writes at {p['write_iops']} IOPS verified with crc32c, one fio "
                  f"run; leg 1 made {p['slow']:g}x slower for {p['fault_s']:g} s.", "",
                  f"* detected (demotion asked) **{r['detect_s']} s** and demoted "
                  f"**{r['demote_s']} s** after the onset (goal: {GOAL_DETECT_S:g} s)",
                  f"* re-admitted (resynced, active) **{r['readmit_after_clear_s']} s** after "
                  "the fault was cleared",
                  f"* read p99 with the slow leg demoted: **x{c['p99_ratio']}** the healthy "
                  f"mirror's (goal: x{GOAL_P99_RATIO:g}); the two healthy phases differ by "
                  f"x{c['noise_p99_ratio']} (the machine's own noise)", "",
                  f"Per phase: reads, pooled percentiles, and the median of the "
                  f"{p['window_s']:g} s windows' percentiles (what is compared).", "",
                  "| phase | reads | windows | p50 (us) | p99 (us) | p99.9 (us) | "
                  "median window p50 | median window p99 | median window p99.9 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        names = {"before": "healthy, before the fault", "during": "fault, before demotion",
                 "after_demotion": "fault, leg demoted",
                 "after_readmission": "fault cleared, leg re-admitted (healthy)"}
        for k, title in names.items():
            ph = r["phases"][k]
            lines.append(f"| {title} | {ph['n']} | {len(ph['windows'])} | {_us(ph['p50_us'])} | "
                         f"{_us(ph['p99_us'])} | {_us(ph['p999_us'])} | "
                         f"{_us(ph['median_p50_us'])} | {_us(ph['median_p99_us'])} | "
                         f"{_us(ph['median_p999_us'])} |")
        lines += ["", f"Healthy windows together ({c['healthy_windows']}): median p50 "
                  f"{_us(c['healthy_p50_us'])} us, p99 {_us(c['healthy_p99_us'])} us; demoted "
                  f"({c['demoted_windows']}): p50 {_us(c['demoted_p50_us'])} us "
                  f"(x{c['p50_ratio']}), p99 {_us(c['demoted_p99_us'])} us (x{c['p99_ratio']}).",
                  ""]
    if "healthy" in doc:
        h = doc["healthy"]
        mg = h.get("margin", {})
        lines += [f"Healthy run: {h['minutes']:g} min of bursty mixed load, no fault: "
                  f"**{h['demotions']} demotion(s)**, {h['requests']} request(s) to the agent; "
                  f"reads p50 {_us(h['reads']['p50_us'])} us, p99 {_us(h['reads']['p99_us'])} us.",
                  "", f"Margin: {mg.get('flagged_ticks')} of {mg.get('ticks')} leg verdicts "
                  f"flagged; longest flagged streak {mg.get('max_streak')} ticks (a demotion "
                  f"takes 3); highest score {mg.get('max_score')}.", ""]
    lines += ["| goal | measured | target | met |", "| --- | --- | --- | --- |"]
    for k, v in doc["goals"].items():
        lines.append(f"| {k} | {v['value']} | {v['goal']} | {'yes' if v['met'] else 'NO'} |")
    lines += ["", "![read latency over time](latency.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    plot(doc, out / "latency.png")
    return path


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = doc.get("run") or doc.get("healthy") or {}
    bins = part.get("bins", {"t": []})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    if bins["t"]:
        ax.plot(bins["t"], bins["p99"], label="p99 per 0.25 s", color="tab:red", lw=1)
        ax.plot(bins["t"], bins["p50"], label="p50 per 0.25 s", color="tab:blue", lw=1)
    if "run" in doc:
        r = doc["run"]
        t0 = r["t0"]
        for key, label, color in (("onset", "10x slowdown injected", "black"),
                                  ("demoted", "leg demoted", "tab:green"),
                                  ("cleared", "fault cleared", "gray"),
                                  ("readmitted", "leg re-admitted", "tab:purple")):
            if r.get(key):
                ax.axvline(r[key] - t0, color=color, ls="--", lw=1, label=label)
        c = r.get("compare", {})
        for key, label, color in (("healthy_p99_us", "healthy p99 (median window)",
                                   "tab:orange"),
                                  ("demoted_p99_us", "demoted p99 (median window)",
                                   "tab:green")):
            if c.get(key):
                ax.axhline(c[key], color=color, ls=":", lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since fio started")
    ax.set_ylabel("read completion latency (us)")
    ax.set_title("Two-leg ublkml mirror: read latency over time")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- native or in the test bed ------------------------------------------------------


@dataclass(frozen=True)
class FailslowConfig:
    """What ``ublkml demo failslow`` runs: the plan's knobs that its options set."""

    quick: bool = False
    slow: float = Plan.slow
    read_iops: int = Plan.read_iops
    healthy_minutes: float = 0.0
    cpu_hogs: int = 0

    def validate(self) -> None:
        if self.healthy_minutes < 0 or self.slow < 1 or self.read_iops < 1 \
                or self.cpu_hogs < -1:
            raise FailslowError("--healthy-minutes must be >= 0, --slow >= 1, "
                                "--read-iops >= 1, --cpu-hogs >= 0")

    def plan(self) -> Plan:
        base = QUICK if self.quick else Plan()
        return Plan(**{**asdict(base), "slow": self.slow, "read_iops": self.read_iops,
                       "healthy_minutes": self.healthy_minutes, "cpu_hogs": self.cpu_hogs})

    def to_args(self) -> list[str]:
        """The ``ublkml demo failslow`` options that give this configuration back."""
        out = ["--slow", f"{self.slow:g}", "--read-iops", str(self.read_iops),
               "--healthy-minutes", f"{self.healthy_minutes:g}",
               "--cpu-hogs", "cpus" if self.cpu_hogs < 0 else str(self.cpu_hogs)]
        return out + (["--quick"] if self.quick else [])


def run_in_vm(config: FailslowConfig, out: Path, timeout: float | None = None) -> int:
    """The demonstration in one boot of the test bed; the exit status (125: test bed failed)."""
    plan = config.plan()
    vm = run_in_testbed(["demo", "failslow"], ["--out", str(out), *config.to_args()],
                        share=out, doing="running", estimate_s=plan.estimate_s() + 60,
                        timeout=timeout or max(900.0, 3 * plan.estimate_s() + 300),
                        memory_mb=VM_MEMORY_MB, cpus=VM_CPUS, stream=sys.stderr,
                        cwd=REPO_ROOT, say=_say)
    if vm.error is not None:
        _say(f"error: {vm.failure()}")
    return vm.code


def demonstrate(config: FailslowConfig, out: Path, *, in_vm: bool = False,
                vm_timeout: float | None = None, report: bool = True,
                print_json: bool = False) -> int:
    """Run the demonstration here or in the test bed, then report; the exit status.

    ``in_vm``: this is the re-run inside the test bed (measure, write results.json,
    leave the report to the host).
    """
    config.validate()
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    if needs_testbed(in_vm):
        code = run_in_vm(config, out, vm_timeout)
    else:
        try:
            run_failslow(out, config.plan())
        except subprocess.SubprocessError as e:  # a command that hung
            raise FailslowError(str(e)) from None
    results = out / "results.json"
    if in_vm:
        return code
    if not results.exists():
        _say(f"no {results}: the run failed (exit status {code})")
        return code or 1
    doc = json.loads(results.read_text())
    if report:
        _say(f"report: {write_report(doc, out)}")
    _say(f"results: {results}")
    for k, v in doc["goals"].items():
        _say(f"  {k}: {v['value']} (goal {v['goal']}): {'met' if v['met'] else 'NOT met'}")
    if print_json:
        print(json.dumps(doc, indent=1))
    return code


if __name__ == "__main__":
    from ublk_driver.core.cli import main

    sys.exit(main(["demo", "failslow", *sys.argv[1:]]))
