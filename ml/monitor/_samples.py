"""Per-drive samples from the kernel: cumulative counters in, one sample per interval out.

A *sample* is what the kernel saw on one block device during one interval:
I/Os, bytes moved, mean latency and errors (the Perseus layout: latency and
throughput per drive and interval).  Counters come from the eBPF accounting
(:class:`kernel_agent.accounting.BpfAccounting`, the block tracepoints) where
the device is request-based and eBPF works, else from ``/sys/block/X/stat``
(bio-based devices such as dm and md never reach the request tracepoints; the
kernel still accounts their bios there).  Each source says which it is and why.

Samples go into :class:`SampleRing`, a fixed-size ring per drive: the monitor
never allocates per tick beyond the window it scores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kernel_agent.accounting import BlockDevice, BpfAccounting, DeviceStats, sysfs_stats
from kernel_agent.errors import AgentError, BpfUnavailableError

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Counters:
    """Cumulative counters of one block device at one instant."""

    ios: int
    bytes: int
    latency_ns: int
    errors: int | None      # None: the source does not count errors (sysfs)


@dataclass(frozen=True)
class Sample:
    """One interval of one device (differences of two :class:`Counters`)."""

    ts: float               # end of the interval, monotonic seconds
    seconds: float
    ios: int
    bytes: int
    latency_us: float       # mean over the interval's I/Os (NaN without I/O)
    errors: int             # new errors in the interval (0 where not counted)

    @property
    def throughput_bps(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def counters_of(st: DeviceStats) -> Counters:
    data = st.bytes.get("read", 0) + st.bytes.get("write", 0)
    return Counters(ios=st.total_ios, bytes=data, latency_ns=int(st.latency_sum_ns or 0),
                    errors=st.errors)


def is_request_based(bd: BlockDevice) -> bool:
    """blk-mq devices have ``mq/``; bio-based ones (dm, md) never reach block_rq_*."""
    return (bd.sysfs / "mq").is_dir()


class CounterSource:
    """Reads counters of the devices the monitor measures: eBPF where it can.

    ``use_bpf=False`` or an eBPF that cannot load (not root, no BTF...) leaves
    every device on sysfs, and :attr:`note` says why.  The eBPF programs watch
    at most 16 devices per instance; devices beyond that are read from sysfs too.
    """

    def __init__(self, use_bpf: bool = True, instance: str = "monitor") -> None:
        self.acc: BpfAccounting | None = None
        self.note = ""
        if use_bpf:
            try:
                # Counts, bytes, latency and errors are all the monitor reads:
                # the completion program alone gives them, at half the
                # per-I/O cost of the agent's full accounting.
                self.acc = BpfAccounting(instance, in_flight=False)
            except BpfUnavailableError as e:
                self.note = str(e)
        else:
            self.note = "eBPF disabled (--no-bpf)"
        self._how: dict[int, tuple[str, str]] = {}   # dev -> (source, note)

    @property
    def ebpf(self) -> bool:
        return self.acc is not None

    def add(self, bd: BlockDevice) -> tuple[str, str]:
        """Start measuring ``bd``; (source, note) of its samples."""
        if bd.dev in self._how:
            return self._how[bd.dev]
        how = ("sysfs", self.note or "eBPF unavailable")
        if self.acc is not None:
            if not is_request_based(bd):
                how = ("sysfs", f"{bd.name} is bio-based (no blk-mq requests for the block "
                       "tracepoints): /sys/block counters")
            else:
                try:
                    self.acc.watch(bd)
                    how = ("ebpf", "block tracepoints ("
                           + ("block_rq_complete only, " if self.acc.completion_only() else "")
                           + f"{self.acc.attach})")
                except (AgentError, OSError) as e:
                    how = ("sysfs", f"eBPF cannot watch {bd.name}: {e}")
        self._how[bd.dev] = how
        return how

    def remove(self, bd: BlockDevice) -> None:
        how = self._how.pop(bd.dev, None)
        if how is not None and how[0] == "ebpf" and self.acc is not None:
            with contextlib.suppress(AgentError, OSError):
                self.acc.unwatch(bd)

    def read(self, bd: BlockDevice) -> Counters:
        how = self._how.get(bd.dev) or self.add(bd)
        if how[0] == "ebpf" and self.acc is not None:
            return counters_of(self.acc.stats(bd))
        return counters_of(sysfs_stats(bd))

    def close(self) -> None:
        if self.acc is not None:
            self.acc.close()
            self.acc = None


def difference(prev: Counters, cur: Counters, ts: float, seconds: float) -> Sample | None:
    """The interval between two readings; None when a counter went backwards
    (the device was re-created or re-watched: start again from ``cur``)."""
    ios = cur.ios - prev.ios
    nbytes = cur.bytes - prev.bytes
    lat = cur.latency_ns - prev.latency_ns
    if ios < 0 or nbytes < 0 or lat < 0 or seconds <= 0:
        return None
    errors = 0
    if cur.errors is not None and prev.errors is not None:
        errors = max(cur.errors - prev.errors, 0)
    return Sample(ts=ts, seconds=seconds, ios=ios, bytes=nbytes,
                  latency_us=lat / ios / 1e3 if ios else float("nan"), errors=errors)


class SampleRing:
    """The last ``capacity`` samples of one drive, in preallocated arrays."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.ts = np.full(capacity, -np.inf)
        self.latency_us = np.full(capacity, np.nan)
        self.throughput = np.zeros(capacity)
        self.ios = np.zeros(capacity, dtype=np.int64)
        self.errors = np.zeros(capacity, dtype=np.int64)
        self.count = 0          # samples ever added

    def add(self, s: Sample) -> None:
        i = self.count % self.capacity
        self.ts[i] = s.ts
        self.latency_us[i] = s.latency_us
        self.throughput[i] = s.throughput_bps
        self.ios[i] = s.ios
        self.errors[i] = s.errors
        self.count += 1

    def window(self, since: float) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(ts, latency_us, throughput) of the samples after ``since`` that saw I/O."""
        keep = (self.ts > since) & (self.ios > 0) & ~np.isnan(self.latency_us)
        order = np.argsort(self.ts[keep], kind="stable")
        return self.ts[keep][order], self.latency_us[keep][order], self.throughput[keep][order]

    def errors_since(self, since: float) -> int:
        return int(self.errors[self.ts > since].sum())


def sysfs_exists(bd: BlockDevice) -> bool:
    return Path(bd.sysfs / "stat").exists()
