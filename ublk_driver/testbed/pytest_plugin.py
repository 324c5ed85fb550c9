"""pytest plugin: ``@pytest.mark.ublk`` tests run against a real ublk driver, always.

Load it with ``pytest_plugins = ["ublk_driver.testbed.pytest_plugin"]`` in the
root ``conftest.py`` (or ``-p ublk_driver.testbed.pytest_plugin``).

Semantics:

* Where ``/dev/ublk-control`` is usable (a ublk-capable host, or inside the test
  bed), ublk tests run normally.
* Elsewhere they are not skipped: at the first ublk test, the plugin boots the
  qemu test bed once and runs *all* collected ublk tests in it with one guest
  pytest (``--junitxml`` into a share).  Each host-side ublk test then reports
  the guest's outcome, so the session has one summary that counts them:
  passed -> passed; failed or error -> failed, with the guest's report and
  captured output; skipped -> failed (a ublk test must not silently skip),
  unless the reason starts with ``kernel too old:``; xfail -> xfail.
  Host-side fixtures of those tests are not run: the test runs in the guest.
* If the test bed cannot run (qemu missing, provisioning failed, ...), every
  ublk test fails with a message saying what is missing and how to fix it.

Options: ``--ublk-vm-timeout S`` (default 4200) and ``--no-ublk-vm`` (ublk tests
fail instead of booting the test bed; for debugging).  The guest's console
(its pytest output) is saved to a log file whose path is printed.  The guest's
pytest gets the host's ``--soak`` (an option of the project's conftest) too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import shlex
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ublk_driver.testbed import _vm

#: A guest skip with a reason starting with this is a legitimate skip on the
#: host too (a feature newer than the test-bed kernel); every other skip fails.
KERNEL_TOO_OLD = "kernel too old:"

_NODEID_PROPERTY = "ublkml_nodeid"
_MARKERS = {
    "ublk": "ublk: needs the kernel ublk driver (runs natively where /dev/ublk-control "
    "exists, else in the qemu test bed)",
    "vm": "vm: boots the qemu test bed itself",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ublk", "ublk test bed (ublk_driver.testbed)")
    group.addoption(
        # 70 min: the whole test bed took 26 min on one CI machine and 50 on a
        # slower one; CI's own limit is 90 min for everything.
        "--ublk-vm-timeout", type=float, default=4200.0, metavar="S",
        help="on hosts without the ublk driver, ublk tests run in a qemu test bed: "
        "kill it after S seconds, boot included (default: %(default)g)",
    )
    group.addoption(
        "--no-ublk-vm", action="store_true", default=False,
        help="do not boot the qemu test bed: on hosts without the ublk driver, "
        "ublk tests then fail (for debugging)",
    )


def pytest_configure(config: pytest.Config) -> None:
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, line in _MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", line)
    config.pluginmanager.register(_UblkRunner(config), "ublkml-testbed-runner")


@dataclass
class _Outcome:
    """What the guest said about one test."""

    kind: Literal["passed", "failed", "skipped", "xfailed"]
    message: str = ""
    duration: float = 0.0
    sections: list[tuple[str, str]] = field(default_factory=list)


def _mangle(nodeid: str) -> tuple[str, str]:
    """(classname, name) that pytest's junitxml writes for ``nodeid``; the
    fallback for test cases without our node-id property."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


_JUNIT_HEADER = re.compile(r"^-+ Captured (Log|Out|Err) -+$", re.MULTILINE)
_SECTION_TITLES = {"Log": "log", "Out": "stdout", "Err": "stderr"}


def _captured_sections(text: str) -> list[tuple[str, str]]:
    """Split junit's system-out/err ("---- Captured Out ----" blocks, always
    written, even empty) into pytest report sections, dropping empty ones."""
    parts = _JUNIT_HEADER.split(text)
    sections: list[tuple[str, str]] = []
    if parts[0].strip():
        sections.append(("Captured output (in the test bed)", parts[0]))
    for kind, body in zip(parts[1::2], parts[2::2], strict=True):
        if body.strip():
            sections.append((f"Captured {_SECTION_TITLES[kind]} (in the test bed)",
                             body.strip("\n") + "\n"))
    return sections


