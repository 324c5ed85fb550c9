"""Process facts from the real /proc (host only)."""

from __future__ import annotations

import os
import subprocess
import time

from ublk_driver.core.process import cpu_seconds, pid_alive, stat_fields


def test_a_running_process_a_zombie_and_a_reaped_one() -> None:
    assert pid_alive(os.getpid()) and not pid_alive(0) and not pid_alive(-1)
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while (stat_fields(child.pid) or ["?"])[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stat_fields(child.pid) is not None and not pid_alive(child.pid)  # a zombie
    child.wait()
    assert stat_fields(child.pid) is None and not pid_alive(child.pid)      # reaped


def test_cpu_seconds_grow_with_work_and_are_none_once_gone() -> None:
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    after = cpu_seconds(os.getpid())
    assert before is not None and after is not None and after >= before + 0.1
    child = subprocess.Popen(["true"])
    child.wait()
    assert cpu_seconds(child.pid) is None
