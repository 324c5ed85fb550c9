"""Completion records: one per answered request, for the ML scorer.

The queue threads write them into a preallocated ring in C (never blocking:
when the reader falls behind, records are dropped and counted); a reader
drains them in batches as a numpy structured array with this dtype, which
mirrors ``struct ublkml_completion`` (checked by the tests).
"""

from __future__ import annotations

import numpy as np

COMPLETION_DTYPE = np.dtype(
    [
        ("t_ns", "<u8"),      # when answered, CLOCK_MONOTONIC
        ("offset", "<u8"),    # bytes
        ("length", "<u4"),    # bytes
        ("lat_ns", "<u4"),    # request seen -> answered
        ("result", "<i4"),    # bytes moved or -errno
        ("q_id", "<u2"),
        ("tag", "<u2"),
        ("op", "u1"),         # ublk_driver.uapi.Op
        ("path", "u1"),       # completion path (backing file, mirror leg)
        ("flags", "<u2"),     # RECORD_* bits
        ("pad1", "<u4"),
    ]
)

#: ``flags`` bit of a mirror's user read that carried a health probe to a
#: demoted leg (``UBLKML_REC_PROBED``).  The probe went out in the same
#: submission, so these reads are what the probes compare against: on a
#: machine where reads complete inline (brd, TCG) such a read pays for the
#: probe's time too, and all reads would make a probe look about 2x slow.
RECORD_PROBED = 0x1

#: 16 linear bins per octave of latency (ns), as ml.features.latency_bins.
SUMMARY_BINS = 512

#: ``struct ublkml_path_summary``: per completion path, cumulative counts
#: that the queue thread keeps (``ServerConfig.summaries``), so that the scorer
#: does no per-I/O work.
SUMMARY_DTYPE = np.dtype(
    [
        ("n", "<u8"),
        ("errors", "<u8"),
        ("bytes", "<u8"),         # moved by successful reads and writes
        ("lat_sum", "<u8"),       # ns
        ("lat_sumsq", "<f8"),     # ns^2
        ("hist", "<u8", (SUMMARY_BINS,)),
    ]
)
