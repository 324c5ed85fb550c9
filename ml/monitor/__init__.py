"""The host-wide drive monitor: every drive under every ublkml device, watched for
fail-slow and failure (docs/monitor.md).

It runs as its own process (``ublkml monitor run``): a model that crashes,
hangs or leaks stops the monitor, never a device.  Each interval it reads the
kernel's counters of every drive (eBPF on the block tracepoints, or
``/sys/block/X/stat``), keeps a window of samples per drive in a ring, turns
the windows into features, scores all drives with one onnxruntime call -
against their peers (the other drives of the host) or, for a drive alone,
against its own healthy baseline - and reads SMART on a schedule and after I/O
errors.  Verdicts go to ``$UBLKML_STATE_DIR/monitor.json``, the alert log in
the agent's directory, and, for a failing mirror leg, a ``demote_leg``
recommendation through the kernel agent.
"""

from ml.monitor._agentlink import AgentLink
from ml.monitor._drives import (
    DeviceInfo,
    PathInfo,
    Topology,
    Use,
    build_topology,
    device_ids,
    paths_of,
    whole_device,
)
from ml.monitor._judge import Baseline, BaselineFit, WindowVerdict, fit_baseline, judge
from ml.monitor._monitor import (
    STATE_FILE,
    STATE_VERSION,
    Monitor,
    MonitorConfig,
    MonitorError,
    monitor_alive,
    read_state,
    state_file,
)
from ml.monitor._samples import Counters, CounterSource, Sample, SampleRing, difference
from ml.monitor._smartpoll import SmartPoller, SmartResult

__all__ = [
    "STATE_FILE",
    "STATE_VERSION",
    "AgentLink",
    "Baseline",
    "BaselineFit",
    "CounterSource",
    "Counters",
    "DeviceInfo",
    "Monitor",
    "MonitorConfig",
    "MonitorError",
    "PathInfo",
    "Sample",
    "SampleRing",
    "SmartPoller",
    "SmartResult",
    "Topology",
    "Use",
    "WindowVerdict",
    "build_topology",
    "device_ids",
    "difference",
    "fit_baseline",
    "judge",
    "monitor_alive",
    "paths_of",
    "read_state",
    "state_file",
    "whole_device",
]
