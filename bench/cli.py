"""``ublkml bench``: the benchmark (:mod:`bench.runner`) from the command line.

``ublkml bench [OPTIONS]`` measures (here where the kernel has ublk, else in
one boot of the test bed) and writes results.json, report.md and plots;
``ublkml bench report RESULTS_JSON`` re-renders a report from saved results;
``ublkml bench plugin-timeout`` measures what the plug-in timeout costs;
``ublkml bench engine-ab`` compares the C engines of two checkouts;
``ublkml bench monitor-overhead`` measures the drive monitor's cost natively.

The arguments become a :class:`bench.runner.BenchConfig` here, at the edge;
the runner never sees argparse.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

from bench import engine_ab, monitor_overhead, runner
from bench.runner import (
    FULL_RAMP,
    FULL_RUNTIME,
    GOAL_ROUNDS_FULL,
    GOAL_ROUNDS_QUICK,
    GROUPS,
    OVERHEAD_ROUNDS_FULL,
    OVERHEAD_ROUNDS_QUICK,
    QUICK_RAMP,
    QUICK_RUNTIME,
    BenchConfig,
)
from ublk_driver.core.cli import CliError, Subparsers, UsageError, int_in
from ublk_driver.testbed.where import needs_testbed

__all__ = ["config_from", "register"]


_rounds = int_in("rounds", 1, 100)


def _poll_us(text: str) -> int:
    from ublk_driver.core.errors import ConfigError
    from ublk_driver.queue import MAX_POLL_US, check_poll_us

    try:
        return check_poll_us(int(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"poll time must be 0..{MAX_POLL_US} us, "
                                         f"got {text!r}") from None


def config_from(args: argparse.Namespace) -> BenchConfig:
    """The run's configuration from ``ublkml bench``'s arguments."""
    if args.runtime is not None and args.runtime <= 0:
        raise UsageError("--runtime must be positive")
    if args.ramp is not None and args.ramp < 0:
        raise UsageError("--ramp must not be negative")
    return BenchConfig(quick=args.quick, skip=tuple(args.skip or ()), runtime=args.runtime,
                       ramp=args.ramp, profile=args.profile, rounds=args.rounds,
                       goal_rounds=args.goal_rounds, poll_us=args.poll_us)


def cmd_bench(args: argparse.Namespace) -> int:
    """Exit status: 0 every measurement succeeded; 1 some failed (recorded in the
    results); 2 usage error or no fio; 125 the test bed failed; 130 interrupted."""
    config = config_from(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out or Path("results") / f"bench-{stamp}").resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        runner.check_tool("fio")
    except runner.MissingToolError as e:
        raise CliError(str(e), 2) from None
    if needs_testbed(args.in_vm):
        doc, code = runner.run_in_vm(config, outdir, args.vm_timeout)
    else:
        if os.geteuid() != 0:
            raise CliError("the benchmark creates block devices and loads modules: "
                           "run it as root", 2)
        doc, code = runner.measure(config, outdir)
    if doc is None:
        return code
    if not args.in_vm and not args.no_report:
        from bench.report import write_report

        runner.say(f"report: {write_report(doc, outdir)}")
    if not args.in_vm:
        runner.say(f"results: {outdir / 'results.json'}")
    if args.json:
        print(json.dumps(doc, indent=2))
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    src = Path(args.results)
    try:
        doc = json.loads(src.read_text())
    except ValueError as e:
        raise CliError(f"{src}: not a results.json: {e}") from None
    print(write_report(doc, src.parent, plots=not args.no_plots,
                       out=Path(args.report_out) if args.report_out else None))
    return 0


def cmd_plugin_timeout(args: argparse.Namespace) -> int:
    from bench.plugin_timeout import measure

    modes = ("inline", "relay", "relay-unpinned") if args.unpinned else ("inline", "relay")
    text = json.dumps(measure(args.rounds, args.runtime, modes), indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


def register(sub: Subparsers) -> None:
    """Add ``ublkml bench`` (and its ``report`` and ``plugin-timeout`` sub-commands)."""
    p = sub.add_parser(
        "bench", help="benchmark ublkml devices against kernel and nbdkit peers (fio)",
        description="Benchmark ublkml devices against their kernel (and nbdkit) "
                    "counterparts with identical fio jobs; write results.json, report.md "
                    "and plots. Runs natively where /dev/ublk-control exists (as root), "
                    "else in the qemu test bed, in one boot.",
        epilog="`ublkml bench report RESULTS_JSON` re-renders a report without measuring. "
               "See docs/benchmarks.md.")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4k randread QD32 on every device, plus 2 queues for "
                        f"the null group and {OVERHEAD_ROUNDS_QUICK} rounds of the overhead "
                        f"group; {QUICK_RUNTIME:g} s per job (about 4 min with boot)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: results/bench-<timestamp>)")
    p.add_argument("--json", action="store_true",
                   help="print results.json on stdout at the end")
    p.add_argument("--skip", action="append", choices=GROUPS, metavar="GROUP",
                   help=f"leave a group out (repeatable): {', '.join(GROUPS)}")
    p.add_argument("--profile", action="store_true",
                   help="record the CPU time of each server process and thread (ublkml "
                        "daemons, nbdkit) during each measurement, from /proc, and sample "
                        "where it goes with py-spy (Python and native frames; extra "
                        "'bench'); the sampler pauses the server, so take ratios from a "
                        "run without --profile")
    p.add_argument("--poll-us", type=_poll_us, metavar="US",
                   help="hybrid polling for every ublkml device (ublkml add --poll-us); "
                        "default: none (the daemons' default, off)")
    p.add_argument("--runtime", type=float, metavar="S",
                   help=f"seconds measured per job (default {FULL_RUNTIME:g}, "
                        f"--quick {QUICK_RUNTIME:g})")
    p.add_argument("--ramp", type=float, metavar="S",
                   help=f"seconds of warm-up per job, not counted (default {FULL_RAMP:g}, "
                        f"--quick {QUICK_RAMP:g})")
    p.add_argument("--rounds", type=_rounds, metavar="N",
                   help=f"rounds of the overhead group (default {OVERHEAD_ROUNDS_FULL}, "
                        f"--quick {OVERHEAD_ROUNDS_QUICK}); more rounds, steadier medians")
    p.add_argument("--goal-rounds", type=_rounds, metavar="N",
                   help="rounds of the cases the goals are computed from (4k randread "
                        "QD32 on 1 and 2 queues, QD1 on 1 queue; baseline and ublkml "
                        "alternately), whose medians the goals compare (default "
                        f"{GOAL_ROUNDS_FULL}, --quick {GOAL_ROUNDS_QUICK})")
    p.add_argument("--vm-timeout", type=float, metavar="S",
                   help="kill the test bed after S seconds (default: from the estimate)")
    p.add_argument("--no-report", action="store_true",
                   help="write results.json only (no report.md, no plots)")
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    verbs = p.add_subparsers(dest="bench_command", metavar="COMMAND")
    r = verbs.add_parser("report", help="re-render report.md (and plots) from results.json",
                         description="Render report.md (and plots) from a results.json "
                                     "written by `ublkml bench`, without measuring.")
    r.add_argument("results", metavar="RESULTS_JSON", help="a results.json")
    r.add_argument("--out", dest="report_out", metavar="FILE",
                   help="Markdown file to write (default: report.md beside RESULTS_JSON)")
    r.add_argument("--no-plots", action="store_true", help="do not draw the PNG charts")
    r.set_defaults(func=cmd_report)

    t = verbs.add_parser(
        "plugin-timeout", help="what the plug-in timeout costs (needs root and ublk)",
        description="The python target with --plugin-timeout 0 (plug-in calls on the "
                    "queue's own thread) against the default (through the relay), "
                    "alternately, with fio 4 KiB random reads at depth 32 and 1. Needs root "
                    "and ublk: `ublkml vm run --share DIR -- ublkml bench plugin-timeout "
                    "--json-out DIR/pt.json` elsewhere.")
    t.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    t.add_argument("--runtime", type=int, default=15, metavar="S",
                   help="seconds per fio job (default 15)")
    t.add_argument("--json-out", metavar="FILE", help="also write the results here (JSON)")
    t.add_argument("--unpinned", action="store_true",
                   help="also measure the relay without pinning (UBLKML_RELAY_PIN=0)")
    t.set_defaults(func=cmd_plugin_timeout)

    engine_ab.register(verbs)
    monitor_overhead.register(verbs)
