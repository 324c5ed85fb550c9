"""The ``ublkml`` command line: one parser tree, one error path.

Every top-level command (``add``, ``agent``, ``ml``, ``bench``, ...) is an entry
point in the group ``ublkml.commands``: its name is the command's name, its
value a :data:`Register` function that adds that one command (and its
sub-commands) to the tree.  The driver, the kernel agent, the models and the
benchmarks register theirs the same way a user's package can, so the driver
never imports the layers above it.

``ublkml NAME ...`` loads only the entry point ``NAME``, so that ``ublkml add``
does not pay for onnxruntime or libbpf; ``--help``, shell completion
(argcomplete) and an unknown command load them all.  The driver's own commands
(:data:`DRIVER_COMMANDS`, the same names and values as its entry points: a test
holds them equal) do not even look the entry points up: importlib.metadata
costs 1-2 s to import in the TCG test bed, where tests run ``ublkml add`` and
``del`` hundreds of times.

Errors: a command raises :class:`CliError` (or any :class:`UblkError`, or an
``OSError``); :func:`run` prints it as one line on stderr and returns the exit
status: 2 for a usage error, 1 for a failed operation, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ublk_driver.core.errors import UblkError

PROG = "ublkml"
COMMANDS_GROUP = "ublkml.commands"

#: What a command's ``func`` default is: it gets the parsed arguments.
Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error to print as one line, with the exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CliError):
    """Arguments that make no sense together: exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


def int_in(what: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``low..high`` (no upper bound when None)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        if n is None or n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"{what} must be {bounds}, got {text!r}")
        return n
    return parse


def seconds_in(what: str, low: float, high: float, *, low_open: bool = False
               ) -> Callable[[str], float]:
    """An argparse ``type``: seconds in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        above = x > low if low_open else x >= low
        if not (above and x <= high):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{what} must be in {bounds} s, got {text!r}")
        return x
    return parse


def one_line(text: object) -> str:
    """``text`` with control characters escaped: an argv word may hold a newline,
    and an error that echoes it must still be one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage block is `--help`'s job)."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


if TYPE_CHECKING:  # argparse gives this type no public name and no run-time subscript
    Subparsers: TypeAlias = argparse._SubParsersAction[Parser]
else:
    Subparsers = argparse._SubParsersAction

#: What a ``ublkml.commands`` entry point names: it adds one command to ``sub``.
Register = Callable[[Subparsers], None]


def add_group(sub: Subparsers, name: str, *, help: str, description: str | None = None,
              epilog: str | None = None) -> tuple[Parser, Subparsers]:
    """A command with sub-commands (``ublkml agent add|list|...``): its parser and the
    sub-parsers to add them to.  Without a sub-command it prints its help, exit 2."""
    p: Parser = sub.add_parser(name, help=help, description=description or help, epilog=epilog)
    inner = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
    return p, inner


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ublkml")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``, which reads the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show the version and exit"
                 ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


#: The order of ``ublkml --help``: a device's life first, then the parts above it;
#: commands of other packages follow in name order.
HELP_ORDER = ("add", "del", "list", "recover", "features", "status", "fault", "leg", "demo",
              "bench", "agent", "model", "ml", "monitor", "vm")

#: The driver's own ``ublkml.commands`` entry points (name -> "module:function").
DRIVER_COMMANDS = {
    "add": "ublk_driver.cli:register_add",
    "recover": "ublk_driver.cli:register_recover",
    "list": "ublk_driver.cli:register_list",
    "del": "ublk_driver.cli:register_del",
    "features": "ublk_driver.cli:register_features",
    "status": "ublk_driver.admin.cli:register_status",
    "fault": "ublk_driver.admin.cli:register_fault",
    "leg": "ublk_driver.admin.cli:register_leg",
    "vm": "ublk_driver.testbed.cli:register",
}


class Command(Protocol):
    """What the parser tree needs of a command: an entry point, or a driver command."""

    def load(self) -> Any: ...


@dataclass(frozen=True)
class DriverCommand:
    """A driver command by its entry point's value, loaded without importlib.metadata."""

    value: str

    def load(self) -> Any:
        module, _, attr = self.value.partition(":")
        return getattr(importlib.import_module(module), attr)


def _entry_points() -> dict[str, Command]:
    from importlib import metadata

    eps = {ep.name: ep for ep in metadata.entry_points(group=COMMANDS_GROUP)}
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    return {n: eps[n] for n in sorted(eps, key=lambda n: (rank.get(n, len(rank)), n))}


def _commands(names: Iterable[str] | None) -> dict[str, Command]:
    """The commands to build a tree of: the driver's own without a look at the entry
    points when ``names`` are all driver commands, else every registered one."""
    wanted = None if names is None else list(names)
    if wanted and all(n in DRIVER_COMMANDS for n in wanted):
        return {n: DriverCommand(DRIVER_COMMANDS[n]) for n in wanted}
    return _entry_points()


def build_parser(names: Iterable[str] | None = None, *,
                 commands: Mapping[str, Command] | None = None) -> Parser:
    """The parser tree with the commands ``names`` (default: every registered one).
    A command whose package cannot be imported is left out of the tree with a note
    in the epilog: the others still work."""
    names = None if names is None else list(names)
    parser = Parser(
        prog=PROG,
        description="Linux block devices served from Python through the kernel's ublk "
        "driver, watched by an eBPF agent and ONNX drive-health models.",
        epilog="Run `ublkml COMMAND --help` for a command's options. Devices need root and "
        "the ublk_drv module; without it, `ublkml vm run -- CMD` runs CMD in the project's "
        "qemu test bed.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    eps = _commands(names) if commands is None else commands
    broken = []
    for name in eps if names is None else [n for n in names if n in eps]:
        try:
            eps[name].load()(sub)
        except ImportError as e:
            broken.append(f"{name} ({e})")
    if broken:
        parser.epilog = (parser.epilog or "") + " Not available in this installation: " + \
            ", ".join(broken) + "."
    return parser


def run(func: Handler, args: argparse.Namespace) -> int:
    """The one error path: call a command, turn its failure into one line and a status."""
    try:
        return int(func(args))
    except CliError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return e.code
    except UblkError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        hint = " (this needs root)" if e.errno in (errno.EPERM, errno.EACCES) else ""
        print(f"{PROG}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``ublkml ARGV...``: parse, dispatch, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else None
    completing = "_ARGCOMPLETE" in os.environ   # set by the shell's completion hook
    commands = _commands([first] if first is not None and not completing else None)
    names = [first] if first in commands and not completing else None
    parser = build_parser(names, commands=commands)
    if completing:
        try:
            import argcomplete
        except ImportError:  # completion is optional: the command works without it
            pass
        else:
            argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (2) or --help/--version (0): a status, not an exit
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv[1:]  # `add` records its arguments for `recover`
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return run(func, args)

