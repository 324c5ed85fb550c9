"""The command line's handling of bad input: one clear line, non-zero exit, nothing created.

These run without the driver: validation happens before any device exists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ublk_driver", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["add", "-t", "mem"], "-t mem needs --size"),
    (["add", "-t", "mem", "--size", "1000"], "not a multiple of the block size"),
    (["add", "-t", "mem", "--size", "lots"], "not a size"),
    (["add", "-t", "loop"], "needs -f FILE"),
    (["add", "-t", "loop", "-f", "/nonexistent/backing.img"], "No such file"),
    (["add", "-t", "null", "-d", "0"], "queue depth must be 1..4096"),
    (["add", "-t", "null", "-d", "5000"], "queue depth must be 1..4096"),
    (["add", "-t", "null", "-q", "0"], "queue count must be"),
    (["add", "-t", "null", "-q", "100000"], "queue count must be"),
    (["add", "-t", "python"], "needs --plugin"),
    (["add", "-t", "python", "--plugin", "nosuchmod:X"], "cannot import"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--plugin-arg", "size=1001"], "not a positive multiple"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--plugin-timeout", "-1"], "plug-in timeout must be 0 (none) or 0.001..86400 s"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--plugin-timeout", "soon"], "expected a number of seconds"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--plugin-timeout", "inf"], "plug-in timeout must be"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--plugin-timeout", "0.0001"], "plug-in timeout must be"),
    (["add", "-t", "mem", "--size", "1M", "--plugin-timeout", "5"],
     "--plugin-timeout is for -t python"),
    (["add", "-t", "mem", "--size", "1M", "--queue-processes"],
     "--queue-processes is for -t python"),
    (["add", "-t", "null", "--queue-threads"], "--queue-threads is for -t python"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--queue-processes", "--queue-threads"], "not allowed with argument"),
    (["add", "-t", "python", "--plugin", "examples.zeros:ReadOnlyZeros",
      "--queue-processes"], "is not fork_safe"),
    (["add", "-t", "python", "--plugin", "examples.zeros:ReadOnlyZeros",
      "--queue-processes", "--foreground"], "is not fork_safe"),
    (["add", "-t", "python", "--plugin", "examples.ramdisk:RamDisk",
      "--queue-processes", "--score"], "scoring (--score) needs queue threads"),
    (["add", "-t", "null", "--poll-us", "20000"], "poll time must be 0..10000 us"),
    (["add", "-t", "null", "--poll-us", "-1"], "poll time must be 0..10000 us"),
    (["add", "-t", "null", "--poll-us", "soon"], "invalid int value"),
    (["add", "-t", "null", "--scheduler", "Deadline!"], "I/O scheduler must be a name"),
    (["add", "-t", "bogus"], "invalid choice"),
    (["del"], "one of the arguments -n/--number -a/--all is required"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str) -> None:
    proc = run(*args)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    if proc.returncode == 1:
        assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_poll_us_in_the_environment_is_one_clear_line() -> None:
    import os

    proc = subprocess.run([sys.executable, "-m", "ublk_driver", "add", "-t", "null"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "UBLKML_POLL_US": "abc"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ublkml: error: UBLKML_POLL_US='abc': give microseconds, 0..10000"


def test_size_not_multiple_of_block_for_loop(tmp_path: Path) -> None:
    f = tmp_path / "odd.img"
    f.write_bytes(bytes(1 << 20))
    proc = run("add", "-t", "loop", "-f", str(f), "--size", "1000")
    assert proc.returncode == 1 and "not a multiple" in proc.stderr


def test_help_explains_every_command() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for verb in ("add", "list", "del", "features", "vm"):
        assert verb in proc.stdout
    add = run("add", "--help")
    assert "--plugin" in add.stdout and "--foreground" in add.stdout
