"""The device commands of ``ublkml``: ``add``, ``recover``, ``list``, ``del``, ``features``.

Verbs follow ublksrv's (``add -t TYPE``, ``del -n ID | --all``, ``list``,
``features``) so that users of the C server feel at home.  Each command is an
entry point of the group ``ublkml.commands`` (see :mod:`ublk_driver.core.cli`,
which also owns the one error path); optional behaviour of ``add`` such as
scoring comes from server hooks (:mod:`ublk_driver.hooks`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ublk_driver.admin.paths import default_state_dir
from ublk_driver.blockdev import KEEP
from ublk_driver.control import Control, bdev_path, still_open_message
from ublk_driver.core.cli import PROG, CliError, Parser, Subparsers, UsageError, build_parser
from ublk_driver.core.errors import ConfigError, DeviceNotFoundError, UblkError
from ublk_driver.core.sizes import format_size, parse_size
from ublk_driver.faults import FaultSpec
from ublk_driver.hooks import ServerHook, hook_classes
from ublk_driver.server import Server, ServerConfig, read_state
from ublk_driver.targets import LoopTarget, MemTarget, MirrorTarget, NullTarget, load_plugin
from ublk_driver.targets.base import Backend
from ublk_driver.targets.plugin import check_timeout
from ublk_driver.uapi import DEV_ID_AUTO, DevState, Feature, feature_names

TARGET_TYPES = ("null", "mem", "loop", "mirror", "python")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _timeout_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds (0: no timeout), got {text!r}") from None
    try:
        return check_timeout(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kv_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _fault_arg(text: str) -> tuple[int, FaultSpec]:
    """``SPEC`` (path 0) or ``LEG:SPEC``, for ``add --fault``."""
    head, sep, rest = text.partition(":")
    path = 0
    if sep and head.strip().isdigit():
        path, text = int(head), rest
    try:
        return path, FaultSpec.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- add ------------------------------------------------------------------


@dataclass(frozen=True)
class TargetOptions:
    """What ``ublkml add`` says about the target: the typed form of its options."""

    type: str
    file: str | None = None
    legs: tuple[str, ...] = ()
    size: int | None = None
    plugin: str | None = None
    plugin_args: tuple[tuple[str, str], ...] = ()
    plugin_timeout: float | None = None
    buffered: bool = False
    read_only: bool = False
    faults: tuple[tuple[int, FaultSpec], ...] = field(default=())

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TargetOptions:
        return cls(type=args.type, file=args.file, legs=tuple(args.leg or ()), size=args.size,
                   plugin=args.plugin, plugin_args=tuple(args.plugin_arg or ()),
                   plugin_timeout=args.plugin_timeout, buffered=args.buffered,
                   read_only=args.read_only, faults=tuple(args.fault or ()))


def make_backend(opts: TargetOptions) -> Backend:
    """Build (and so validate) the target before any device exists."""
    backend = _make_target(opts)
    for path, spec in opts.faults:
        backend.set_fault(path, spec)   # kept, applied when the device starts
    return backend


def _make_target(opts: TargetOptions) -> Backend:
    t = opts.type
    if t != "mirror" and opts.legs:
        raise UsageError("--leg is for -t mirror (use -f FILE for loop)")
    if t != "python" and opts.plugin_timeout is not None:
        raise UsageError("--plugin-timeout is for -t python")
    if t == "mirror":
        if len(opts.legs) < 2:
            raise UsageError("-t mirror needs at least two legs: --leg FILE --leg FILE")
        return MirrorTarget(list(opts.legs), size=opts.size, direct=not opts.buffered)
    if t == "null":
        return NullTarget(opts.size if opts.size is not None else 250 << 30)
    if t == "mem":
        if opts.size is None:
            raise UsageError("-t mem needs --size (for example --size 1G)")
        return MemTarget(opts.size)
    if t == "loop":
        if not opts.file:
            raise UsageError("-t loop needs -f FILE (a file or block device)")
        return LoopTarget(opts.file, size=opts.size, direct=not opts.buffered,
                          read_only=opts.read_only)
    if t == "python":
        if not opts.plugin:
            raise UsageError("-t python needs --plugin MODULE:CLASS")
        plugin_args = dict(opts.plugin_args)
        if opts.size is not None and "size" not in plugin_args:
            plugin_args["size"] = str(opts.size)
        if opts.plugin_timeout is None:
            return load_plugin(opts.plugin, plugin_args)
        return load_plugin(opts.plugin, plugin_args, timeout=opts.plugin_timeout)
    raise UsageError(f"unknown target type {t!r}")


def _device_summary(server: Server) -> dict[str, Any]:
    info = server.info
    assert info is not None
    return {"dev_id": info.dev_id, "bdev": bdev_path(info.dev_id), "pid": os.getpid(),
            "queues": info.nr_hw_queues, "depth": info.queue_depth,
            "queue_processes": server.queue_processes, "scheduler": server.scheduler,
            "block_size": server.backend.block_size, **server.backend.describe()}


def _print_ready(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"{summary['bdev']}: {summary['target']} {format_size(int(summary['size']))}, "
              f"{summary['queues']} queue(s) x depth {summary['depth']}"
              f"{' (queue processes)' if summary.get('queue_processes') else ''}, "
              f"{'scheduler ' + summary['scheduler'] + ', ' if summary.get('scheduler') else ''}"
              f"server pid {summary['pid']}", flush=True)


@dataclass(frozen=True)
class ServeOptions:
    """How ``ublkml add`` serves the device: the typed form of its other options."""

    queues: int = 1
    depth: int = 128
    number: int | None = None
    max_io: int = 512 * 1024
    recovery: str = "off"
    poll_us: int | None = None
    queue_processes: bool | None = None
    scheduler: str = "none"
    foreground: bool = False
    json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        if args.type != "python" and (args.queue_processes or args.queue_threads):
            flag = "--queue-processes" if args.queue_processes else "--queue-threads"
            raise UsageError(f"{flag} is for -t python (native targets run in C: their "
                             "queue threads already run in parallel)")
        return cls(queues=args.queues, depth=args.depth, number=args.number,
                   max_io=args.max_io, recovery=args.recovery, poll_us=args.poll_us,
                   queue_processes=(True if args.queue_processes else
                                    False if args.queue_threads else None),
                   scheduler=args.scheduler, foreground=args.foreground, json=args.json)

    def server_config(self, dev_id: int) -> ServerConfig:
        config = ServerConfig(queues=self.queues, depth=self.depth, dev_id=dev_id,
                              max_io_bytes=self.max_io, recovery=self.recovery,
                              poll_us=self.poll_us, queue_processes=self.queue_processes,
                              scheduler=None if self.scheduler == KEEP else self.scheduler)
        config.validate()
        return config


@dataclass
class AddRequest:
    """Everything one ``add`` (or ``recover``) needs, checked before any device exists."""

    backend: Backend
    config: ServerConfig
    hooks: list[ServerHook]
    serve: ServeOptions


def _request(args: argparse.Namespace, dev_id: int) -> AddRequest:
    serve = ServeOptions.from_args(args)
    config = serve.server_config(dev_id)
    hooks = [h for h in (cls.from_args(args, args.type) for cls in hook_classes())
             if h is not None]
    backend = make_backend(TargetOptions.from_args(args))
    for hook in hooks:
        config = hook.configure(config, backend)
    config.validate()
    return AddRequest(backend, config, hooks, serve)


def cmd_add(args: argparse.Namespace) -> int:
    req = _request(args, DEV_ID_AUTO if args.number is None else args.number)
    # What `ublkml recover` needs to build the same target after a crash.
    extra = {"add_args": list(getattr(args, "argv", [])), "cwd": os.getcwd()}
    return _serve(req, extra, None)


def cmd_recover(args: argparse.Namespace) -> int:
    dev_id = args.number
    with Control() as ctrl:
        try:
            info = ctrl.get_info(dev_id)
        except DeviceNotFoundError:
            raise CliError(f"no ublk device with id {dev_id} (see `ublkml list`)") from None
    if not info.flags & Feature.USER_RECOVERY:
        raise CliError(f"device {dev_id} was added without --recovery: it cannot be recovered")
    state = read_state(dev_id)
    if not state or not isinstance(state.get("add_args"), list):
        record = os.path.join(default_state_dir(), f"{dev_id}.json")
        raise CliError(f"no record of how device {dev_id} was served ({record} is missing "
                       "or was not written by `ublkml add`): cannot rebuild its target")
    try:
        add_args = build_parser(["add"]).parse_args(["add", *map(str, state["add_args"])])
    except SystemExit:
        raise CliError(f"the recorded arguments of device {dev_id} no longer parse: "
                       f"{' '.join(map(str, state['add_args']))}") from None
    add_args.foreground, add_args.json = args.foreground, args.json
    # Relative paths in the recorded arguments are relative to where `add` ran.
    with contextlib.suppress(OSError):
        os.chdir(str(state.get("cwd", "/")))
    req = _request(add_args, dev_id)
    extra = {"add_args": state["add_args"], "cwd": state.get("cwd", "/"),
             "recovered": int(state.get("recovered", 0)) + 1}
    return _serve(req, extra, dev_id)


def _started(hooks: list[ServerHook], server: Server) -> None:
    for hook in hooks:
        hook.started(server)


def _stopped(hooks: list[ServerHook]) -> None:
    for hook in reversed(hooks):
        hook.stopped()


def _serve(req: AddRequest, extra: dict[str, Any], recover: int | None) -> int:
    if not req.serve.foreground:
        return _add_daemon(req, extra, recover)
    server = Server(req.backend, req.config)
    server.state_extra = extra

    def ready(s: Server) -> None:
        _started(req.hooks, s)
        _print_ready(_device_summary(s), req.serve.json)

    try:
        problems = server.serve_forever(on_ready=ready, recover=recover)
    finally:
        _stopped(req.hooks)
    for p in problems:
        print(f"{PROG}: {p}", file=sys.stderr)
    return 1 if problems else 0


def _add_daemon(req: AddRequest, extra: dict[str, Any], recover: int | None) -> int:
    """Fork a server that outlives this command; report once the device is live."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(rfd)
        code = 1
        try:
            os.setsid()
            os.makedirs(default_state_dir(), exist_ok=True)
            log_path = os.path.join(default_state_dir(), f"server-{os.getpid()}.log")
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null_fd = os.open(os.devnull, os.O_RDWR)
            os.dup2(null_fd, 0)
            os.dup2(null_fd, 1)
            os.dup2(log_fd, 2)
            os.close(null_fd)
            os.close(log_fd)

            def ready(server: Server) -> None:
                _started(req.hooks, server)
                summary = _device_summary(server)
                summary["log"] = log_path
                os.write(wfd, json.dumps({"ok": True, **summary}).encode() + b"\n")
                os.close(wfd)

            server = Server(req.backend, req.config)
            server.state_extra = extra
            try:
                problems = server.serve_forever(on_ready=ready, recover=recover)
            finally:
                _stopped(req.hooks)
            for p in problems:
                print(f"{PROG}: {p}", file=sys.stderr, flush=True)
            code = 1 if problems else 0
        except BaseException as e:  # reported to the waiting parent
            with contextlib.suppress(OSError):
                os.write(wfd, json.dumps({"ok": False, "error": str(e)}).encode() + b"\n")
            print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    os.close(wfd)
    # One JSON line, then (normally) EOF; not only EOF: queue processes forked
    # by the server (--queue-processes) inherit the pipe and keep it open.
    chunks = []
    while True:
        chunk = os.read(rfd, 65536)
        chunks.append(chunk)
        if not chunk or chunk.endswith(b"\n"):
            break
    os.close(rfd)
    text = b"".join(chunks).decode()
    if not text:
        _, status = os.waitpid(pid, 0)
        raise CliError(f"the server exited before the device was ready (status {status})")
    msg = json.loads(text)
    if not msg.pop("ok"):
        os.waitpid(pid, 0)
        raise CliError(msg["error"])
    _print_ready(msg, req.serve.json)
    return 0


