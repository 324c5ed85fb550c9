"""Every atheris target for a short, fixed number of runs (see atheris_targets.py).

Each run is a subprocess: libFuzzer ends its process, and a finding must fail
this test, not end the test session.  The seed is fixed so that CI is
repeatable; a long session with another seed is `python -m
tests.fuzz.atheris_targets TARGET -max_total_time=600`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.atheris_targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_survives_fuzzing(target: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.atheris_targets", target, "-runs=20000",
         "-seed=1", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{target}: a finding (input in {tmp_path}):\n" + \
        (proc.stdout + proc.stderr)[-4000:]
    assert "Done 20000 runs" in proc.stderr


def test_a_finding_fails_the_run(tmp_path: Path) -> None:
    """The harness is live: a target that raises is reported as a crash."""
    code = ("import atheris, sys\n"
            "def t(d):\n"
            "    if d[:1] == b'x': raise RuntimeError('found')\n"
            "atheris.Setup([sys.argv[0], '-runs=100000', '-seed=1', "
            f"'-artifact_prefix={tmp_path}/'], t)\n"
            "atheris.Fuzz()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "RuntimeError: found" in proc.stdout + proc.stderr
    assert list(tmp_path.glob("crash-*"))
