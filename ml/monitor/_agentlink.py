"""The monitor's link to the kernel agent: registration, recommendations, the alert log.

The monitor registers as an extension of class ``monitor`` (one per host:
:data:`kernel_agent.registry.DEFAULT_LIMITS`), lazily and again after a
failure, since the agent may start after the monitor.  A registration left
behind by a monitor that died while no agent ran to unregister it is removed
first (its pid no longer runs the process that registered).

Recommendations (``demote_leg`` of a mirror leg whose drive fails) go the way
every extension's go (:meth:`kernel_agent.link.ExtensionLink.submit`: the
kernel's eBPF checker where the agent runs it) and are validated like any
other.  A device is leased to its owner (its server or leg policy), so the
monitor *claims* a share of the lease of every ublk device whose drives it
watches (:meth:`AgentLink.claim`, from the monitor's topology; sent at
registration and whenever it changes); the agent grants a claim on a device
it watches.  The
submission record has no room for prose, so the reason travels in its
``model`` field in short (``monitor:smart``) and in full in the alert log,
``<agent dir>/monitor.jsonl`` (:class:`kernel_agent.eventlog.JsonLinesLog`,
next to the agent's ``events.jsonl`` and ``audit.jsonl``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from kernel_agent.errors import AgentError
from kernel_agent.eventlog import JsonLinesLog
from kernel_agent.link import ExtensionLink
from kernel_agent.registry import Registry, proc_starttime
from kernel_agent.ring import Recommendation

log = logging.getLogger("ublkml.ml.monitor")

CLASS = "monitor"


@dataclass
class Sent:
    seq: int
    device: str
    action: str
    value: str
    drive: str
    status: str = "sent"
    reason: str = ""


class AgentLink:
    """Registration with the agent, its ring, and the alert log."""

    def __init__(self, agent_dir: str | None = None, ttl_ms: int = 10_000,
                 retry_s: float = 10.0, enabled: bool = True) -> None:
        self.link = ExtensionLink(CLASS, agent_dir, retry_s)
        self.registry = self.link.registry
        self.ttl_ms = ttl_ms
        self.enabled = enabled
        self.note = "not registered with the kernel agent yet" if enabled else \
            "recommendations disabled (--no-agent)"
        self.sent: dict[int, Sent] = {}
        self.claims: list[str] = []          # the devices it asks to share leases of
        self._claimed: list[str] | None = None   # what the registry holds for it
        self._log: JsonLinesLog | None = None
        self.log_path: str | None = None
        try:
            self._log = JsonLinesLog(self.registry.root / "monitor.jsonl")
            self.log_path = str(self.registry.root / "monitor.jsonl")
        except OSError as e:
            log.warning("monitor: no alert log in %s: %s", self.registry.root, e)

    def write_log(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            try:
                self._log.write(record)
            except OSError as e:
                log.warning("monitor: cannot write the alert log: %s", e)

    @property
    def ext_id(self) -> int | None:
        return self.link.ext_id

    def connect(self, model: str) -> bool:
        if not self.enabled:
            return False
        if self.link.channel is not None:
            return True
        params = {"pid": str(os.getpid()), "model": model[:60]}
        if self.claims:
            params["claims"] = ",".join(self.claims)
        why = self.link.connect(params, before_add=_drop_dead_monitors)
        if why is not None:
            self.note = why
            return False
        ext_id = self.link.ext_id
        self._claimed = list(self.claims)
        self.note = f"registered with the kernel agent as extension {ext_id}"
        self.write_log({"type": "monitor", "what": "registered", "ext": ext_id,
                        "pid": os.getpid()})
        return True

    def claim(self, devices: list[str]) -> None:
        """Share the leases of ``devices`` (the ublk devices whose drives the monitor
        watches): with the eBPF checker, only a device's lease holders may act on it.
        Sent now when registered, else with the registration."""
        self.claims = sorted(set(devices))
        if not self.enabled or self.link.ext_id is None or self._claimed == self.claims:
            return
        try:
            self.registry.claim(self.link.ext_id, self.claims)
        except (AgentError, OSError) as e:
            self.note = f"cannot claim {', '.join(self.claims)}: {e}"
            return
        self._claimed = list(self.claims)
        self.write_log({"type": "monitor", "what": "claims", "ext": self.link.ext_id,
                        "devices": self.claims})

    def recommend(self, device: str, action: str, value: str, confidence: float,
                  why: str, drive: str, model: str) -> Sent | str:
        """Submit one recommendation; what was sent, or why nothing was."""
        if not self.connect(model):
            return self.note
        try:
            rec = self.link.submit(Recommendation(
                device=device, action=action, value=value,
                confidence=max(0.5, min(1.0, confidence)), model=f"monitor:{why}"[:64],
                ttl_ms=self.ttl_ms, ext_id=self.ext_id or 0))
        except (AgentError, OSError) as e:
            return f"not sent: {e}"
        if rec is None:
            return "the agent's submission ring is full (is the agent stuck?)"
        sent = Sent(int(rec.seq), device, action, value, drive)
        self.sent[sent.seq] = sent
        while len(self.sent) > 256:  # answers that never came: keep the newest
            self.sent.pop(next(iter(self.sent)))
        return sent

    def answers(self) -> list[Sent]:
        """Recommendations the agent answered since the last call."""
        if self.link.channel is None:
            return []
        out = []
        try:
            completions = self.link.channel.completions()
        except (AgentError, OSError) as e:
            self.note = f"the agent's ring became unusable: {e}"
            self.link.drop_channel()
            return []
        for c in completions:
            s = self.sent.get(c.seq)
            if s is None:
                continue
            s.status, s.reason = c.status.name.lower(), c.reason
            out.append(s)
        return out

    def close(self) -> None:
        self.link.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def _drop_dead_monitors(registry: Registry) -> None:
    """A registration left by a monitor that died while no agent ran to remove it."""
    for e in registry.extensions():
        if e.cls == CLASS and e.state == "live" and proc_starttime(e.pid) != e.starttime:
            registry.remove(e.id)
