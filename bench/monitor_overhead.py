"""``ublkml bench monitor-overhead``: what the drive monitor costs a block device, natively.

The benchmark suite's ``ublkml-null-monitor`` case measures the monitor on a
ublkml device, which on a host without ublk means in the qemu test bed (TCG),
where a Python process's share of a vCPU is inflated several times over the
kernel's and one round's noise exceeds the goal's margin.  The monitor itself
does not depend on the device: it is the same eBPF programs on the block
tracepoints and the same process ticking once a second whatever the driver.
So this command measures it on any block device of *this* host, natively: by
default a kernel loop device (direct I/O) over a file in RAM (``/dev/shm``),
or ``--device /dev/X`` (its data is only read).

Rounds alternate off / on in ABBA order (off on on off, on off off on, ...):
a drift of the machine's speed weighs on both sides alike.  "On" is the real
``ublkml monitor run --drive DEV`` (:func:`bench.runner.monitor_running`: its
own process, eBPF, nice -10 as root, one tick a second; a monitor that does not
watch the drive through eBPF is an error, not a figure), started before and
stopped after its measurement.  The job is the benchmark's 4k randread QD32
(:mod:`bench.jobs`).  The result is the ratio of the median IOPS of the "on"
measurements over the "off" ones, the goal's arithmetic (>= 0.95), with every
round, the median of the rounds' own ratios, the monitor's CPU share, and the
host's load average and other qemu processes (noise) recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.jobs import fio_job_text, parse_fio_json, workload_by_name
from bench.runner import (
    BenchError,
    _count_qemu,
    _tmpfs_dir,
    create_backing_file,
    monitor_running,
    run_fio,
    say,
)
from ublk_driver.core.cli import CliError, Subparsers, int_in, seconds_in
from ublk_driver.scratch import loop_device

GOAL = 0.95
WORKLOAD = "4k-randread-qd32"
DEFAULT_ROUNDS, DEFAULT_RUNTIME, DEFAULT_RAMP = 8, 8.0, 1.0
LOOP_MIB = 256


def abba(rounds: int) -> list[list[str]]:
    """The sides of each round: off-on, on-off, on-off, off-on, then again."""
    pattern = (["off", "on"], ["on", "off"], ["on", "off"], ["off", "on"])
    return [list(pattern[r % 4]) for r in range(rounds)]


def summarize(measurements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each side, their ratio (the goal's), and each round's own ratio."""
    sides: dict[str, list[float]] = {"off": [], "on": []}
    by_round: dict[int, dict[str, float]] = {}
    for m in measurements:
        sides[m["side"]].append(m["iops"])
        by_round.setdefault(m["round"], {})[m["side"]] = m["iops"]
    if not sides["off"] or not sides["on"]:
        raise BenchError("no complete measurement on one side: nothing to compare")
    med_off, med_on = statistics.median(sides["off"]), statistics.median(sides["on"])
    per_round = [r["on"] / r["off"] for _, r in sorted(by_round.items())
                 if "on" in r and "off" in r and r["off"] > 0]
    ratio = med_on / med_off if med_off > 0 else 0.0
    cpu = [m["monitor"]["cpu_share"] for m in measurements
           if m["side"] == "on" and isinstance(m.get("monitor", {}).get("cpu_share"), float)]
    return {
        "iops_off_median": med_off, "iops_on_median": med_on, "ratio": ratio,
        "round_ratios": per_round,
        "round_ratio_median": statistics.median(per_round) if per_round else None,
        "monitor_cpu_share_median": statistics.median(cpu) if cpu else None,
        "goal": GOAL, "passed": ratio >= GOAL,
    }


@contextlib.contextmanager
def ram_loop_device(mib: int = LOOP_MIB) -> Iterator[str]:
    """A kernel loop device with direct I/O over a file in RAM, detached afterwards."""
    with tempfile.TemporaryDirectory(prefix="ublkml-monitor-overhead-",
                                     dir=_tmpfs_dir()) as tmp:
        back = Path(tmp) / "disk.img"
        create_backing_file(back, mib << 20)
        with loop_device(back, direct_io=True) as dev:
            yield dev


def measure(dev: str, outdir: Path, runtime: float, ramp: float) -> dict[str, Any]:
    workload = workload_by_name(WORKLOAD)
    job = outdir / "job.fio"
    job.write_text(fio_job_text(dev, workload, queues=1, runtime=runtime, ramp=ramp,
                                cpus=sorted(os.sched_getaffinity(0))))
    text = run_fio(job, outdir / "fio.json", timeout=runtime + ramp + 120)
    r = parse_fio_json(text, workload.direction).to_dict()
    return {"iops": r["iops"], "p99_us": r["lat_us"].get("p99"), "fio": r}