# ---- list / del / features ---------------------------------------------------


def _device_record(ctrl: Control, dev_id: int) -> dict[str, Any]:
    info = ctrl.get_info(dev_id)
    rec: dict[str, Any] = {"dev_id": dev_id, "state": info.state_name,
                           "queues": info.nr_hw_queues, "depth": info.queue_depth,
                           "max_io_bytes": info.max_io_buf_bytes, "pid": info.ublksrv_pid,
                           "flags": feature_names(info.flags)}
    with contextlib.suppress(UblkError):
        params = ctrl.get_params(dev_id)
        rec["size"] = params.size_bytes
        rec["block_size"] = params.logical_block_size
    state = read_state(dev_id)
    if state:
        for k in ("target", "backing", "plugin", "direct_io"):
            if k in state:
                rec[k] = state[k]
    rec["bdev"] = bdev_path(dev_id) if info.state == DevState.LIVE else None
    return rec


def cmd_list(args: argparse.Namespace) -> int:
    with Control() as ctrl:
        records = []
        if args.number is not None:
            try:
                records.append(_device_record(ctrl, args.number))
            except DeviceNotFoundError:
                raise CliError(f"no ublk device with id {args.number} (see `ublkml list`)"
                               ) from None
        else:
            for dev_id in ctrl.list_ids():
                with contextlib.suppress(DeviceNotFoundError):
                    records.append(_device_record(ctrl, dev_id))
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no ublk devices")
        return 0
    print(f"{'ID':>4} {'STATE':<8} {'TARGET':<7} {'SIZE':>8} {'Q':>2} {'DEPTH':>5} "
          f"{'PID':>7}  BACKING")
    for r in records:
        backing = r.get("backing") or r.get("plugin") or ""
        size = format_size(r["size"]) if "size" in r else "?"
        print(f"{r['dev_id']:>4} {r['state']:<8} {r.get('target', '?'):<7} {size:>8} "
              f"{r['queues']:>2} {r['depth']:>5} {r['pid']:>7}  {backing}")
        if args.verbose:
            print(f"      flags: {' '.join(r['flags'])}")
    return 0