def _parse_junit(path: Path, prefix: str) -> dict[str, _Outcome]:
    """Outcomes by node id (or by mangled ``classname::name`` as a fallback)."""
    results: dict[str, _Outcome] = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        key = None
        for prop in case.iter("property"):
            if prop.get("name") == _NODEID_PROPERTY:
                key = prop.get("value")
        if key is None:
            classname = case.get("classname", "")
            if prefix and classname.startswith(prefix + "."):
                classname = classname[len(prefix) + 1:]
            key = f"{classname}::{case.get('name', '')}"
        outcome = _Outcome("passed", duration=float(case.get("time", "0") or 0))
        problems = [e for e in case if e.tag in ("failure", "error")]
        skipped = case.find("skipped")
        if problems:
            outcome.kind = "failed"
            # First line: what the short summary shows; then the guest's reports.
            headline = (problems[0].get("message") or "").strip().splitlines() or [""]
            outcome.message = f"{headline[0]} (in the ublk test bed)\n\n" + "\n".join(
                f"{e.tag} in the test bed:\n{e.text or e.get('message') or ''}"
                for e in problems
            )
        elif skipped is not None:
            reason = skipped.get("message", "")
            if skipped.get("type") == "pytest.xfail":
                outcome.kind, outcome.message = "xfailed", reason
            elif reason.startswith(KERNEL_TOO_OLD):
                outcome.kind, outcome.message = "skipped", reason
            else:
                outcome.kind = "failed"
                outcome.message = (
                    f"skipped in the test bed: {reason!r}. A ublk test must not skip there; "
                    f"only a reason starting with {KERNEL_TOO_OLD!r} is accepted as a skip."
                )
        for tag in ("system-out", "system-err"):
            for e in case.iter(tag):
                outcome.sections += _captured_sections(e.text or "")
        if key in results and results[key].kind == "failed":
            continue  # keep the first failure of a duplicated case
        results[key] = outcome
    return results


def _setup_hint(rootpath: Path) -> str:
    """Point at `make setup` when the project has such a target."""
    with contextlib.suppress(OSError):
        if re.search(r"^setup\s*:", (rootpath / "Makefile").read_text(), re.MULTILINE):
            return " (or run `make setup`)"
    return ""


