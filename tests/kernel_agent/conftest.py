"""Fixtures for the kernel agent's tests.

Host-side accounting tests need root and a usable eBPF (the project's
machines have it): ``bpf_ok`` *fails* with the reason when it is not, rather
than skipping, so that a broken set-up is never mistaken for a pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel_agent.accounting import bpf_unavailable_reason, ensure_bpffs


@pytest.fixture
def bpf_ok() -> None:
    reason = bpf_unavailable_reason()
    if reason:
        pytest.fail(f"eBPF accounting is not usable here: {reason}")
    ensure_bpffs()


@pytest.fixture
def instance() -> str:
    """A pin-directory name no other run uses."""
    return f"test{os.getpid()}x{time.monotonic_ns() % 100000}"


@pytest.fixture
def agent_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "agent"
    monkeypatch.setenv("UBLKML_AGENT_DIR", str(d))
    return d


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    """A quiet 64 MiB loop device (direct I/O to its file, merges off), e.g. 'loop3'."""
    if os.geteuid() != 0:
        pytest.fail("loop devices need root")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    path = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(img)],
                          capture_output=True, text=True, check=True).stdout.strip()
    name = os.path.basename(path)
    try:
        # Merges would turn N submitted I/Os into fewer requests.
        Path(f"/sys/block/{name}/queue/nomerges").write_text("2")
        if shutil.which("udevadm"):
            subprocess.run(["udevadm", "settle", "-t", "5"], capture_output=True, check=False)
        time.sleep(0.2)  # let any prober finish before counting starts
        yield name
    finally:
        subprocess.run(["losetup", "-d", path], check=False)


def fio(filename: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    cmd = ["fio", "--name=t", f"--filename={filename}", "--direct=1",
           "--output-format=json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"fio failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    doc: dict[str, Any] = json.loads(proc.stdout[proc.stdout.find("{"):])
    return doc


def fio_totals(doc: dict[str, Any]) -> dict[str, int]:
    """I/Os and bytes fio completed, by field name."""
    out = {"read_ios": 0, "read_bytes": 0, "write_ios": 0, "write_bytes": 0}
    for job in doc["jobs"]:
        for op in ("read", "write"):
            out[f"{op}_ios"] += int(job[op]["total_ios"])
            out[f"{op}_bytes"] += int(job[op]["io_bytes"])
    return out