def _wait_pid_exit(pid: int, timeout: float) -> bool:
    if pid <= 0:
        return True
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def delete_device(ctrl: Control, dev_id: int, timeout: float = 30.0) -> None:
    """Stop and delete the device, then wait, ``timeout`` s in all at most,
    for the kernel to free the device (so that its id can be used again) and
    for its server to flush its target and exit (so that `del` means "data
    is safe")."""
    info = ctrl.get_info(dev_id)
    deadline = time.monotonic() + timeout
    if not ctrl.delete_async(dev_id):
        # An older kernel: its DEL_DEV itself waits for the device to be
        # freed, for as long as any process holds /dev/ublkbN open.
        ctrl.delete(dev_id)
    if not ctrl.wait_freed(dev_id, max(deadline - time.monotonic(), 0.0)):
        raise CliError(still_open_message(dev_id))
    if info.ublksrv_pid > 0 and info.ublksrv_pid != os.getpid() and not _wait_pid_exit(
            info.ublksrv_pid, max(deadline - time.monotonic(), 0.0)):
        raise CliError(f"device {dev_id} deleted, but its server (pid {info.ublksrv_pid}) "
                       f"has not exited after {timeout:g} s")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def cmd_del(args: argparse.Namespace) -> int:
    with Control() as ctrl:
        ids = ctrl.list_ids() if args.all else [args.number]
        deleted = []
        for dev_id in ids:
            try:
                delete_device(ctrl, dev_id, args.timeout)
            except DeviceNotFoundError:
                if not args.all:
                    raise CliError(f"no ublk device with id {dev_id} (see `ublkml list`)"
                                   ) from None
                continue
            deleted.append(dev_id)
    if args.json:
        print(json.dumps({"deleted": deleted}))
    elif args.all and not deleted:
        print("no ublk devices")
    else:
        for d in deleted:
            print(f"deleted ublk device {d}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    with Control() as ctrl:
        feats = ctrl.features
        out: dict[str, Any] = {"features": feats, "names": feature_names(feats),
               "ioctl_encode": ctrl.ioctl_encode, "kernel": os.uname().release}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"kernel {out['kernel']}: ublk features 0x{feats:x}")
        for n in out["names"]:
            print(f"  {n}")
        print("control opcodes: " + ("ioctl-encoded" if ctrl.ioctl_encode else "legacy"))
    return 0


