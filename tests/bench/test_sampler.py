"""bench/sampler.py: py-spy's collapsed stacks, summarised for the report.

The parsing tests use short hand-written py-spy output; the last test runs the
real py-spy on a real busy process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import sampler

RAW = """\
thread (11): MainThread;<module> (srv.py:3);serve (srv.py:9);io_uring_enter (liburing.so.2) 60
thread (12): ublk-q0-py;0x7f00aa (libc.so.6);handle (plugin.py:40);read_into (ramdisk.py:12);\
memcpy (libc.so.6) 30
thread (12): ublk-q0-py;0x7f00bb (libc.so.6);handle (plugin.py:41);handle_cqe (ublkml.c:2100) 10
"""


def test_frame_names_drop_line_numbers_and_addresses() -> None:
    assert sampler.frame_name("handle (plugin.py:40)") == "handle (plugin.py)"
    assert sampler.frame_name("0x7fac4c9278ec (libc.so.6)") == "[libc.so.6]"
    assert sampler.frame_name("crc32_z (libz.so.1.2.13)") == "crc32_z (libz.so.1.2.13)"


def test_summary_separates_waiting_and_shares_add_up() -> None:
    s = sampler.summarize(RAW)
    assert s["samples"] == 100
    assert s["waiting_share"] == 0.6
    assert {t["frame"]: t["share"] for t in s["threads"]} == {"MainThread": 0.6,
                                                               "ublk-qN-py": 0.4}
    assert s["self"] == [{"frame": "memcpy (libc.so.6)", "share": 0.3},
                         {"frame": "handle_cqe (ublkml.c)", "share": 0.1}]
    # inclusive: both lines of the worker run under handle(); waiting samples are not counted
    py = {p["frame"]: p["share"] for p in s["python"]}
    assert py == {"handle (plugin.py)": 0.4, "read_into (ramdisk.py)": 0.3}


#: --subprocesses output from stripped libraries (real shapes, from a test-bed
#: run): the blocking call is under one or two bare addresses, or is the
#: engine's inlined io_uring wait that shows as a bare liburing address.
RAW_STRIPPED = "\n".join([
    'process 180:"python -m ublk_driver add";thread (182): ublk-q0;0x7fbe8ec (libc.so.6);'
    "process_batch (ublkml.c:2233);ring_error (ublkml.c:2199);0x7fbeef3a5b95 (liburing.so.2.3)"
    " 50",
    'process 190:"python -m ublk_driver add";thread (191): ublk-q1-py;'
    "ublkml_relay_next (ublkml.c:2693);pthread_cond_wait (libc.so.6);0x7f0df9219f16 (libc.so.6)"
    " 20",
    'process 180:"python -m ublk_driver add";thread (183): ublk-q0-err;'
    "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7fbe116 (libc.so.6);"
    "0x7fbe9f16 (libc.so.6) 20",
    'process 190:"python -m ublk_driver add";thread (191): ublk-q1-py;'
    "RamStore.pread (bench/ramstore.py:94);0x7f0df92e6a89 (libc.so.6) 10",
])


def test_stripped_libraries_and_subprocess_lines() -> None:
    s = sampler.summarize(RAW_STRIPPED)
    assert s["samples"] == 100 and s["waiting_share"] == 0.9
    assert {t["frame"] for t in s["threads"]} == {"ublk-qN", "ublk-qN-py", "ublk-qN-err"}
    assert s["self"] == [{"frame": "[libc.so.6]", "share": 0.1}]  # the copy, on a CPU
    assert s["python"] == [{"frame": "RamStore.pread (bench/ramstore.py)", "share": 0.1}]


def test_output_without_thread_names_and_empty_output() -> None:
    s = sampler.summarize("main (a.py:1);work (a.py:2) 7\n")
    assert s["samples"] == 7 and s["self"] == [{"frame": "work (a.py)", "share": 1.0}]
    empty = sampler.summarize("")
    assert empty["samples"] == 0 and empty["waiting_share"] is None


@pytest.mark.parametrize("line", ["no count here", "a;b 12x", "a;b"])
def test_malformed_output_is_refused_with_the_line(line: str) -> None:
    with pytest.raises(ValueError, match="line 1"):
        sampler.parse_collapsed(line)


BUSY = """\
import time, zlib
def spin_in_python(n):
    x = 0
    for i in range(n):
        x += i * i
    return x
def crc_loop():
    data = b"x" * 200000
    t = time.monotonic()
    while time.monotonic() - t < 20:
        zlib.crc32(data)
        spin_in_python(20000)
print("ready", flush=True)
crc_loop()
"""


def test_real_py_spy_sees_where_a_process_spends_its_time(tmp_path: Path) -> None:
    """py-spy (a real one) on a process that splits its time between a C
    function (zlib's crc32) and a Python loop: both show up, nothing waits."""
    exe = sampler.find_py_spy()
    assert exe, "py-spy is missing: it is in the 'bench' and 'dev' extras (scripts/setup.sh)"
    script = tmp_path / "busy.py"
    script.write_text(BUSY)
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            s = sampler.Sampler(exe, proc.pid, tmp_path / "p.txt", delay=0.2, duration=2)
            t0 = time.monotonic()
            res = s.result(timeout=60)
            assert time.monotonic() - t0 < 60
        finally:
            proc.kill()
    assert "error" not in res, res
    assert res["samples"] >= 50  # 2 s at 100 Hz, allowing for a slow machine
    assert res["waiting_share"] < 0.2
    py = {p["frame"] for p in res["python"]}
    assert {"crc_loop (busy.py)", "spin_in_python (busy.py)"} <= py
    leaves = " ".join(p["frame"] for p in res["self"])
    assert "crc32" in leaves or "libz" in leaves, res["self"]


def test_a_process_that_is_gone_gives_an_error_not_a_crash(tmp_path: Path) -> None:
    exe = sampler.find_py_spy()
    assert exe
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    res = sampler.Sampler(exe, proc.pid, tmp_path / "p.txt", delay=0, duration=1).result(60)
    assert "error" in res and "py-spy" in res["error"]
