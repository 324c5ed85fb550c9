"""``ublkml demo [failslow|loop]``: the project's demonstrations.

``ublkml demo`` (= ``ublkml demo failslow``) is the main one: a slow mirror
leg found by the scorer, demoted by the kernel agent and re-admitted once
healthy (:mod:`bench.failslow`).  ``ublkml demo loop`` is the older,
shorter one: a loop device served from Python, fio verify and ext4 on it
(:mod:`bench.demo_loop`).  Both run here where the kernel has ublk, else in
one boot of the qemu test bed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

from ublk_driver.core.cli import Subparsers, UsageError

__all__ = ["register"]

REPO_ROOT = Path(__file__).resolve().parent.parent
VM_CPUS, VM_MEMORY_MB = 2, 4096
#: the loop demonstration's own time, boot excluded, in the test bed (TCG)
LOOP_ESTIMATE_S = 120.0


def cmd_failslow(args: argparse.Namespace) -> int:
    from bench.failslow import FailslowConfig, FailslowError, demonstrate

    config = FailslowConfig(quick=args.quick, slow=args.slow, read_iops=args.read_iops,
                            healthy_minutes=args.healthy_minutes,
                            cpu_hogs=_hogs(args.cpu_hogs))
    try:
        config.validate()
    except FailslowError as e:
        raise UsageError(str(e)) from None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO_ROOT / "results" / f"failslow-{stamp}").resolve()
    return demonstrate(config, out, in_vm=args.in_vm, vm_timeout=args.vm_timeout,
                       report=not args.no_report, print_json=args.json)


def _hogs(spec: str) -> int:
    """``--cpu-hogs``: a count, or ``cpus`` (-1) for one per CPU where the run happens."""
    if spec == "cpus":
        return -1
    try:
        n = int(spec)
        if n < 0:
            raise ValueError(spec)
        return n
    except ValueError:
        raise UsageError(f"--cpu-hogs: expected a number or 'cpus', got {spec!r}") from None


def _loop_args(args: argparse.Namespace) -> list[str]:
    out = ["--size", args.size, "-q", str(args.queues), "-d", str(args.depth),
           "--files", str(args.files)]
    return out + [flag for flag, on in (("--json", args.json), ("--quiet", args.quiet)) if on]


def cmd_loop(args: argparse.Namespace) -> int:
    from bench.demo_loop import print_result, run_demo
    from ublk_driver.core.sizes import parse_size
    from ublk_driver.testbed.where import needs_testbed, run_in_testbed

    size = parse_size(args.size)
    if needs_testbed(args.in_vm):
        # The work directory lives in the guest: nothing comes back but the console.
        vm = run_in_testbed(["demo", "loop"], _loop_args(args), share=None,
                            doing="running", estimate_s=LOOP_ESTIMATE_S,
                            timeout=args.vm_timeout or 900.0, memory_mb=VM_MEMORY_MB,
                            cpus=VM_CPUS, stream=sys.stdout, keep_console=False,
                            cwd=REPO_ROOT)
        vm.check()
        return 0
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ublkml-demo-"))
    res = run_demo(workdir, size, args.queues, args.depth, args.files, args.quiet)
    print_result(res, args.json)
    return 0


def _failslow_options(p: argparse.ArgumentParser) -> None:
    from bench.failslow import QUICK, Plan

    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: results/failslow-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print results.json on stdout")
    p.add_argument("--quick", action="store_true",
                   help=f"short phases ({QUICK.before_s:g} s healthy, "
                        f"{QUICK.runtime_s:g} s run): a smoke test")
    p.add_argument("--healthy-minutes", type=float, default=0.0, metavar="N",
                   help="then N minutes of bursty mixed load with no fault on the same "
                        "mirror; reports that run's demotions (goal: none)")
    p.add_argument("--slow", type=float, default=Plan.slow,
                   help=f"slowdown factor (default {Plan.slow:g})")
    p.add_argument("--read-iops", type=int, default=Plan.read_iops,
                   help=f"read rate (default {Plan.read_iops})")
    p.add_argument("--cpu-hogs", default="0", metavar="N|cpus",
                   help="run N CPU-bound processes at normal priority alongside (cpus: one "
                        "per CPU of the machine the demonstration runs on; default 0)")
    p.add_argument("--vm-timeout", type=float, metavar="S",
                   help="kill the test bed after S seconds (default: from the estimate)")
    p.add_argument("--no-report", action="store_true", help="results.json only")
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_failslow)


FAILSLOW_DESCRIPTION = (
    "The fail-slow demonstration: a two-leg ublkml mirror under fio load, one leg made 10x "
    "slower mid-run; the scorer flags it, the kernel agent demotes it, and re-admits it once "
    "the fault is cleared. Reports detection time and read latency percentiles per phase "
    "(results.json, report.md, latency.png). Natively where /dev/ublk-control exists (root), "
    "else in one boot of the qemu test bed.")


def register(sub: Subparsers) -> None:
    """Add ``ublkml demo`` (the fail-slow demonstration) and ``demo failslow|loop``."""
    p = sub.add_parser("demo", help="the fail-slow demonstration (also: demo loop)",
                       description=FAILSLOW_DESCRIPTION + " `ublkml demo loop`: the loop "
                       "device demonstration.",
                       epilog="`ublkml demo` = `ublkml demo failslow`. See docs/failslow.md.")
    _failslow_options(p)
    verbs = p.add_subparsers(dest="demo_command", metavar="{failslow,loop}")
    f = verbs.add_parser("failslow", help="the fail-slow demonstration (the default)",
                         description=FAILSLOW_DESCRIPTION, epilog="See docs/failslow.md.")
    _failslow_options(f)

    lp = verbs.add_parser(
        "loop", help="a loop device served from Python: fio verify, ext4, e2fsck",
        description="A loop device over a backing file, served from this process through "
                    "the Python API: fio writes and verifies (crc32c) random-sized I/O on "
                    "the raw device, then ext4 is made and mounted on it, files are "
                    "written, checked by e2fsck and read back after a remount.")
    lp.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    lp.add_argument("--size", default="256M", help="backing file size (default 256M)")
    lp.add_argument("-q", "--queues", type=int, default=2, help="queues (default 2)")
    lp.add_argument("-d", "--depth", type=int, default=64, help="queue depth (default 64)")
    lp.add_argument("--files", type=int, default=24, help="files to write (default 24)")
    lp.add_argument("--json", action="store_true", help="print the summary as JSON")
    lp.add_argument("--quiet", action="store_true", help="no progress lines")
    lp.add_argument("--vm-timeout", type=float, metavar="S",
                    help="kill the test bed after S seconds (default 900)")
    lp.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    lp.set_defaults(func=cmd_loop)