# ---- the commands' parsers (entry points of ublkml.commands) -----------------


def register_add(sub: Subparsers) -> None:
    a: Parser = sub.add_parser(
        "add", help="create a ublk device and start its server",
        description="Create a ublk device served by this process. By default the server goes "
        "to the background once /dev/ublkbN is live and this command prints the device; "
        "`ublkml del -n ID` removes it.")
    a.add_argument("-t", "--type", required=True,
                   choices=TARGET_TYPES,
                   help="target: null (discards everything), mem (RAM disk), loop (a file "
                   "or block device, O_DIRECT), mirror (RAID1 over --leg files or devices), "
                   "python (a plug-in class)")
    a.add_argument("-f", "--file", help="backing file or block device (loop)")
    a.add_argument("--leg", action="append", metavar="FILE",
                   help="mirror: a leg, file or block device (repeat: 2 to 8 legs)")
    a.add_argument("--fault", action="append", type=_fault_arg, metavar="[LEG:]SPEC",
                   help="inject a fault from the start, e.g. delay=2ms,slow=10,"
                   "burst=1s/200ms,errors=0.01,ops=read+write,seed=1 (on path 0, or on "
                   "mirror leg LEG); repeatable")
    a.add_argument("--size", type=_size_arg,
                   help="device size, e.g. 64M, 1G (mem: required; loop, mirror: defaults "
                   "to the (smallest) file's size; null: 250G)")
    a.add_argument("-q", "--queues", type=int, default=1, help="number of queues (default 1)")
    a.add_argument("-d", "--depth", type=int, default=128,
                   help="queue depth (default 128, at most 4096)")
    a.add_argument("-n", "--number", type=int, help="device id (default: the kernel picks)")
    a.add_argument("--max-io", type=_size_arg, default=512 * 1024,
                   help="largest I/O in bytes (default 512K)")
    a.add_argument("--plugin", help="python: MODULE:CLASS or FILE.py:CLASS")
    a.add_argument("--plugin-arg", action="append", type=_kv_arg, metavar="KEY=VALUE",
                   help="python: keyword argument for the plug-in class (repeatable)")
    a.add_argument("--plugin-timeout", type=_timeout_arg, metavar="SECONDS",
                   help="python: a plug-in call that has not returned after SECONDS fails "
                   "its I/O with ETIMEDOUT and is logged; the device goes on serving "
                   "(default 30; 0: no timeout, calls run on the queue thread)")
    model = a.add_mutually_exclusive_group()
    model.add_argument("--queue-processes", action="store_true",
                       help="python: serve each queue from its own process, so that the "
                       "plug-in's code runs on several CPUs at once instead of taking turns "
                       "on one GIL; the plug-in class must say fork_safe = True (its state "
                       "in shared memory or files); not with --score. Default: processes "
                       "for a fork_safe plug-in with several queues and no --score, "
                       "threads otherwise")
    model.add_argument("--queue-threads", action="store_true",
                       help="python: serve every queue from a thread of the server process "
                       "even where processes would be the default")
    a.add_argument("--buffered", action="store_true",
                   help="loop, mirror: use the page cache instead of O_DIRECT")
    a.add_argument("--read-only", action="store_true", help="loop: open the file read-only")
    a.add_argument("--recovery", choices=["off", "reissue", "fail"], default="off",
                   help="if the server dies: off (default: the device goes away), reissue "
                   "(the device waits for `ublkml recover`; I/O the dead server had taken "
                   "is sent to the new one, nothing fails) or fail (it waits; that I/O "
                   "fails with EIO)")
    a.add_argument("--poll-us", type=int, metavar="US",
                   help="hybrid polling: a queue thread keeps asking for completions for up "
                   "to US microseconds (0..10000) before it sleeps; saves a wake-up per batch "
                   "on a busy device, costs a busy CPU while it spins (default: "
                   "$UBLKML_POLL_US or 0, off)")
    a.add_argument("--scheduler", default="none", metavar="NAME",
                   help="the block device's I/O scheduler (default none: requests go "
                   "straight to the queues, as with the kernel's loop and null_blk; a "
                   "single-queue device would otherwise get mq-deadline, ~0.7x the IOPS); "
                   "mq-deadline, kyber, bfq where the kernel has them, or keep (the "
                   "kernel's choice)")
    a.add_argument("--foreground", action="store_true",
                   help="serve from this process until SIGINT/SIGTERM")
    a.add_argument("--json", action="store_true", help="print the device as JSON")
    for hook in hook_classes():
        hook.add_arguments(a)
    a.set_defaults(func=cmd_add)