class _UblkRunner:
    """Runs the session's ublk tests in the test bed, once, and replays them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.native = _vm.native_ublk_available()
        self.ran = False
        self.failure: str | None = None
        self.results: dict[str, _Outcome] = {}
        self.prefix = ""
        self.log_path: Path | None = None
        self.guest_status: int | None = None
        self.summary: str | None = None

    # -- guest side ---------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Inside the test bed, tag each ublk test with its node id, which the
        # junit XML then carries back to the host: an exact match, where
        # junit's classname/name pair would be ambiguous.
        if self.native and _vm.in_vm():
            for item in items:
                if item.get_closest_marker("ublk") is not None:
                    item.user_properties.append((_NODEID_PROPERTY, item.nodeid))

    # -- host side ------------------------------------------------------------

    def _write(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            # In -q mode the result letters do not set the reporter's notion of
            # a current line, so ensure_newline() alone is not enough.
            writer = self.config.get_terminal_writer()
            if writer.width_of_current_line:
                writer.line()
            reporter.write_line(line)
            # The next result starts a fresh line with its file name.
            with contextlib.suppress(AttributeError):
                reporter.currentfspath = None
        else:
            print(line, file=sys.stderr, flush=True)

    def _guest_argv(self, nodeids: list[str], junit: Path) -> list[str]:
        opt = self.config.option
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                "-p", "ublk_driver.testbed.pytest_plugin", "--color=no", "-v",
                f"--rootdir={self.config.rootpath}"]
        if self.config.inipath is not None:
            argv += ["-c", str(self.config.inipath)]
        for plugin in getattr(opt, "plugins", None) or []:
            if plugin not in ("no:cacheprovider", "ublk_driver.testbed.pytest_plugin"):
                argv += ["-p", plugin]
        for override in getattr(opt, "override_ini", None) or []:
            argv += ["-o", override]
        for warning in getattr(opt, "pythonwarnings", None) or []:
            argv += ["-W", warning]
        if getattr(opt, "tbstyle", "auto") != "auto":
            argv.append(f"--tb={opt.tbstyle}")
        if getattr(opt, "capture", None):
            argv.append(f"--capture={opt.capture}")
        if getattr(opt, "strict_markers", False):
            argv.append("--strict-markers")
        # The project's conftest defines --soak (soak-sized counts); the guest
        # loads the same conftest, so the option means the same there.
        if getattr(opt, "soak", False):
            argv.append("--soak")
        argv += [f"--junitxml={junit}", "-o", "junit_logging=all",
                 "-o", "junit_log_passing_tests=false", "-o", "junit_family=xunit2"]
        return argv + nodeids

    def _run_guest(self, session: pytest.Session) -> None:
        self.ran = True
        rootpath = self.config.rootpath
        if _vm.in_vm():
            self.failure = ("inside the test bed, but /dev/ublk-control is not usable: "
                            "the guest's `modprobe ublk_drv` must have failed")
            return
        if self.config.getoption("no_ublk_vm"):
            self.failure = ("this host has no ublk driver (/dev/ublk-control is missing) and "
                            "--no-ublk-vm was given: drop it to run ublk tests in the qemu "
                            "test bed")
            return
        nodeids = [i.nodeid for i in session.items if i.get_closest_marker("ublk") is not None]
        with contextlib.suppress(ValueError, KeyError):
            self.prefix = str(self.config.getini("junit_prefix") or "")
        timeout = float(self.config.getoption("ublk_vm_timeout"))
        try:
            _vm.require_qemu()  # before provisioning: no download if qemu is missing
            image = _vm.provision()
        except _vm.TestbedError as exc:
            self.failure = (f"this host has no ublk driver (/dev/ublk-control is missing) and "
                            f"the qemu test bed cannot run: {exc}{_setup_hint(rootpath)}")
            return
        # Kept after the session (small): the log and junit XML for inspection.
        share = Path(tempfile.mkdtemp(prefix="ublkml-pytest-vm-"))
        junit = share / "ublk.xml"
        self.log_path = share / "guest-pytest.log"
        argv = self._guest_argv(nodeids, junit)
        self._write(
            f"ublk test bed: no ublk driver on this host; booting Linux {image.kernel_version} "
            f"under qemu (TCG) to run {len(nodeids)} ublk test(s), timeout {timeout:g} s; "
            f"guest log: {self.log_path}"
        )
        # pytest's faulthandler_timeout is armed for this test's protocol; the
        # whole guest session (minutes, under TCG) would trip it and dump
        # tracebacks.  The test bed has its own timeout (--ublk-vm-timeout).
        faulthandler.cancel_dump_traceback_later()
        try:
            with open(self.log_path, "w") as log:
                log.write(f"# cwd: {rootpath}\n# guest command: {shlex.join(argv)}\n")
                log.flush()
                # Tests may leave figures in the share (UBLKML_TESTBED_SHARE):
                # the guest's own file system is gone after the run.
                result = _vm.run(argv, cwd=str(rootpath), timeout=timeout, stream=log,
                                 share=str(share), env={"UBLKML_TESTBED_SHARE": str(share)})
        except _vm.TestbedError as exc:
            tail = _vm._tail(exc.output, 40)
            self.failure = (f"the qemu test bed failed: {exc}{_setup_hint(rootpath)}"
                            + (f"\nlast guest console lines:\n{tail}" if tail else "")
                            + f"\nguest log: {self.log_path}")
            self._write(f"ublk test bed: FAILED: {exc}")
            return
        self.guest_status = result.returncode
        dmesg = share / "guest-dmesg.log"
        dmesg.write_text(result.kernel_log)
        self.summary = (f"guest pytest exit status {result.returncode} after "
                        f"{result.total_seconds:.1f} s (boot {result.boot_seconds:.1f} s); "
                        f"log: {self.log_path}; guest kernel log: {dmesg}")
        self._write(f"ublk test bed: {self.summary}")
        if junit.exists():
            try:
                self.results = _parse_junit(junit, self.prefix)
            except ET.ParseError as exc:
                self.failure = f"cannot read the guest's junit XML {junit}: {exc}"

    def _outcome(self, item: pytest.Item) -> _Outcome:
        if self.failure is not None:
            return _Outcome("failed", self.failure)
        found = self.results.get(item.nodeid)
        if found is None:
            classname, name = _mangle(item.nodeid)
            found = self.results.get(f"{classname}::{name}")
        if found is not None:
            return found
        tail = ""
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                tail = _vm._tail(self.log_path.read_text(errors="replace"), 40)
        return _Outcome(
            "failed",
            f"the test bed's pytest reported no result for this test "
            f"(guest exit status {self.guest_status}); guest log: {self.log_path}\n"
            f"last lines of the guest log:\n{tail}",
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if self.native or item.get_closest_marker("ublk") is None:
            return None
        if not self.ran:
            self._run_guest(item.session)
        self._replay(item, nextitem, self._outcome(item))
        return True

    def _replay(self, item: pytest.Item, nextitem: pytest.Item | None, outcome: _Outcome) -> None:
        """Report the guest's outcome as pytest would have for a local run."""
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        keywords: dict[str, Literal[1]] = {str(k): 1 for k in item.keywords}
        now = time.time()

        def report(when: Literal["setup", "call", "teardown"],
                   kind: Literal["passed", "failed", "skipped"],
                   longrepr: tuple[str, int, str] | str | None = None,
                   sections: Iterable[tuple[str, str]] = (), duration: float = 0.0,
                   **extra: object) -> None:
            rep = pytest.TestReport(
                item.nodeid, item.location, keywords, kind, longrepr, when, sections,
                duration, now, now + duration, item.user_properties, **extra,
            )
            ihook.pytest_runtest_logreport(report=rep)

        if outcome.kind == "skipped":
            path, line = item.reportinfo()[:2]
            report("setup", "skipped", (os.fspath(path), (line or 0) + 1,
                                        f"Skipped: {outcome.message}"))
        else:
            report("setup", "passed")
            if outcome.kind == "passed":
                report("call", "passed", duration=outcome.duration)
            elif outcome.kind == "xfailed":
                report("call", "skipped", None, outcome.sections, outcome.duration,
                       wasxfail=outcome.message)
            else:
                report("call", "failed", outcome.message, outcome.sections, outcome.duration)
        # Run the finalizers that pytest's own teardown would run here (of
        # earlier host-side tests' fixtures no longer needed by ``nextitem``),
        # so the host's setup state stays consistent.
        call = pytest.CallInfo.from_call(
            lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown"
        )
        ihook.pytest_runtest_logreport(report=ihook.pytest_runtest_makereport(item=item, call=call))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.ran or self.native:
            return
        terminalreporter.section("ublk test bed")
        if self.summary:
            terminalreporter.write_line(self.summary)
        # 0: all passed, 1: some failed (reported per test); anything else
        # (interrupted, internal or usage error) is explained only in the log.
        if self.guest_status not in (None, 0, 1) and self.log_path is not None:
            with contextlib.suppress(OSError):
                tail = _vm._tail(self.log_path.read_text(errors="replace"), 30)
                terminalreporter.write_line("last lines of the guest log:")
                terminalreporter.write_line(tail)
        if self.failure:
            terminalreporter.write_line(f"failed: {self.failure.splitlines()[0]}")
