"""ublkml's benchmark suite: ublkml devices against kernel (and nbdkit) peers.

``python -m bench [--quick] [--out DIR] [--json] [--skip GROUP]``; see
docs/benchmarks.md.  Modules:

- :mod:`bench.jobs` -- the fio workloads and the parsing of fio's JSON;
- :mod:`bench.runner` -- devices, measurements, the test-bed round trip;
- :mod:`bench.report` -- Markdown report, target checks and plots;
- :mod:`bench.ramstore`, ``bench/nbdkit_ramdisk.py`` -- the RAM store served
  both by ublkml and by nbdkit for the Python comparison.

Nothing is imported here: nbdkit's embedded interpreter imports
``bench.ramstore`` and must not pull in the runner.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (``python -m bench``); returns the exit status."""
    from bench.runner import main as run_main

    return run_main(argv)