def run(dev: str, rounds: int, runtime: float, ramp: float, outdir: Path) -> dict[str, Any]:
    measurements: list[dict[str, Any]] = []
    plan = abba(rounds)
    for rnd, sides in enumerate(plan):
        for side in sides:
            say(f"round {rnd + 1}/{rounds}: monitor {side}")
            noise = {"loadavg_1m": os.getloadavg()[0], "other_qemu": _count_qemu()}
            if side == "off":
                m = measure(dev, outdir, runtime, ramp)
            else:
                with monitor_running(dev, log_path=outdir / "logs" / f"monitor-r{rnd + 1}.log"
                                     ) as info:
                    m = measure(dev, outdir, runtime, ramp)
                m["monitor"] = info
            m.update(round=rnd, side=side, noise=noise)
            del m["fio"]
            measurements.append(m)
            say(f"  {m['iops']:,.0f} IOPS")
    return {"measurements": measurements, "summary": summarize(measurements)}


def table(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    rr = " ".join(f"{x:.2f}" for x in s["round_ratios"])
    cpu = s["monitor_cpu_share_median"]
    return "\n".join([
        f"device {doc['device']} ({doc['kind']}), {doc['rounds']} rounds, {WORKLOAD}",
        f"monitor off: {s['iops_off_median']:,.0f} IOPS (median)",
        f"monitor on:  {s['iops_on_median']:,.0f} IOPS (median)",
        f"on/off: {s['ratio']:.3f} (goal >= {GOAL}: {'PASS' if s['passed'] else 'FAIL'}); "
        f"rounds: {rr}",
        f"monitor CPU: {cpu * 100:.2f} % of a CPU (median)" if cpu is not None else
        "monitor CPU: not measured",
    ])


def cmd_monitor_overhead(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CliError("the monitor's eBPF needs root: run it with sudo")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out or f"results/monitor-overhead-{stamp}")
    (outdir / "logs").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.device:
            if not Path(args.device).is_block_device():
                raise CliError(f"{args.device} is not a block device")
            dev, kind = args.device, "given"
        else:
            dev, kind = stack.enter_context(ram_loop_device()), \
                f"kernel loop, direct I/O, {LOOP_MIB} MiB file in RAM"
        try:
            doc = run(dev, args.rounds, args.runtime, args.ramp, outdir)
        except BenchError as e:
            raise CliError(str(e)) from None
    doc.update(device=dev, kind=kind, rounds=args.rounds, runtime_s=args.runtime,
               ramp_s=args.ramp, kernel=os.uname().release, date=stamp)
    (outdir / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print(table(doc))
        print(f"results: {outdir / 'results.json'}", file=sys.stderr)
    return 0 if doc["summary"]["passed"] else 1


_positive_int = int_in("rounds", 1, 100)
_seconds = seconds_in("seconds", 0, 3600, low_open=True)


def register(verbs: Subparsers) -> None:
    """Add ``monitor-overhead`` to ``ublkml bench``'s sub-commands."""
    p = verbs.add_parser(
        "monitor-overhead", help="the drive monitor's cost in IOPS, natively on this host",
        description="Measure 4k randread QD32 IOPS on a block device of this host with the "
                    "drive monitor off and on (the real `ublkml monitor run --drive DEV`: "
                    "eBPF block tracepoints, one tick a second, nice -10), in alternating "
                    "(ABBA) rounds, natively: by default a kernel loop device (direct I/O) "
                    "over a file in RAM. Prints on/off of the medians against the goal "
                    "(>= 0.95) and writes results.json. Exit status 1 when the goal is "
                    "missed. Needs root and fio.",
        epilog="The suite's ublkml-null-monitor case measures the same on a ublkml device, "
               "in the test bed where the kernel lacks ublk. See docs/benchmarks.md.")
    p.add_argument("--device", metavar="/dev/X",
                   help="measure this block device (read only) instead of a RAM loop device")
    p.add_argument("--rounds", type=_positive_int, default=DEFAULT_ROUNDS, metavar="N",
                   help=f"rounds of one off and one on measurement (default {DEFAULT_ROUNDS})")
    p.add_argument("--runtime", type=_seconds, default=DEFAULT_RUNTIME, metavar="S",
                   help=f"seconds measured per measurement (default {DEFAULT_RUNTIME:g})")
    p.add_argument("--ramp", type=_seconds, default=DEFAULT_RAMP, metavar="S",
                   help=f"seconds of warm-up, not counted (default {DEFAULT_RAMP:g})")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: results/monitor-overhead-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.set_defaults(func=cmd_monitor_overhead)
