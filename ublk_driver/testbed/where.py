"""Where a command that needs ublk runs: here, or re-run in one boot of the test bed.

A ``ublkml`` command that needs real ublk devices (``bench``, ``demo``,
``ml record``) asks :func:`needs_testbed` first:

* ``False``: run here: this kernel has ``/dev/ublk-control``, or the command
  is already the re-run inside the test bed (its ``--in-vm`` option);
* ``True``: no ublk here: re-run the same command in the test bed with
  :func:`run_in_testbed`, which boots it once, runs
  ``python -m ublk_driver COMMAND --in-vm ARGS...`` in it with the command's
  output directory as the guest's writable share, and hands back a
  :class:`TestbedRun`;
* raises :class:`~ublk_driver.core.errors.DriverUnavailableError` inside the
  test bed when the driver is missing there (no test bed in a test bed).

Results, one convention for every command: :attr:`TestbedRun.code` is the
guest command's exit status, or :data:`TESTBED_FAILED` (125, as ``ublkml vm
run``) when the test bed itself failed or timed out, with the reason in
:attr:`TestbedRun.error`; the console is saved to a file whenever the run
failed (and always if asked); :meth:`TestbedRun.check` turns a failure into
a :class:`TestbedRunError` for commands that have nothing to salvage.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ublk_driver.core.cli import CliError
from ublk_driver.core.errors import DriverUnavailableError
from ublk_driver.testbed._vm import TestbedError, in_vm, native_ublk_available, run

__all__ = [
    "TESTBED_FAILED",
    "TestbedRun",
    "TestbedRunError",
    "needs_testbed",
    "run_in_testbed",
]

#: Exit status of a command whose test bed failed (not the command itself).
TESTBED_FAILED = 125
MISSING_IN_GUEST = ("inside the test bed but /dev/ublk-control is missing "
                    "(modprobe ublk_drv)")


class TestbedRunError(CliError):
    """A command re-run in the test bed failed; ``code`` is :attr:`TestbedRun.code`."""

    __test__ = False  # not a pytest test class, despite the name


def needs_testbed(in_vm_flag: bool = False) -> bool:
    """Whether a command that needs ublk must be re-run in the test bed.

    ``in_vm_flag``: the command's ``--in-vm`` option, set by :func:`run_in_testbed`
    on the re-run (the command then runs here, and a missing driver is its error).
    """
    if in_vm_flag or native_ublk_available():
        return False
    if in_vm():
        raise DriverUnavailableError(errno.ENODEV, MISSING_IN_GUEST)
    return True


@dataclass(frozen=True)
class TestbedRun:
    """What a command re-run in the test bed gave back."""

    __test__ = False

    code: int
    """The guest command's exit status; :data:`TESTBED_FAILED` if the test bed failed."""
    error: str | None
    """Why the test bed itself failed (one line), or None when the command ran."""
    output: str
    """The guest console (the command's stdout and stderr), as far as it came."""
    console_log: Path | None
    """Where the console was saved (None: not saved)."""
    boot_seconds: float | None = None
    total_seconds: float | None = None
    kernel_log: str = ""
    """The guest's dmesg (empty when the test bed failed)."""

    def failure(self) -> str | None:
        """One line saying why the run failed, or None if the command exited 0."""
        if self.error is not None:
            return f"the test bed failed: {self.error}"
        if self.code == 0:
            return None
        last = [ln.strip() for ln in self.output.splitlines() if "error" in ln.lower()][-1:]
        where = f"; console in {self.console_log}" if self.console_log else ""
        return (f"the command failed in the test bed (exit status {self.code})"
                + (f": {last[0]}" if last else "") + where)

    def check(self) -> TestbedRun:
        """``self`` if the command exited 0, else raise :class:`TestbedRunError`."""
        message = self.failure()
        if message is not None:
            raise TestbedRunError(message, self.code)
        return self


def run_in_testbed(command: Sequence[str], args: Sequence[str] = (), *, share: Path | None,
                   doing: str, estimate_s: float, timeout: float, memory_mb: int = 4096,
                   cpus: int = 2, stream: TextIO | None = None,
                   console_log: Path | None = None, keep_console: bool = True,
                   cwd: Path | None = None,
                   say: Callable[[str], None] | None = None) -> TestbedRun:
    """Re-run ``ublkml COMMAND --in-vm ARGS...`` in one boot of the test bed.

    ``command``: the command's words (``["bench"]``, ``["demo", "failslow"]``);
    ``args``: its options and operands, as the re-run must see them (absolute
    paths: the guest sees the host's file system at the same paths).
    ``share``: the host directory the guest may write to (the command's output;
    None: the guest writes nothing back).
    ``doing``, ``estimate_s`` and ``timeout`` (seconds, boot included) go into the
    one line said before the boot; ``memory_mb`` and ``cpus`` size the guest;
    ``stream`` gets the console live (None: captured only); ``cwd``: where the
    command runs (default: the current directory; the same path in the guest).

    The console is written to ``console_log`` (default ``share/vm-console.log``;
    without either, nowhere) when the run failed, or always with ``keep_console``.
    Never raises for the command's or the test bed's failure: see :class:`TestbedRun`.
    """
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    log = console_log or (share / "vm-console.log" if share is not None else None)
    say(f"no /dev/ublk-control here: {doing} in the qemu test bed (one boot, about "
        f"{estimate_s / 60:.0f} min; timeout {timeout / 60:.0f} min)")
    argv = [sys.executable, "-m", "ublk_driver", *command, "--in-vm", *args]
    try:
        vm = run(argv, cwd=str(cwd or Path.cwd()),
                 share=str(share) if share is not None else None, timeout=timeout,
                 stream=stream if stream is not None else False, memory_mb=memory_mb,
                 cpus=cpus)
    except TestbedError as e:  # TestbedTimeout included: qemu has been killed
        saved = _save(log, e.output) if e.output else None
        return TestbedRun(TESTBED_FAILED, str(e), e.output, saved)
    saved = _save(log, vm.output) if keep_console or vm.returncode != 0 else None
    return TestbedRun(vm.returncode, None, vm.output, saved, vm.boot_seconds,
                      vm.total_seconds, vm.kernel_log)


def _save(path: Path | None, text: str) -> Path | None:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
