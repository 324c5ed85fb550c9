"""The one parser tree: commands and server hooks found through entry points, one error path.

A user's package is simulated by a real ``*.dist-info`` directory on ``sys.path``
(importlib.metadata reads it as it reads an installed wheel); nothing is faked.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ublk_driver.core import cli
from ublk_driver.core.cli import CliError, UsageError, one_line, run
from ublk_driver.core.errors import ConfigError
from ublk_driver.hooks import hook_classes

EVERY_COMMAND = ("add", "del", "list", "recover", "features", "status", "fault", "leg", "demo",
                 "bench", "agent", "model", "ml", "monitor", "vm")


def ublkml(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ublk_driver", *args], capture_output=True,
                          text=True, timeout=120, check=False, **kw)  # type: ignore[call-overload]


def test_help_lists_every_command_in_order() -> None:
    p = ublkml("--help")
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines()
              if line.startswith("    ") and line.split()[0].isidentifier()]
    assert tuple(listed) == EVERY_COMMAND
    assert "Not available" not in p.stdout


def test_version() -> None:
    from importlib.metadata import version

    p = ublkml("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"ublkml {version('ublkml')}"


@pytest.mark.parametrize("argv", [["frobnicate"], ["add"], ["agent", "nosuchverb"],
                                  ["list", "-n", "x"]])
def test_usage_errors_are_one_line_and_status_2(argv: list[str]) -> None:
    p = ublkml(*argv)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("ublkml")


def test_a_group_without_a_verb_prints_its_help() -> None:
    p = ublkml("agent")
    assert p.returncode == 2 and "COMMAND" in p.stderr and "watch" in p.stderr


def test_add_does_not_import_the_model_stack() -> None:
    code = ("import sys\nfrom ublk_driver.core.cli import main\n"
            "assert main(['add', '--help']) == 0\n"
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'kernel_agent', 'ml', 'bench') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    # `--score` comes from the models' hook: its module is light, the scorer is not loaded.
    assert p.stdout.strip().splitlines()[-1] == "['ml']"
    assert "--score" in p.stdout


def test_run_maps_errors_to_one_line_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    def fail(exc: BaseException) -> cli.Handler:
        def handler(_args: argparse.Namespace) -> int:
            raise exc
        return handler

    ns = argparse.Namespace()
    assert run(fail(UsageError("bad\nflag")), ns) == 2
    assert capsys.readouterr().err == "ublkml: error: bad\\nflag\n"
    assert run(fail(CliError("no device", 3)), ns) == 3
    assert run(fail(ConfigError("not a size")), ns) == 1
    assert run(fail(PermissionError(13, "Permission denied")), ns) == 1
    assert "(this needs root)" in capsys.readouterr().err
    assert run(fail(KeyboardInterrupt()), ns) == 130
    with pytest.raises(RuntimeError):   # a bug is a traceback, not a tidy line
        run(fail(RuntimeError("bug")), ns)


def test_one_line_escapes_control_characters() -> None:
    assert one_line("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"


# ---- a user's package adds a command and a server hook --------------------------------


@pytest.fixture
def user_package(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "mycmds.py").write_text(textwrap.dedent("""
        import argparse
        from ublk_driver.hooks import ServerHook

        def register(sub):
            p = sub.add_parser("hello", help="say hello")
            p.add_argument("--name", default="world")
            p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

        class Tracer(ServerHook):
            @classmethod
            def add_arguments(cls, parser):
                parser.add_argument("--trace-to", metavar="FILE")

            @classmethod
            def from_args(cls, args, target_type):
                return cls() if args.trace_to else None
    """))
    info = tmp_path / "mycmds-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mycmds\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ublkml.commands]\nhello = mycmds:register\n\n"
        "[ublkml.server_hooks]\ntracer = mycmds:Tracer\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mycmds", None)


def test_a_users_package_adds_a_command(user_package: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hello", "--name", "ublk"]) == 0
    assert capsys.readouterr().out == "hello ublk\n"
    assert "hello" in cli.build_parser().format_help()


def test_a_users_package_adds_a_server_hook(user_package: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(c.__name__ for c in hook_classes()) == ["ScoringHook", "Tracer"]
    assert cli.main(["add", "--help"]) == 0
    assert "--trace-to FILE" in capsys.readouterr().out


def test_a_command_whose_package_is_broken_leaves_the_others_working(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = tmp_path / "broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ublkml.commands]\nzap = no_such_module:register\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert cli.main(["--help"]) == 0
        out = capsys.readouterr().out
        assert "Not available in this installation: zap (No module named 'no_such_module')" \
            in " ".join(out.split())
        assert cli.main(["zap"]) == 2
    finally:
        sys.path.remove(str(tmp_path))


def test_driver_commands_are_the_driver_entry_points() -> None:
    """The fast path's table and pyproject's entry points name the same functions."""
    from importlib import metadata

    eps = {ep.name: ep.value for ep in metadata.entry_points(group=cli.COMMANDS_GROUP)
           if ep.value.startswith("ublk_driver.")}
    assert eps == cli.DRIVER_COMMANDS


def test_a_driver_command_starts_without_importlib_metadata() -> None:
    """`ublkml list` and the other device commands skip the entry-point lookup and
    shell completion; another package's command still finds its entry point."""
    probe = ("import sys\nfrom ublk_driver.core.cli import main\nrc = main(sys.argv[1:])\n"
             "print(rc, 'importlib.metadata' in sys.modules, 'argcomplete' in sys.modules)")
    for argv, loaded in ((["list", "--help"], False), (["del", "--help"], False),
                         (["agent", "--help"], True)):
        p = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                           text=True, timeout=120, check=False)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[-1] == f"0 {loaded} False", (argv, p.stdout[-300:])


def test_version_is_read_when_asked() -> None:
    p = ublkml("--version")
    assert p.returncode == 0 and p.stdout.startswith("ublkml ") and p.stdout.count("\n") == 1


@given(st.one_of(st.integers(-1000, 1000).map(str), st.text(max_size=6)))
def test_int_in_accepts_exactly_the_integers_in_bounds(text: str) -> None:
    parse = cli.int_in("rounds", 1, 100)
    try:
        expected: int | None = int(text)
    except ValueError:
        expected = None
    if expected is not None and 1 <= expected <= 100:
        assert parse(text) == expected
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=r"rounds must be 1\.\.100, got"):
            parse(text)
    assert cli.int_in("n", 0)("123456789") == 123456789


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str),
                 st.text(max_size=6)))
def test_seconds_in_bounds_open_and_closed(text: str) -> None:
    closed, half_open = cli.seconds_in("s", 0, 10), cli.seconds_in("s", 0, 10, low_open=True)
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    for parse, ok in ((closed, 0 <= x <= 10), (half_open, 0 < x <= 10)):
        if ok:
            assert parse(text) == x
        else:
            with pytest.raises(argparse.ArgumentTypeError, match="s must be in"):
                parse(text)
