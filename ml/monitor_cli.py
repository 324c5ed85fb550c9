"""``ublkml monitor run|status``: the host-wide drive monitor (docs/monitor.md).

An entry point of ``ublkml.commands`` (``monitor``).  ``run`` is the monitor
process itself, in the foreground (a service manager or ``nohup`` keeps it);
``status`` reads its state file, ``$UBLKML_STATE_DIR/monitor.json``.  The
models' modules are imported by the commands, so that ``ublkml --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from ublk_driver.core.cli import PROG, CliError, Subparsers, add_group


def _seconds(what: str, low: float = 0.0) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = -1.0
        if not low < v < 1e7:
            raise argparse.ArgumentTypeError(f"{what} must be a number of seconds above "
                                             f"{low:g}, got {text!r}")
        return v
    return parse


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def tick_line(state: dict[str, Any]) -> dict[str, Any]:
    """One tick's verdicts, as ``run --json`` prints them."""
    return {"ts": state["updated"], "drives": {
        n: {"score": d["score"], "flagged": d["flagged"], "slow": d["slow"],
            "judged_by": d["judged_by"], "samples": d["samples"],
            "smart_risk": d["smart"]["risk"], "smart_critical": d["smart"]["critical"],
            "features": d.get("features")}
        for n, d in state["drives"].items()}}


def cmd_run(args: argparse.Namespace) -> int:
    from ublk_driver.core.priority import raise_thread_priority

    nice = None if args.nice is None else -args.nice
    if nice is not None:
        # Before the models load: start-up is timely on a busy host too, and every
        # thread the monitor starts inherits the priority.
        raise_thread_priority(nice)
    from ml.monitor import Monitor, MonitorConfig

    cfg = MonitorConfig(interval_s=args.interval, window_s=args.window,
                        smart_interval_s=args.smart_interval, rescan_s=args.rescan,
                        drives=tuple(args.drive), discover=not args.no_devices,
                        use_bpf=not args.no_bpf, smart=not args.no_smart,
                        agent=not args.no_agent, demote_slow=args.demote_slow,
                        baseline_s=args.baseline, flag_after=args.flag_after,
                        clear_after=args.clear_after, model=args.model,
                        failure_model=args.failure_model, nice=nice)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{PROG} monitor: %(message)s")
    mon = Monitor(cfg)
    if args.json:
        mon.on_tick = lambda m: print(json.dumps(tick_line(m.snapshot())), flush=True)
    mon.start()

    def on_signal(_sig: int, _frame: object) -> None:
        mon.request_stop()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    state = mon.snapshot()
    watched = ", ".join(f"{n} via {d['source']}" for n, d in state["drives"].items())
    print(f"{PROG} monitor: watching {len(state['drives'])} drive(s) ({watched})"
          f"; eBPF: {'yes' if state['ebpf']['available'] else state['ebpf']['note']}; "
          f"agent: {state['agent']['note']}; state: {args.state_file}", file=sys.stderr,
          flush=True)
    # No polling: the signal handlers end the wait (a lock wait is interrupted by
    # signals on POSIX), so the main thread costs no wake-ups while the monitor runs.
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not mon.wait(None if deadline is None else max(deadline - time.monotonic(), 0)):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        mon.stop()
    return 0


