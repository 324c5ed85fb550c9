"""The cost of eBPF accounting: IOPS with it on vs off (4 KiB random read, QD 32).

``python -m kernel_agent.overhead [--device loop0|--size 256M] [--runtime S]
[--rounds N]`` prints one JSON document; :func:`measure_overhead` returns it.

Three arms: off, on (the agent's full accounting: issue, requeue and
completion programs) and completion_only (the completion program alone, what
the drive monitor attaches).  Each round runs all three, in reverse order every
other round, so that drifts of the machine hit every arm alike, and the medians
are compared: ``ratio`` = median IOPS on / median IOPS off (the agent's goal:
>= 0.97), ``ratio_completion_only`` likewise (the monitor's goal: >= 0.95).

Without ``--device`` a loop device over a file in /dev/shm is created and
removed afterwards: RAM-backed, so the block layer (and thus the accounting)
is a large share of the cost.
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

from kernel_agent.accounting import BlockDevice, BpfAccounting, resolve_device
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


def _bpf_ns_per_io(instance: str, bd: BlockDevice, path: str, runtime: float,
                   in_flight: bool) -> float | None:
    """The programs' own time per I/O, from the kernel's per-program statistics.

    Kept out of the IOPS rounds because the statistics themselves cost two
    clock reads per program run (included in the figure)."""
    with open(_BPF_STATS) as f:
        stats_before = f.read().strip()
    try:
        with open(_BPF_STATS, "w") as f:
            f.write("1")
        with BpfAccounting(instance, in_flight=in_flight) as acc:
            acc.watch(bd)
            fio_iops(path, runtime)
            runs = _prog_runtime()
    finally:
        with open(_BPF_STATS, "w") as f:
            f.write(stats_before)
    completions = runs.get("ka_btf_complete", runs.get("ka_tp_complete", (0, 0)))[1]
    return round(sum(ns for ns, _ in runs.values()) / completions, 1) if completions else None


ARMS = ("off", "on", "completion_only")


def measure_overhead(device: str | None = None, runtime: float = 5.0, rounds: int = 3,
                     size: int = 256 << 20, instance: str = "overhead") -> dict[str, Any]:
    """Rounds without accounting, with the agent's full accounting (issue,
    requeue and completion programs) and with the completion program alone
    (what the drive monitor attaches); IOPS per round and the ratios.

    Each round runs the three arms, in reverse order every other round, so
    that a drift of the machine hits every arm alike."""
    made: tuple[str, str] | None = None
    with contextlib.ExitStack() as stack:
        if device is None:
            made = stack.enter_context(_ram_loop(size))
            device = made[0]
        bd = resolve_device(device)
        path = f"/dev/{bd.name}"
        iops: dict[str, list[float]] = {arm: [] for arm in ARMS}
        counted = {"on": 0, "completion_only": 0}
        for r in range(rounds):
            for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
                if arm == "off":
                    iops[arm].append(fio_iops(path, runtime))
                    continue
                with BpfAccounting(instance, in_flight=arm == "on") as acc:
                    acc.watch(bd)
                    iops[arm].append(fio_iops(path, runtime))
                    counted[arm] += acc.stats(bd).total_ios
                time.sleep(0.2)
        ns_full = _bpf_ns_per_io(instance, bd, path, runtime, in_flight=True)
        ns_lean = _bpf_ns_per_io(instance, bd, path, runtime, in_flight=False)
        med = {arm: statistics.median(v) for arm, v in iops.items()}

        def ratio(arm: str) -> float | None:
            return round(med[arm] / med["off"], 4) if med["off"] else None

        def share(ns: float | None) -> float | None:
            # Of all CPUs, at the "off" IOPS.
            return round(ns * med["off"] / 1e9 / (os.cpu_count() or 1), 4) if ns else None

        return {
            "workload": "randread 4k, io_uring, iodepth 32, direct",
            "device": bd.name, "backing": made[1] if made else None,
            "runtime_s": runtime, "rounds": rounds,
            "iops_off": [round(x) for x in iops["off"]],
            "iops_on": [round(x) for x in iops["on"]],
            "iops_completion_only": [round(x) for x in iops["completion_only"]],
            "median_iops_off": round(med["off"]), "median_iops_on": round(med["on"]),
            "median_iops_completion_only": round(med["completion_only"]),
            "ratio": ratio("on"),
            "ratio_completion_only": ratio("completion_only"),
            "ios_counted_with_accounting": counted["on"],
            "ios_counted_completion_only": counted["completion_only"],
            "bpf_ns_per_io": ns_full, "bpf_ns_per_io_completion_only": ns_lean,
            "bpf_ns_per_io_share_at_median_off": share(ns_full),
            "bpf_ns_per_io_share_completion_only": share(ns_lean),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernel_agent.overhead",
                                description="IOPS with eBPF accounting on vs off (JSON).")
    p.add_argument("--device", help="an existing block device (default: a RAM-backed loop "
                   "device made for the run)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three arms")
    p.add_argument("--size", type=int, default=256 << 20, help="loop device size in bytes")
    args = p.parse_args(argv)
    print(json.dumps(measure_overhead(args.device, args.runtime, args.rounds, args.size),
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
