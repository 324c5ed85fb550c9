"""``ublkml status | fault | leg``: commands that talk to a running server.

They go through the device's admin socket (:mod:`ublk_driver.admin`), so
they need the server to be running and the caller to be root or the user who
started it.  Each command is an entry point of ``ublkml.commands``
(:mod:`ublk_driver.core.cli`, whose one error path prints every error as one
line: exit 2 for a usage error, 1 for a failed operation).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ublk_driver.admin import AdminClient, AdminError
from ublk_driver.core.cli import Parser, Subparsers, UsageError, add_group
from ublk_driver.core.errors import UblkError
from ublk_driver.core.sizes import format_size
from ublk_driver.drive_verdicts import read_verdicts

LEG_VERBS = {"demote": "demoted", "fail": "failed", "promote": "active"}


def _int_arg(what: str, limit: int) -> Callable[[str], int]:
    """An argparse type: an integer in 0..limit-1, or a one-line error naming ``what``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}"
                                             ) from None
        if not 0 <= n < limit:
            raise argparse.ArgumentTypeError(
                f"{what} must be 0..{limit - 1}, got {n}" if limit < 1 << 31 else
                f"{what} must be 0 or more, got {n}")
        return n
    return parse


_dev_id = _int_arg("device id", 1 << 20)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < 1e6:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--number", type=_dev_id, required=True, metavar="ID",
                   help="device id (see `ublkml list`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                   help="seconds to wait for the server's answer (default 10)")


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.number, timeout=args.timeout)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# ---- status -------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    st = _client(args).call("status")
    verdicts = read_verdicts()
    if verdicts is not None:   # what the host monitor says of this device's drives
        current = verdicts.writer_alive()
        for path in st.get("paths") or []:
            for d in path.get("drives") or []:
                v = verdicts.drives.get(d.get("name"))
                if v is not None:
                    d["verdict"] = {"state": v.state, "score": v.score, "reason": v.reason,
                                    "by": verdicts.by, "updated": verdicts.updated,
                                    "current": current}
    if args.json:
        _print_json(st)
        return 0
    target = st.get("target") or {}
    size = target.get("size")
    size_text = f" {format_size(int(size))}" if isinstance(size, int) else ""
    print(f"ublk device {st['dev_id']} ({st['bdev']}): {target.get('target', '?')}{size_text}, "
          f"{st.get('queues')} queue(s) x depth {st.get('depth')}, server pid {st.get('pid')}")
    for q in (st.get("stats") or {}).get("queues", []):
        line = (f"  queue {q['q_id']}: {sum(q['ops'])} I/Os, {q['errors']} errors, "
                f"{q['batches']} batches")
        if q.get("pid"):
            line += f", process {q['pid']}"
        last = q.get("last_error")
        if last:
            line += f" (last error: {last['errno']} on {last['op']} at {last['offset']})"
        plugin = q.get("plugin")
        if plugin:
            line += (f"; plug-in calls: {plugin['timeouts']} timed out, {plugin['stuck']} "
                     f"stuck now, {plugin['late']} returned late")
        print(line)
    for path in st.get("paths") or []:
        print("  " + _path_line(path))
    if st.get("legs"):
        _print_legs(st["legs"])
    for path, spec in sorted((st.get("faults") or {}).items()):
        print(f"  fault on path {path}: {json.dumps(spec, sort_keys=True)}")
    for job in st.get("jobs", []):
        print(f"  job {job['id']}: promote leg {job['leg']}: {job['state']}"
              + (f" ({job['error']})" if job.get("error") else ""))
    return 0


def _path_line(path: dict[str, Any]) -> str:
    """``path 0 leg0  /data/leg0.img -> sda (8:0)``, or ``-> no drive (why)``; a
    drive's verdict follows it when a monitor published one:
    ``sda (8:0) [monitor: SLOW 0.97]`` (``, stale`` once the monitor has stopped)."""
    drives = ", ".join(f"{d['name']} ({d['dev']}){_verdict_text(d.get('verdict'))}"
                       for d in path.get("drives") or [])
    where = drives or f"no drive ({path.get('no_drive') or 'unknown'})"
    return (f"path {path.get('index')} {path.get('name')}  {path.get('backing') or '-'} "
            f"-> {where}")


def _verdict_text(v: dict[str, Any] | None) -> str:
    if not v:
        return ""
    score = "" if v.get("score") is None else f" {v['score']:.2f}"
    return f" [{v.get('by')}: {v.get('state')}{score}{'' if v.get('current') else ', stale'}]"


def register_status(sub: Subparsers) -> None:
    p: Parser = sub.add_parser(
        "status", help="ask a running server about its device (admin socket)",
        description="Ask a running server for its device: target, queues, I/O counts, its "
        "completion paths (path 0, or one per mirror leg) with their backing files and the "
        "drives under them, mirror legs, injected faults and promotion jobs (through its "
        "admin socket, $UBLKML_STATE_DIR/ID.sock; root or the server's owner only).")
    _common(p)
    p.set_defaults(func=_status)


# ---- fault -------------------------------------------------------------------------------


