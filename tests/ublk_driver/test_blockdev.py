"""ublk_driver.blockdev on the host: the scheduler file's format and the errors.

A directory under tmp_path stands in for /sys/block (the piece these tests do
not test); what the kernel does with a write is tested on a real device in
test_lifecycle.py::test_io_scheduler_*.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ublk_driver.blockdev import check_scheduler, parse_schedulers, read_scheduler, set_scheduler
from ublk_driver.core.errors import ConfigError, UblkError
from ublk_driver.server import ServerConfig

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)


@given(st.lists(names, min_size=1, max_size=6, unique=True), st.data())
def test_parse_finds_every_name_and_the_active_one(choices: list[str], data: st.DataObject
                                                    ) -> None:
    active = data.draw(st.sampled_from(choices))
    text = " ".join(f"[{n}]" if n == active else n for n in choices) + "\n"
    assert parse_schedulers(text) == (choices, active)


def test_parse_without_an_active_one() -> None:
    assert parse_schedulers("none\n") == (["none"], None)
    assert parse_schedulers("") == ([], None)


@pytest.mark.parametrize("bad", ["", "None", "../x", "mq deadline", "x" * 33, "-x"])
def test_bad_names_are_refused_before_anything_exists(bad: str) -> None:
    with pytest.raises(ConfigError, match="I/O scheduler must be a name"):
        check_scheduler(bad)
    with pytest.raises(ConfigError, match="I/O scheduler must be a name"):
        ServerConfig(scheduler=bad).validate()


def test_the_default_is_none_and_none_keeps_the_kernels_choice() -> None:
    assert ServerConfig().scheduler == "none"
    ServerConfig(scheduler=None).validate()
    assert check_scheduler("mq-deadline") == "mq-deadline"


def _fake_disk(root: Path, text: str) -> None:
    (root / "ublkb3" / "queue").mkdir(parents=True)
    (root / "ublkb3" / "queue" / "scheduler").write_text(text)


def test_set_writes_the_name_and_reads_back_the_active_one(tmp_path: Path) -> None:
    _fake_disk(tmp_path, "none [mq-deadline]\n")
    assert read_scheduler("ublkb3", str(tmp_path)) == (["none", "mq-deadline"], "mq-deadline")
    # A regular file keeps what is written (the kernel would answer "[none] mq-deadline").
    assert set_scheduler("ublkb3", "none", str(tmp_path)) == "none"
    assert (tmp_path / "ublkb3" / "queue" / "scheduler").read_text() == "none"


def test_a_missing_disk_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UblkError, match="ublkb9/queue/scheduler is missing"):
        read_scheduler("ublkb9", str(tmp_path))
    with pytest.raises(UblkError, match="ublkb9/queue/scheduler is missing"):
        set_scheduler("ublkb9", "none", str(tmp_path))


def test_a_write_the_kernel_refuses_says_what_to_do(tmp_path: Path) -> None:
    # A directory where the file should be: the write fails with EISDIR.
    (tmp_path / "ublkb3" / "queue" / "scheduler").mkdir(parents=True)
    with pytest.raises(UblkError, match=r"cannot set the I/O scheduler of ublkb3 to 'none'.*"
                       r"--scheduler keep"):
        set_scheduler("ublkb3", "none", str(tmp_path))
