"""``ublkml demo loop``: a loop device served from Python, end to end on a real ublk device.

A loop device over a backing file, served from this process through the
Python API: fio writes and verifies (crc32c) random-sized I/O on the raw
device, then ext4 is made and mounted on it, files are written, checked by
e2fsck and read back after a remount.  Prints a short summary (``--json`` for
machines).  Needs root and the ublk driver; without them the command re-runs
itself in the test bed (:mod:`ublk_driver.testbed.where`).  The command line is
``bench.demo``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ublk_driver.core.errors import UblkError
from ublk_driver.core.sizes import format_size
from ublk_driver.server import Server, ServerConfig
from ublk_driver.targets import LoopTarget


class DemoError(UblkError):
    """The demonstration failed (one line: what went wrong)."""


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _run(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(f"{' '.join(argv)} failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise DemoError(f"missing tools: {', '.join(missing)} (run `make setup`)")


def run_demo(workdir: Path, size: int, queues: int, depth: int, files: int,
             quiet: bool) -> dict[str, Any]:
    _need("fio", "mkfs.ext4", "e2fsck", "mount", "umount")
    workdir.mkdir(parents=True, exist_ok=True)
    backing = workdir / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    result: dict[str, Any] = {"backing": str(backing), "size": size}
    t0 = time.monotonic()
    server = Server(LoopTarget(str(backing)), ServerConfig(queues=queues, depth=depth))
    server.add()
    server.start()
    bdev = server.bdev
    result.update(device=bdev, queues=queues, depth=depth,
                  direct_io=server.backend.describe().get("direct_io"))
    _say(f"{bdev}: loop over {backing} ({format_size(size)}), {queues} queue(s) x {depth}",
         quiet)
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    try:
        _say("fio: random writes 4k-1m at depth 32, verified with crc32c", quiet)
        fio_size = min(size // 2, 128 << 20)
        out = _run("fio", "--name=verify", f"--filename={bdev}", "--ioengine=io_uring",
                   "--direct=1", "--rw=randwrite", "--bsrange=4k-1m", "--iodepth=32",
                   f"--size={fio_size}", "--verify=crc32c", "--verify_fatal=1",
                   "--do_verify=1", "--output-format=json")
        job = json.loads(out[out.find("{"):])["jobs"][0]
        result["fio"] = {"written_bytes": job["write"]["io_bytes"],
                         "verified_bytes": job["read"]["io_bytes"],
                         "write_iops": round(job["write"]["iops"], 1),
                         "write_bw_kib": job["write"]["bw"], "errors": job["error"]}
        if job["error"] or job["read"]["io_bytes"] != job["write"]["io_bytes"]:
            raise DemoError(f"fio verify failed: {result['fio']}")

        _say("ext4: mkfs, mount, write files", quiet)
        _run("mkfs.ext4", "-q", "-F", bdev)
        _run("mount", "-t", "ext4", bdev, str(mnt))
        rnd = random.Random(1)
        digests = {}
        total = 0
        try:
            for i in range(files):
                data = rnd.randbytes(rnd.randint(4 << 10, 2 << 20))
                (mnt / f"file{i:03d}").write_bytes(data)
                digests[f"file{i:03d}"] = hashlib.sha256(data).hexdigest()
                total += len(data)
        finally:
            _run("umount", str(mnt))
        _say("e2fsck -fn, remount, compare", quiet)
        _run("e2fsck", "-fn", bdev)
        _run("mount", "-t", "ext4", "-o", "ro", bdev, str(mnt))
        try:
            bad = [n for n, d in digests.items()
                   if hashlib.sha256((mnt / n).read_bytes()).hexdigest() != d]
        finally:
            _run("umount", str(mnt))
        if bad:
            raise DemoError(f"{len(bad)} file(s) differ after remount: {bad[:3]}")
        result["ext4"] = {"files": files, "bytes": total, "e2fsck": "clean",
                          "verified": True}
    finally:
        problems = server.shutdown()
        if problems:
            raise DemoError("; ".join(problems))
    result["device_gone"] = not os.path.exists(bdev)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def summary(res: dict[str, Any]) -> str:
    """The result as the few lines ``ublkml demo loop`` prints."""
    f, fs = res["fio"], res["ext4"]
    return "\n".join([
        f"ublkml demo: OK in {res['seconds']} s on {res['device']} "
        f"(loop, {res['queues']} queues x {res['depth']}, "
        f"O_DIRECT={'yes' if res['direct_io'] else 'no'})",
        f"  fio randwrite 4k-1m QD32: {format_size(f['written_bytes'])} written, "
        f"{format_size(f['verified_bytes'])} verified (crc32c), "
        f"{f['write_iops']} IOPS, {f['write_bw_kib']} KiB/s, 0 errors",
        f"  ext4: {fs['files']} files, {fs['bytes']} bytes written, e2fsck clean, "
        f"all read back identical after remount",
        f"  device deleted: {'yes' if res['device_gone'] else 'NO'}"])


def print_result(res: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(res, indent=2) if as_json else summary(res), file=sys.stdout)
