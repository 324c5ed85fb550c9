"""The kernel agent: eBPF accounting of user-space block drivers, an extension
registry, and a validated recommendation channel (see docs/agent.md).

Public API re-exported here; the implementation lives in the submodules.
"""

from kernel_agent.accounting import (
    BlockDevice,
    BlockEvent,
    BpfAccounting,
    DeviceStats,
    PinnedAccounting,
    bpf_unavailable_reason,
    resolve_device,
    sysfs_stats,
)
from kernel_agent.agent import Agent
from kernel_agent.errors import (
    AgentError,
    BpfUnavailableError,
    RegistryError,
    RingError,
    UnknownDeviceError,
)
from kernel_agent.registry import Extension, Registry
from kernel_agent.ring import Channel, Completion, Recommendation, Status
from kernel_agent.validator import Mode, Policy, Validator

__all__ = [
    "Agent",
    "AgentError",
    "BlockDevice",
    "BlockEvent",
    "BpfAccounting",
    "BpfUnavailableError",
    "Channel",
    "Completion",
    "DeviceStats",
    "Extension",
    "Mode",
    "PinnedAccounting",
    "Policy",
    "Recommendation",
    "Registry",
    "RegistryError",
    "RingError",
    "Status",
    "UnknownDeviceError",
    "Validator",
    "bpf_unavailable_reason",
    "resolve_device",
    "sysfs_stats",
]