def register_recover(sub: Subparsers) -> None:
    r: Parser = sub.add_parser(
        "recover", help="re-attach a server to a device whose server died",
        description="Start a new server for device ID, added with --recovery reissue|fail, "
        "after its server died (crash, SIGKILL). The target is rebuilt from the arguments "
        "`ublkml add` recorded in the state file; a mirror's leg states and dirty regions "
        "come from its journal. I/O waits meanwhile and flows again once this returns.")
    r.add_argument("-n", "--number", type=int, required=True, help="device id")
    r.add_argument("--foreground", action="store_true",
                   help="serve from this process until SIGINT/SIGTERM")
    r.add_argument("--json", action="store_true", help="print the device as JSON")
    r.set_defaults(func=cmd_recover)


def register_list(sub: Subparsers) -> None:
    ls: Parser = sub.add_parser("list", help="list ublk devices",
                                description="List the ublk devices the kernel knows, with "
                                "their state, target and server.")
    ls.add_argument("-n", "--number", type=int, help="only device ID")
    ls.add_argument("-v", "--verbose", action="store_true", help="show feature flags too")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)


def register_del(sub: Subparsers) -> None:
    d: Parser = sub.add_parser("del", help="delete ublk devices",
                               description="Stop and delete a device; its server flushes the "
                               "target and exits, and the kernel frees the device (once no "
                               "process holds /dev/ublkbN open), before this returns.  Fails, "
                               "naming the processes that still hold it open, if that takes "
                               "longer than --timeout.")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("-n", "--number", type=int, help="device id")
    g.add_argument("-a", "--all", action="store_true", help="every ublk device")
    d.add_argument("--timeout", type=_positive_seconds, default=30.0, metavar="S",
                   help="give up after S seconds per device (default: %(default)g)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_del)


def register_features(sub: Subparsers) -> None:
    f: Parser = sub.add_parser("features", help="what the running kernel's ublk driver supports")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_features)
