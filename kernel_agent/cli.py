"""``ublkml agent ...``: the kernel agent's command line.

Verbs follow modprobe/ublksrv habits: ``add CLASS key=value...``, ``remove ID``,
``list``; plus ``watch``/``unwatch``/``mode`` for devices, ``stats DEVICE``
for the kernel-side view, ``recommend`` to submit one recommendation by hand,
and ``run`` (foreground) / ``start`` (background) / ``stop`` / ``status`` for
the daemon.  Errors are one line on stderr; exit 1 for a failed operation,
2 for a usage error.  State lives in ``$UBLKML_AGENT_DIR`` (default
``/run/ublkml/agent``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kernel_agent.accounting import (
    PinnedAccounting,
    bpf_unavailable_reason,
    resolve_device,
    sysfs_stats,
)
from kernel_agent.agent import Agent, read_agent_state
from kernel_agent.errors import AgentError, BpfUnavailableError, UnknownDeviceError
from kernel_agent.link import open_submitter
from kernel_agent.recocheck import held_by, recocheck_unavailable_reason
from kernel_agent.registry import CLASSES, Registry, state_dir
from kernel_agent.ring import Recommendation, Status
from kernel_agent.validator import Mode
from ublk_driver.core.cli import Subparsers, UsageError, add_group


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {item!r}")
        out[key] = value
    return out


def cmd_add(args: argparse.Namespace) -> int:
    ext = Registry().add(args.cls, _params(args.params))
    if args.json:
        print(json.dumps(ext.to_json()))
    else:
        print(f"extension {ext.id}: {ext.cls} pid {ext.pid}, ring {ext.ring}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    ext = Registry().remove(args.id)
    print(f"removed extension {ext.id} ({ext.cls}, pid {ext.pid})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reg = Registry()
    exts = reg.extensions()
    devices = reg.devices()
    if args.json:
        print(json.dumps({"extensions": [e.to_json() for e in exts],
                          "devices": {n: vars(d) for n, d in devices.items()}}, indent=1))
        return 0
    if not exts:
        print("no extensions")
    else:
        print(f"{'ID':>4} {'CLASS':<13} {'PID':>7} {'STATE':<6} {'Q':>3} {'DEPTH':>5} "
              f"{'MEMORY':>10} {'FILES':>5}  POLICY")
        for e in exts:
            dev = f" dev {e.dev_id}" if e.dev_id is not None else ""
            print(f"{e.id:>4} {e.cls:<13} {e.pid:>7} {e.state:<6} {e.queues:>3} {e.depth:>5} "
                  f"{e.memory:>10} {e.files:>5}  {e.policy}{dev}")
    for n, d in devices.items():
        print(f"device {n}: mode {d.mode}, slow-I/O threshold {d.slow_us} us")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    name = resolve_device(args.device).name if not args.device.startswith("ublkb") \
        else args.device
    Registry().watch(name, args.mode, args.slow_us, args.owner)
    lease = f", leased to extension {args.owner}" if args.owner is not None else ""
    print(f"watching {name} (mode {args.mode}{lease})")
    return 0


def cmd_unwatch(args: argparse.Namespace) -> int:
    Registry().unwatch(args.device)
    return 0


def cmd_mode(args: argparse.Namespace) -> int:
    reg = Registry()
    cur = reg.devices().get(args.device)
    if cur is None:
        raise UnknownDeviceError(f"{args.device} is not watched (`ublkml agent watch` it)")
    reg.watch(args.device, args.mode, cur.slow_us)
    return 0


def stats_doc(device: str, root: Path | None = None) -> dict[str, Any]:
    """The kernel-side view: the running agent's pinned eBPF maps, else sysfs."""
    bd = resolve_device(device)
    state = read_agent_state(root or state_dir())
    why = ""
    if state is None:
        why = "no agent running"
    elif state.get("source") != "ebpf":
        why = f"the agent uses sysfs: {state.get('fallback_reason')}"
    else:
        try:
            pinned = PinnedAccounting(state["instance"], state.get("attach") or "unknown")
            try:
                return pinned.stats(bd).to_json()
            finally:
                pinned.close()
        except (BpfUnavailableError, UnknownDeviceError, OSError) as e:
            why = str(e)
    return sysfs_stats(bd, f"eBPF view unavailable ({why}); cumulative /sys/block "
                       "counters").to_json()


