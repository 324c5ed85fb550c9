"""What the plug-in timeout costs: the python target with and without the relay.

``--plugin-timeout 0`` serves plug-in calls on the queue's own thread (no
timeout); any other value (the default, 30 s) serves them through the relay
(worker threads, see ``ublk_driver/csrc/ublkml.c``).  Both serve the same
store as the benchmark's python group (``bench.ramstore:RamStoreTarget``),
alternately, ``--rounds`` times each, with fio 4 KiB random reads at depth 32
and depth 1.  Needs root and ublk (run it in the test bed)::

    ublkml vm run --share /tmp/pt -- ublkml bench plugin-timeout --json-out /tmp/pt/pt.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

DEV_ID = 77
RUNTIME_S = 15
JOBS = {"4k-randread-qd32": ["--rw=randread", "--bs=4k", "--iodepth=32"],
        "4k-randread-qd1": ["--rw=randread", "--bs=4k", "--iodepth=1"]}


def _ublkml(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "ublk_driver", *args], capture_output=True,
                         text=True, check=True, timeout=120, env=env)
    return out.stdout


def _fio(job: list[str], runtime: int) -> dict[str, float]:
    cmd = ["fio", "--name=pt", f"--filename=/dev/ublkb{DEV_ID}", "--ioengine=io_uring",
           "--direct=1", "--time_based", f"--runtime={runtime}", "--ramp_time=2",
           "--output-format=json", *job]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=runtime + 60)
    read = json.loads(out.stdout[out.stdout.find("{"):])["jobs"][0]["read"]
    return {"iops": float(read["iops"]), "clat_p50_us": read["clat_ns"]["percentile"]["50.000000"]
            / 1000, "clat_p99_us": read["clat_ns"]["percentile"]["99.000000"] / 1000}


def measure(rounds: int, runtime: int, modes: tuple[str, ...]) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        mode: {job: [] for job in JOBS} for mode in modes}
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            timeout = "0" if mode == "inline" else "30"
            env = dict(os.environ)
            if mode == "relay-unpinned":
                env["UBLKML_RELAY_PIN"] = "0"
            _ublkml("add", "-n", str(DEV_ID), "-t", "python", "--plugin",
                    "bench.ramstore:RamStoreTarget", "--plugin-arg", "size=256M",
                    "--plugin-timeout", timeout, env=env)
            try:
                for job, args in JOBS.items():
                    res = _fio(args, runtime)
                    runs[mode][job].append(res)
                    print(f"round {r} {mode:14} {job}: {res['iops']:.0f} IOPS "
                          f"p50 {res['clat_p50_us']:.0f} us", flush=True)
            finally:
                _ublkml("del", "-n", str(DEV_ID))
    summary: dict[str, Any] = {}
    for job in JOBS:
        out: dict[str, Any] = {}
        for m in modes:
            out[m] = {"iops_median": statistics.median(x["iops"] for x in runs[m][job]),
                      "iops": [round(x["iops"]) for x in runs[m][job]],
                      "p50_us": [round(x["clat_p50_us"]) for x in runs[m][job]],
                      "p99_us": [round(x["clat_p99_us"]) for x in runs[m][job]]}
        for m in modes[1:]:
            out[f"{m}_over_inline"] = out[m]["iops_median"] / out["inline"]["iops_median"]
        summary[job] = out
    return {"rounds": rounds, "runtime_s": runtime, "jobs": summary}


if __name__ == "__main__":
    from ublk_driver.core.cli import main

    sys.exit(main(["bench", "plugin-timeout", *sys.argv[1:]]))
