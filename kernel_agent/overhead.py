"""The cost of eBPF accounting: IOPS with it on vs off (4 KiB random read, QD 32).

``python -m kernel_agent.overhead [--device loop0|--size 256M] [--runtime S]
[--rounds N]`` prints one JSON document; :func:`measure_overhead` returns it.

Rounds alternate off/on (off, on, off, on, ...) so that drifts of the machine
hit both sides alike, and the medians are compared: ``ratio`` = median IOPS on
/ median IOPS off (the goal: >= 0.97).  Without ``--device`` a loop
device over a file in /dev/shm is created and removed afterwards: RAM-backed,
so the block layer (and thus the accounting) is a large share of the cost.
"On" means the real thing: programs attached, the device watched, slow-I/O
events off (their cost depends on the threshold; a threshold nobody hits is
the normal case).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernel_agent.accounting import BpfAccounting, resolve_device
from ublk_driver import scratch


def fio_iops(path: str, runtime: float, iodepth: int = 32, bs: str = "4k") -> float:
    cmd = ["fio", "--name=overhead", f"--filename={path}", "--direct=1", "--ioengine=io_uring",
           "--rw=randread", f"--bs={bs}", f"--iodepth={iodepth}", "--time_based",
           f"--runtime={runtime}", "--ramp_time=1", "--norandommap", "--randrepeat=0",
           "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip()[-500:]}")
    doc = json.loads(proc.stdout[proc.stdout.find("{"):])
    return float(sum(job["read"]["iops"] for job in doc["jobs"]))


def _prog_runtime() -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of the agent's programs (kernel.bpf_stats_enabled on)."""
    proc = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                          text=True, check=False)
    out: dict[str, tuple[int, int]] = {}
    if proc.returncode != 0:
        return out
    for prog in json.loads(proc.stdout or "[]"):
        name = str(prog.get("name", ""))
        if name.startswith(("ka_btf_", "ka_tp_")):
            ns, cnt = out.get(name, (0, 0))
            out[name] = (ns + int(prog.get("run_time_ns", 0)), cnt + int(prog.get("run_cnt", 0)))
    return out


_BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


@contextlib.contextmanager
def _ram_loop(size: int) -> Iterator[tuple[str, str]]:
    """A loop device over a ``size``-byte file in /dev/shm: (device, file), both removed after."""
    fd, img = tempfile.mkstemp(prefix="ublkml-overhead-", suffix=".img",
                               dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.ftruncate(fd, size)
        os.write(fd, b"\1" * 4096)  # not all holes
        os.close(fd)
        with scratch.loop_device(Path(img)) as dev:
            yield dev, img
    finally:
        os.unlink(img)


def measure_overhead(device: str | None = None, runtime: float = 5.0, rounds: int = 3,
                     size: int = 256 << 20, instance: str = "overhead") -> dict[str, Any]:
    """Alternate rounds without and with accounting; IOPS per round and the ratio."""
    made: tuple[str, str] | None = None
    with contextlib.ExitStack() as stack:
        if device is None:
            made = stack.enter_context(_ram_loop(size))
            device = made[0]
        bd = resolve_device(device)
        path = f"/dev/{bd.name}"
        off: list[float] = []
        on: list[float] = []
        counted = 0
        prog_ns, prog_runs = 0, 0
        for _ in range(rounds):
            off.append(fio_iops(path, runtime))
            with BpfAccounting(instance) as acc:
                acc.watch(bd)
                on.append(fio_iops(path, runtime))
                counted += acc.stats(bd).total_ios
            time.sleep(0.2)
        # Then one round with the kernel's per-program run-time statistics on:
        # the programs' own cost per I/O, unlike IOPS not disturbed by other
        # load on the machine.  Kept out of the IOPS rounds because the
        # statistics themselves cost two clock reads per program run.
        with open(_BPF_STATS) as f:
            stats_before = f.read().strip()
        try:
            with open(_BPF_STATS, "w") as f:
                f.write("1")
            with BpfAccounting(instance) as acc:
                acc.watch(bd)
                fio_iops(path, runtime)
                for ns, cnt in _prog_runtime().values():
                    prog_ns, prog_runs = prog_ns + ns, prog_runs + cnt
        finally:
            with open(_BPF_STATS, "w") as f:
                f.write(stats_before)
        med_off, med_on = statistics.median(off), statistics.median(on)
        return {
            "workload": "randread 4k, io_uring, iodepth 32, direct",
            "device": bd.name, "backing": made[1] if made else None,
            "runtime_s": runtime, "rounds": rounds,
            "iops_off": [round(x) for x in off], "iops_on": [round(x) for x in on],
            "median_iops_off": round(med_off), "median_iops_on": round(med_on),
            "ratio": round(med_on / med_off, 4) if med_off else None,
            "ios_counted_with_accounting": counted,
            # Two program runs per I/O (issue + complete), bpf_stats_enabled's
            # own clock reads included; share = of all CPUs at the "off" IOPS.
            "bpf_ns_per_io": round(2 * prog_ns / prog_runs, 1) if prog_runs else None,
            "bpf_ns_per_io_share_at_median_off": round(
                2 * prog_ns / prog_runs * med_off / 1e9 / (os.cpu_count() or 1), 4)
            if prog_runs else None,
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernel_agent.overhead",
                                description="IOPS with eBPF accounting on vs off (JSON).")
    p.add_argument("--device", help="an existing block device (default: a RAM-backed loop "
                   "device made for the run)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    p.add_argument("--size", type=int, default=256 << 20, help="loop device size in bytes")
    args = p.parse_args(argv)
    print(json.dumps(measure_overhead(args.device, args.runtime, args.rounds, args.size),
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