def _age(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    return f"{max(time.time() - ts, 0):.0f} s ago"


def cmd_status(args: argparse.Namespace) -> int:
    from ml.monitor import monitor_alive, read_state, state_file

    state = read_state()
    if state is None:
        raise CliError(f"no monitor state in {state_file()}: start one with "
                       f"`{PROG} monitor run`")
    running = monitor_alive(state)
    if args.json:
        print(json.dumps({"running": running, **state}, indent=2, sort_keys=True))
        return 0
    ebpf = state.get("ebpf") or {}
    prio = state.get("priority") or {}
    print(f"monitor pid {state.get('pid')}: {'running' if running else 'NOT RUNNING'}, "
          f"updated {_age(state.get('updated'))}; eBPF: "
          f"{'yes' if ebpf.get('available') else ebpf.get('note')}; nice {prio.get('nice')}"
          f"{' (' + prio['note'] + ')' if prio.get('note') else ''}")
    print(f"agent: {(state.get('agent') or {}).get('note')}")
    drives = state.get("drives") or {}

    def used_by(d: dict[str, Any]) -> str:
        return ",".join(f"ublkb{u['dev_id']}/{u['path']}" for u in d.get("users") or []) \
            or ("--drive" if d.get("named") else "-")

    uw = max([len("USED BY"), *(len(used_by(d)) for d in drives.values())])
    if not drives:
        print("no drives watched (no ublkml device with a drive, no --drive)")
    else:
        print(f"{'DRIVE':<10} {'DEV':<8} {'AT':<8} {'SRC':<5} {'USED BY':<{uw}} {'N':>3} "
              f"{'JUDGED':<8} {'SCORE':>5} {'STATE':<8} {'SMART':<16} BASELINE")
    for name, d in drives.items():
        users = used_by(d)
        score = "-" if d.get("score") is None else f"{d['score']:.2f}"
        sm = d.get("smart") or {}
        if sm.get("critical"):
            smart = "CRITICAL"
        elif sm.get("flagged"):
            smart = f"AT RISK {sm['risk']:.2f}"
        elif sm.get("risk") is not None:
            smart = f"ok (risk {sm['risk']:.2f})"
        else:
            smart = "n/a" if sm.get("error") else "pending"
        flag = "SLOW" if d.get("slow") else ("FAILING" if d.get("flagged") else "ok")
        base = d.get("baseline") or {}
        print(f"{name:<10} {d.get('dev', '?'):<8} {d.get('measured_at', '?'):<8} "
              f"{d.get('source', '?'):<5} {users:<{uw}} {d.get('samples', 0):>3} "
              f"{d.get('judged_by') or '-':<8} {score:>5} {flag:<8} {smart:<16} "
              f"{base.get('state', '?')} ({base.get('samples', 0)}/{base.get('needed', '?')})")
        print(f"  {d.get('reason')}")
        if sm.get("error"):
            print(f"  SMART: {sm['error']}")
    alerts = state.get("alerts") or []
    for a in alerts[-args.alerts:] if args.alerts else []:
        when = time.strftime("%H:%M:%S", time.localtime(a.get("ts", 0)))
        print(f"{when} {a.get('level', '')}: {a.get('message')}")
    return 0


def register(sub: Subparsers) -> None:
    """``ublkml monitor run|status`` (an entry point of ``ublkml.commands``)."""
    from ml.monitor import state_file

    _, sub = add_group(
        sub, "monitor", help="watch every drive of the host for fail-slow and failure",
        description="The host-wide drive monitor: every drive under every ublkml device "
        "(and those named with --drive), judged against its peers (the host's other "
        "drives) or its own healthy baseline, plus SMART; verdicts in "
        f"{state_file()}, alerts in the agent's monitor.jsonl, demote_leg "
        "recommendations through the kernel agent. See docs/monitor.md.")
    r = sub.add_parser(
        "run", help="run the monitor in the foreground (until SIGINT/SIGTERM)",
        description="Run the monitor process: discover the ublkml devices and their drives "
        "(again every --rescan seconds), sample every drive's kernel counters each "
        "--interval (eBPF block tracepoints as root, else /sys/block/X/stat), score "
        "windows of --window seconds with the fail-slow model, read SMART every "
        "--smart-interval and after I/O errors. As root it raises its own priority (nice "
        "-10) so that it stays timely on a host whose CPUs are all busy.")
    r.add_argument("--drive", action="append", default=[], metavar="/dev/X",
                   help="also watch this block device (a partition means its disk); "
                   "repeatable")
    r.add_argument("--interval", type=_seconds("--interval", 0.0), default=1.0, metavar="S",
                   help="seconds between samples (default 1)")
    r.add_argument("--window", type=_seconds("--window", 0.0), default=30.0, metavar="S",
                   help="seconds of samples a verdict is made from (default 30)")
    r.add_argument("--smart-interval", type=_seconds("--smart-interval", 0.0), default=60.0,
                   metavar="S", help="seconds between SMART reads of a drive (default 60)")
    r.add_argument("--rescan", type=_seconds("--rescan", 0.0), default=5.0, metavar="S",
                   help="seconds between looks for new or removed devices (default 5)")
    r.add_argument("--baseline", type=_seconds("--baseline", 0.0), default=60.0, metavar="S",
                   help="seconds of healthy I/O a drive without peers needs before it is "
                   "judged against its own baseline (default 60)")
    r.add_argument("--flag-after", type=_positive_int, default=3, metavar="N",
                   help="ticks in a row above the threshold that flag a drive (default 3)")
    r.add_argument("--clear-after", type=_positive_int, default=10, metavar="N",
                   help="ticks in a row below it that clear the flag (default 10)")
    r.add_argument("--model", metavar="FILE", help="fail_slow ONNX model (default: packaged)")
    r.add_argument("--failure-model", metavar="FILE",
                   help="failure ONNX model for SMART (default: packaged)")
    r.add_argument("--demote-slow", action="store_true",
                   help="also recommend demote_leg for a mirror leg whose drive is flagged "
                   "fail-slow (default: only for SMART failure)")
    r.add_argument("--no-devices", action="store_true",
                   help="watch only the --drive devices, not the ublkml devices' drives")
    r.add_argument("--no-bpf", action="store_true", help="sample /sys/block only")
    r.add_argument("--no-smart", action="store_true", help="do not run smartctl")
    r.add_argument("--no-agent", action="store_true",
                   help="do not register with the kernel agent (no recommendations)")
    r.add_argument("--nice", type=int, default=10, metavar="N",
                   help="run at nice -N as root (default 10; 0 keeps normal priority)")
    r.add_argument("--duration", type=_seconds("--duration", 0.0), default=None, metavar="S",
                   help="stop after S seconds (default: run until stopped)")
    r.add_argument("--json", action="store_true",
                   help="print each tick's verdicts as one JSON line on stdout")
    r.set_defaults(func=cmd_run, state_file=state_file())
    s = sub.add_parser("status", help="the running monitor's verdicts",
                       description=f"Print the monitor's state file ({state_file()}): "
                       "per drive its samples, score, flag, SMART and baseline, then the "
                       "latest alerts. Exit status 1 when there is no state file.")
    s.add_argument("--json", action="store_true", help="the state file as JSON, with "
                   "\"running\" added")
    s.add_argument("--alerts", type=int, default=10, metavar="N",
                   help="how many recent alerts to show (default 10)")
    s.set_defaults(func=cmd_status)
