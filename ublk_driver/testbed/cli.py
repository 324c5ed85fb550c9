"""``ublkml vm provision|run|info``: the test bed from the command line.

``run``'s exit status is the guest command's; 125 (with one line on stderr)
when the test bed itself failed, as for every command that re-runs itself in
the test bed (:mod:`ublk_driver.testbed.where`).
"""

from __future__ import annotations

import argparse
import json
import sys

from ublk_driver.core.cli import CliError, Subparsers, UsageError, add_group
from ublk_driver.testbed._vm import TestbedError, info, provision, run
from ublk_driver.testbed.where import TESTBED_FAILED

__all__ = ["register"]


def cmd_provision(args: argparse.Namespace) -> int:
    try:
        image = provision(force=args.force)
    except TestbedError as e:
        raise CliError(str(e), TESTBED_FAILED) from None
    if args.json:
        print(json.dumps(image.to_dict(), indent=2))
    else:
        print(f"{image.kernel_version} at {image.path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    state = info()
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        for key, value in state.items():
            print(f"{key}: {value}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("run: a command is needed (after --)")
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    try:
        result = run(command, cwd=args.cwd, env=env, timeout=args.timeout,
                     memory_mb=args.memory, cpus=args.cpus, stream=not args.quiet,
                     share=args.share)
    except (TestbedError, ValueError) as e:
        raise CliError(str(e), TESTBED_FAILED) from None
    print(f"ublkml vm: exit status {result.returncode}; boot {result.boot_seconds:.1f} s, "
          f"total {result.total_seconds:.1f} s", file=sys.stderr)
    return result.returncode


def register(sub: Subparsers) -> None:
    """Add ``ublkml vm`` and its sub-commands."""
    _, verbs = add_group(
        sub, "vm", help="the qemu test bed: a ublk kernel for hosts without one",
        description="The ublkml test bed: Debian's 6.12 kernel (with the ublk driver) booted "
                    "under qemu (TCG) with the host's file system shared, for hosts whose "
                    "kernel lacks ublk.")
    p = verbs.add_parser(
        "provision",
        help="download and prepare the test-bed kernel (cached; a no-op when done)",
        description="Download the newest linux-image-6.12.*+deb*-amd64-unsigned with apt, "
                    "run depmod and build the initramfs, into "
                    "${UBLKML_CACHE:-${XDG_CACHE_HOME:-~/.cache}/ublkml}/testbed/"
                    "<kernel-version>/. Does nothing if an image is already cached "
                    "(unless --force).")
    p.add_argument("--force", action="store_true",
                   help="look up the newest kernel package again and rebuild the image")
    p.add_argument("--json", action="store_true", help="print the image description as JSON")
    p.set_defaults(func=cmd_provision)

    r = verbs.add_parser(
        "run",
        help="boot the test bed and run a command in it",
        description="Boot the test bed, run CMD through /bin/sh -c in the current directory "
                    "(same path in the guest) with this virtualenv first on PATH, and power "
                    "off. The exit status is CMD's; 125 means the test bed itself failed.",
        epilog="example: %(prog)s --timeout 600 -- python -m pytest -m ublk")
    r.add_argument("--timeout", type=float, default=1800, metavar="S",
                   help="kill the guest after S seconds, boot included (default: %(default)g)")
    r.add_argument("--memory", type=int, default=4096, metavar="MB",
                   help="guest memory in MiB (default: %(default)s)")
    r.add_argument("--cpus", type=int, default=2, metavar="N",
                   help="guest vCPUs (default: %(default)s)")
    r.add_argument("--share", metavar="DIR",
                   help="host directory the guest may write to, mounted at the same path")
    r.add_argument("--cwd", metavar="DIR",
                   help="directory to run CMD in (default: the current directory)")
    r.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set an environment variable in the guest (repeatable)")
    r.add_argument("-q", "--quiet", action="store_true",
                   help="do not stream the guest console (timings still go to stderr)")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                   help="the command to run in the guest")
    r.set_defaults(func=cmd_run)

    i = verbs.add_parser("info", help="show the kernel version, cache path and state",
                         description="Show the test bed's kernel version, cache path and "
                                     "whether it is provisioned; asks no network.")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)
