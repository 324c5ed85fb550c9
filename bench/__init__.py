"""ublkml's benchmark suite: ublkml devices against kernel (and nbdkit) peers.

``ublkml bench [--quick] [--out DIR] [--json] [--skip GROUP]``; see
docs/benchmarks.md.  Modules:

- :mod:`bench.cli`, :mod:`bench.demo` -- the ``ublkml bench`` and ``ublkml demo``
  commands;
- :mod:`bench.jobs` -- the fio workloads and the parsing of fio's JSON;
- :mod:`bench.runner` -- devices, measurements, the test-bed round trip;
- :mod:`bench.report` -- Markdown report, target checks and plots;
- :mod:`bench.failslow` -- the fail-slow demonstration (``ublkml demo``);
- :mod:`bench.demo_loop` -- the loop device demonstration (``ublkml demo loop``);
- :mod:`bench.ramstore`, ``bench/nbdkit_ramdisk.py`` -- the RAM store served
  both by ublkml and by nbdkit for the Python comparison.

Nothing is imported here: nbdkit's embedded interpreter imports
``bench.ramstore`` and must not pull in the runner.
"""
