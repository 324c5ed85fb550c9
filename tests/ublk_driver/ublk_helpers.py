"""Helpers for the tests that drive real ublk devices (run natively or in the test bed)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fixed ids far above the kernel's auto-allocated ones (0, 1, ...) so that the
# suite can share a machine with other ublk users, as libublk-rs's tests do.
_ids = itertools.count(900 + (os.getpid() % 50) * 10)


def next_dev_id() -> int:
    return next(_ids)


def ublkml(*args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real command line: the ``ublkml`` entry point's ``main`` in a fork
    of this process, else ``python -m ublk_driver``.

    Most modules a command needs are already imported here, while a fresh
    interpreter costs 3-4 s in the TCG test bed, and the tests start a few
    hundred commands.  A fork while another Python thread runs (a FioLoop)
    could inherit a lock that thread held, and ``--score`` loads onnxruntime
    into the server, whose thread pools are not made for a forked parent: those
    commands run as their own process, as a user runs them.  (Idle native
    pools, such as numpy's BLAS threads, are fork-safe: multiprocessing's fork
    start method relies on that.)
    """
    argv = [str(a) for a in args]
    if threading.active_count() == 1 and "--score" not in argv:
        _import_the_commands()
        proc = _run_in_fork(argv, timeout)
    else:
        proc = subprocess.run([sys.executable, "-m", "ublk_driver", *argv],
                              capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ublkml {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


@functools.cache
def _import_the_commands() -> None:
    """Import here, once, what the commands import, so that no fork imports it again."""
    import ublk_driver.admin.cli
    import ublk_driver.cli  # noqa: F401
    from ublk_driver.hooks import hook_classes

    hook_classes()


def _run_in_fork(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``ublkml ARGV`` as ``ublk_driver.core.cli.main`` in a child of this process, with
    its own stdin (/dev/null), stdout and stderr, as ``subprocess.run`` would give it."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the test run
        code = 1
        try:
            os.close(out_r)
            os.close(err_r)
            null = os.open(os.devnull, os.O_RDONLY)
            for fd, target in ((null, 0), (out_w, 1), (err_w, 2)):
                os.dup2(fd, target)
                os.close(fd)
            # As subprocess does (close_fds): a server forked from here must not
            # keep this test run's files open - a /dev/ublkbN among them would
            # keep that device from being freed.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's own stdio
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            from ublk_driver.core.cli import main

            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                for fd in chunks:
                    os.close(fd)
                raise subprocess.TimeoutExpired(["ublkml", *argv], timeout)
            for key, _ in sel.select(min(left, 1.0)):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    for fd in chunks:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(["ublkml", *argv], os.waitstatus_to_exitcode(status),
                                       b"".join(chunks[out_r]).decode(errors="replace"),
                                       b"".join(chunks[err_r]).decode(errors="replace"))


@dataclass
class Device:
    dev_id: int
    bdev: str
    info: dict[str, Any]


@contextlib.contextmanager
def device(*args: str) -> Iterator[Device]:
    """``ublkml add ARGS`` in the background; deleted (and checked gone) afterwards."""
    dev_id = next_dev_id()
    out = ublkml("add", "-n", str(dev_id), "--json", *args)
    info = json.loads(out.stdout)
    assert info["dev_id"] == dev_id
    try:
        yield Device(dev_id, info["bdev"], info)
    finally:
        ublkml("del", "-n", str(dev_id))
        assert not os.path.exists(f"/dev/ublkb{dev_id}")


def fio(filename: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    """Run fio with JSON output and return the parsed document (fields by name)."""
    cmd = ["fio", "--name=t", f"--filename={filename}", "--ioengine=io_uring", "--direct=1",
           "--output-format=json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"fio failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    start = proc.stdout.find("{")
    doc: dict[str, Any] = json.loads(proc.stdout[start:])
    return doc


def job_totals(doc: dict[str, Any]) -> dict[str, int]:
    tot = {"read": 0, "write": 0, "errors": 0}
    for job in doc["jobs"]:
        tot["read"] += int(job["read"]["io_bytes"])
        tot["write"] += int(job["write"]["io_bytes"])
        tot["errors"] += int(job["error"])
    return tot


def sh(*argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def read_direct(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


def write_direct(path: str, offset: int, data: bytes) -> None:
    import mmap

    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def write_tree(root: Path, seed: int, count: int = 12) -> dict[str, str]:
    """Files of pseudo-random sizes and content; returns name -> sha256."""
    import random

    rnd = random.Random(seed)
    digests = {}
    for i in range(count):
        data = rnd.randbytes(rnd.randint(1, 768 << 10))
        name = f"f{i:03d}.bin"
        (root / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def tree_digests(root: Path, names: Sequence[str]) -> dict[str, str]:
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def sparse_files(tmp_path: Path, n: int, size: int, stem: str = "leg") -> list[str]:
    """``n`` sparse files of ``size`` bytes (backing files, mirror legs)."""
    paths = []
    for i in range(n):
        p = tmp_path / f"{stem}{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return paths


def wait_gone(path: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