def _fault_set(args: argparse.Namespace) -> int:
    try:
        from ublk_driver.faults import FaultSpec
    except ImportError as e:
        raise UblkError(f"fault injection is not available in this installation ({e})"
                        ) from None

    try:
        spec = FaultSpec.parse(args.spec)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"bad fault spec {args.spec!r}: {e}") from None
    out = _client(args).call("fault_set", path=args.path, spec=spec.to_dict())
    if args.json:
        _print_json(out)
    else:
        print(f"device {args.number} path {out['path']}: fault set "
              f"{json.dumps(out['spec'], sort_keys=True)}")
    return 0


def _fault_clear(args: argparse.Namespace) -> int:
    out = _client(args).call("fault_clear", path=args.path)
    if args.json:
        _print_json(out)
    else:
        paths = ", ".join(str(p) for p in out["cleared"]) or "none"
        print(f"device {args.number}: faults cleared on path(s) {paths}")
    return 0


def register_fault(sub: Subparsers) -> None:
    _, verbs = add_group(
        sub, "fault", help="inject or clear faults on a running device",
        description="Inject faults into a running device, or remove them. A path is a "
        "completion path: 0 for a single target, the leg number for a mirror. Changes take "
        "effect at once and last until cleared or the server stops.")
    # A verb is required (argparse says so, exit 2) rather than add_group's help page.
    verbs.required, verbs.metavar = True, "VERB"
    s: Parser = verbs.add_parser(
        "set", help="set (replace) the fault schedule of a path",
        description="Set the fault schedule of one path, replacing any previous one. SPEC is "
        "the fault syntax of `ublkml add --fault` (see docs/targets.md), e.g. delay, slowdown, "
        "bursts, errors.")
    _common(s)
    s.add_argument("--path", type=_int_arg("path", 1 << 31), default=0,
                   help="completion path: a mirror leg (default 0)")
    s.add_argument("spec", metavar="SPEC", help="the fault schedule")
    s.set_defaults(func=_fault_set)
    c: Parser = verbs.add_parser("clear", help="remove injected faults",
                                 description="Remove the faults of one path, or of every path.")
    _common(c)
    c.add_argument("--path", type=_int_arg("path", 1 << 31), default=None,
                   help="only this path (default: every path)")
    c.set_defaults(func=_fault_clear)


# ---- leg ------------------------------------------------------------------------------------


def _print_legs(legs: list[dict[str, Any]]) -> None:
    print(f"  {'LEG':>3} {'STATE':<8} {'DIRTY':>7} {'READS':>10} {'WRITES':>10} "
          f"{'ERRORS':>7} {'PROBES':>7}")
    for leg in legs:
        print(f"  {leg.get('leg', '?'):>3} {leg.get('state', '?'):<8} "
              f"{leg.get('dirty_regions', '?'):>7} {leg.get('reads', '?'):>10} "
              f"{leg.get('writes', '?'):>10} {leg.get('errors', '?'):>7} "
              f"{leg.get('probes', '?'):>7}")


def _leg(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.verb == "list":
        if args.leg is not None:
            raise UsageError("`leg list` takes no LEG")
        out = client.call("leg_info")
        if args.json:
            _print_json(out)
        elif not out["legs"]:
            print(f"device {args.number} has no legs (not a mirror)")
        else:
            _print_legs(out["legs"])
        return 0
    if args.leg is None:
        raise UsageError(f"`leg {args.verb}` needs LEG (see `ublkml leg -n ID list`)")
    state = LEG_VERBS[args.verb]
    out = client.call("leg_set", leg=args.leg, state=state)
    if state == "active" and not args.no_wait:
        job = client.wait_job(out["job"]["id"], timeout=args.wait)
        out["job"] = job
        if job["state"] == "failed":
            if args.json:
                _print_json(out)
            raise AdminError(f"promoting leg {args.leg} failed: {job['error']}")
        out["state"] = "active"
    if args.json:
        _print_json(out)
    elif state == "active" and args.no_wait:
        print(f"device {args.number} leg {args.leg}: promotion started (job "
              f"{out['job']['id']}); `ublkml leg -n {args.number} list` shows it")
    else:
        prev = f" (was {out['previous']})" if out.get("previous") else ""
        print(f"device {args.number} leg {args.leg}: {out['state']}{prev}")
    return 0


def register_leg(sub: Subparsers) -> None:
    p: Parser = sub.add_parser(
        "leg", help="list, demote, fail or promote the legs of a running mirror",
        description="List or change the legs of a running mirror device. demote: the leg "
        "serves no reads but is still written; fail: the leg is neither read nor written; "
        "promote: the leg is resynchronised, then serves reads again (waits for the resync "
        "unless --no-wait).")
    _common(p)
    p.add_argument("verb", choices=["list", "demote", "fail", "promote"],
                   help="what to do")
    p.add_argument("leg", nargs="?", type=_int_arg("leg", 1 << 31), metavar="LEG",
                   help="leg number (demote, fail, promote)")
    p.add_argument("--no-wait", action="store_true",
                   help="promote: return once the resync started")
    p.add_argument("--wait", type=_seconds, default=None, metavar="S",
                   help="promote: give up waiting after S seconds (default: wait until done)")
    p.set_defaults(func=_leg)