def cmd_stats(args: argparse.Namespace) -> int:
    doc = stats_doc(args.device)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{doc['device']} ({doc['dev']}): source {doc['source']}"
          + (f" ({doc['attach']})" if doc.get("attach") else ""))
    if doc.get("note"):
        print(f"  note: {doc['note']}")
    for op, v in doc["ops"].items():
        if v["ios"] or v["bytes"]:
            print(f"  {op:<8} {v['ios']:>12} I/Os {v['bytes']:>16} bytes")
    in_flight = "not counted" if doc["in_flight"] is None else doc["in_flight"]
    print(f"  in flight {in_flight}, errors {doc['errors']}, slow {doc['slow_ios']}, "
          f"mean latency {doc['mean_latency_us']} us")
    for bucket, n in (doc.get("latency_hist_us") or {}).items():
        print(f"  {bucket:>18} us {n:>10}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    reg = Registry()
    ext = reg.get(args.ext)
    # The path every extension takes: the kernel queue when the eBPF checker runs.
    ch, checker = open_submitter(reg, ext)
    print(f"submitting as extension {ext.id} through "
          + ("its eBPF queue" if checker == "ebpf" else f"its ring file ({checker})"),
          file=sys.stderr)
    try:
        sent = ch.submit(Recommendation(args.device, args.action, args.value, args.confidence,
                                        args.model, args.ttl_ms, ext.id))
        if sent is None:
            raise AgentError("the submission ring is full (is the agent running?)")
        if not args.wait:
            print(f"submitted seq {sent.seq}")
            return 0
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            for c in ch.completions():
                if c.seq == sent.seq:
                    print(json.dumps({"seq": c.seq, "status": c.status.name.lower(),
                                      "old": c.old, "new": c.new, "reason": c.reason}))
                    if c.status not in (Status.APPLIED,):
                        return 0 if c.status is not Status.REJECTED else 1
            time.sleep(0.05)
        raise AgentError(f"no final answer within {args.wait:g} s")
    finally:
        ch.close()


def cmd_run(args: argparse.Namespace) -> int:
    agent = Agent(instance=args.instance, use_bpf=not args.no_bpf, attach=args.attach,
                  window_s=args.window, check_in_kernel=not args.no_bpf_checker)
    try:
        print(f"agent {args.instance}: source {agent.source}"
              + (f" ({agent.fallback_reason})" if agent.fallback_reason else "")
              + f", state {agent.root}", file=sys.stderr)
        print(checker_line(agent.checker, agent.checker_reason), file=sys.stderr, flush=True)
        agent.run()
    finally:
        agent.close()
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    root = state_dir()
    if read_agent_state(root):
        raise AgentError(f"an agent is already running (see {root / 'agent.json'})")
    root.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "kernel_agent", "run", "--instance", args.instance,
            "--attach", args.attach, "--window", str(args.window)]
    if args.no_bpf:
        argv.append("--no-bpf")
    if args.no_bpf_checker:
        argv.append("--no-bpf-checker")
    with open(root / "agent.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = read_agent_state(root)
        if state and state.get("pid") == proc.pid:
            print(json.dumps(state) if args.json else
                  f"agent pid {proc.pid}: source {state['source']}; "
                  + checker_line(state.get("checker"), state.get("checker_reason")))
            return 0
        if proc.poll() is not None:
            raise AgentError(f"the agent exited ({proc.returncode}); see {root / 'agent.log'}")
        time.sleep(0.05)
    raise AgentError("the agent did not come up within 30 s")


def cmd_stop(args: argparse.Namespace) -> int:
    state = read_agent_state(state_dir())
    if not state:
        print("no agent running")
        return 0
    pid = int(state["pid"])
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        import select

        if not select.select([pidfd], [], [], 30)[0]:
            raise AgentError(f"the agent (pid {pid}) did not stop within 30 s")
    finally:
        os.close(pidfd)
    print(f"agent pid {pid} stopped")
    return 0


def checker_line(checker: str | None, reason: str | None) -> str:
    """Which checker judges recommendations, in one line."""
    if checker == "ebpf":
        return "recommendations checked by: eBPF (rc_check)"
    return f"recommendations checked by: Python validator: {reason or 'unknown reason'}"


def cmd_status(args: argparse.Namespace) -> int:
    state = read_agent_state(state_dir())
    if state is None:
        doc: dict[str, Any] = {"running": False, "bpf": bpf_unavailable_reason() or "usable",
                               "checker": None,
                               "checker_reason": recocheck_unavailable_reason()}
    else:
        doc = {"running": True, **state}
    doc["checked_by"] = checker_line(doc.get("checker"), doc.get("checker_reason")) \
        if state is not None else None
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    if state is None:
        why = doc["checker_reason"]
        print(f"no agent running (state dir {state_dir()}); eBPF accounting: {doc['bpf']}; "
              f"eBPF checker: {why or 'usable'}")
        return 0
    print(f"agent pid {state['pid']} (instance {state.get('instance')}): accounting "
          f"{state.get('source')}"
          + (f" ({state['fallback_reason']})" if state.get("fallback_reason") else ""))
    print(doc["checked_by"])
    queues = state.get("queues") or {}
    for ext_id in state.get("extensions", []):
        q = queues.get(str(ext_id))
        print(f"  extension {ext_id}: " + (f"eBPF queue {q}" if q else "ring file (Python)"))
    for name, d in (state.get("devices") or {}).items():
        holders = d.get("holders") or []
        lease = f", {held_by(holders)}" + (f" (owner {d['owner']})"
                                            if d.get("owner") is not None else "")
        print(f"  device {name} ({d.get('dev')}): mode {d.get('mode')}{lease}")
    return 0


def register(sub: Subparsers) -> None:
    """``ublkml agent ...`` (an entry point of ``ublkml.commands``)."""
    _, sub = add_group(sub, "agent", help="the kernel agent: eBPF accounting, extensions, "
                       "recommendations",
                       description="The kernel agent: eBPF accounting of block devices, "
                       "extension registry, validated recommendations.")

    a = sub.add_parser("add", help="register an extension instance",
                       description="Register an instance of CLASS with key=value params: "
                       "pid (required), queues, depth, memory, files; ublk-server: dev_id, "
                       "policy=remove|keep, mode; ml-extension: model.")
    a.add_argument("cls", choices=CLASSES, metavar="CLASS", help=" | ".join(CLASSES))
    a.add_argument("params", nargs="*", metavar="KEY=VALUE")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_add)

    r = sub.add_parser("remove", help="unregister an extension")
    r.add_argument("id", type=int)
    r.set_defaults(func=cmd_remove)

    ls = sub.add_parser("list", help="registered extensions and watched devices")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    modes = [m.value for m in Mode]
    w = sub.add_parser("watch", help="account a block device (loop0, /dev/loop0, 7:0)")
    w.add_argument("device")
    w.add_argument("--mode", choices=modes, default=Mode.RECOMMEND.value)
    w.add_argument("--slow-us", type=int, default=0,
                   help="log I/Os slower than this (microseconds; 0: off)")
    w.add_argument("--owner", type=int, metavar="ID",
                   help="lease the device to extension ID: with the eBPF checker, only its "
                   "recommendations for the device pass")
    w.set_defaults(func=cmd_watch)

    u = sub.add_parser("unwatch", help="stop accounting a device")
    u.add_argument("device")
    u.set_defaults(func=cmd_unwatch)

    m = sub.add_parser("mode", help="set a device's mode: observe | recommend | enforce")
    m.add_argument("device")
    m.add_argument("mode", choices=modes)
    m.set_defaults(func=cmd_mode)

    s = sub.add_parser("stats", help="the kernel-side view of a device")
    s.add_argument("device")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    rc = sub.add_parser(
        "recommend", help="submit one recommendation as a registered extension",
        description="Submit one recommendation as extension ID, on the path the extension "
        "itself takes (kernel_agent.link.open_submitter): its eBPF queue when the agent "
        "checks recommendations in the kernel (leases included), else its ring file. Each "
        "queue has one producer: not while the extension itself is submitting.")
    rc.add_argument("--ext", type=int, required=True, help="extension id")
    rc.add_argument("device")
    rc.add_argument("action")
    rc.add_argument("value")
    rc.add_argument("--confidence", type=float, default=1.0)
    rc.add_argument("--model", default="manual")
    rc.add_argument("--ttl-ms", type=int, default=10_000)
    rc.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for the agent's final answer")
    rc.set_defaults(func=cmd_recommend)

    for name, func, helptext in (("run", cmd_run, "run the agent in the foreground"),
                                 ("start", cmd_start, "start the agent in the background")):
        d = sub.add_parser(name, help=helptext)
        d.add_argument("--instance", default="default",
                       help="names the pin directory /sys/fs/bpf/ublkml/INSTANCE")
        d.add_argument("--no-bpf", action="store_true",
                       help="no eBPF at all: /sys/block sampling, Python validator")
        d.add_argument("--no-bpf-checker", action="store_true",
                       help="check recommendations with the Python validator, not rc_check")
        d.add_argument("--attach", choices=["auto", "tp_btf", "tracepoint"], default="auto")
        d.add_argument("--window", type=float, default=1.0,
                       help="effect-check window in seconds (default 1)")
        d.add_argument("--json", action="store_true")
        d.set_defaults(func=func)

    st = sub.add_parser("stop", help="stop the background agent")
    st.set_defaults(func=cmd_stop)
    ss = sub.add_parser("status", help="the running agent's state, and which checker judges "
                        "recommendations",
                        description="The running agent: accounting source, which checker "
                        "judges recommendations (eBPF rc_check, or the Python validator and "
                        "why), each extension's queue, watched devices with modes and leases.")
    ss.add_argument("--json", action="store_true", help="agent.json plus running/checked_by")
    ss.set_defaults(func=cmd_status)
