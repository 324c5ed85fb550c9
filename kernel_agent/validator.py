"""Validation of recommendations: every check, in order, with a reason.

:meth:`Validator.check` never raises for any input (a property test feeds it
arbitrary recommendations); it returns a :class:`Verdict`.  The checks, in the
order they run:

1. rate limit per extension (a token bucket; every submission costs a token,
   valid or not, so a flood of garbage is throttled like a flood of good ones);
2. the record's extension id is the ring owner's;
3. not expired (``created_ns + ttl_ms`` is in the future; ``ttl_ms`` > 0);
4. confidence within [floor, 1];
5. the device is watched by the agent, and its mode (observe / recommend /
   enforce) decides what happens to a valid recommendation;
6. the action is in the allow-list, its value parses and is within bounds, and
   the device offers it (e.g. a scheduler it does not have).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from kernel_agent.accounting import BlockDevice
from kernel_agent.actions import ActionSpec, QueueKnob
from kernel_agent.ring import Recommendation, Status


class Mode(StrEnum):
    """What the agent does with a valid recommendation for a device."""

    OBSERVE = "observe"      # account only; recommendations are logged, not validated further
    RECOMMEND = "recommend"  # validate and log for an operator; change nothing
    ENFORCE = "enforce"      # validate, apply, check the effect, roll back on regression


@dataclass
class TokenBucket:
    rate: float     # tokens per second
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Policy:
    confidence_floor: float = 0.5
    rate_per_s: float = 5.0
    burst: int = 20
    max_ttl_ms: int = 3_600_000


@dataclass(frozen=True)
class WatchedDevice:
    bd: BlockDevice
    mode: Mode


@dataclass(frozen=True)
class Verdict:
    """``status`` is REJECTED, OBSERVED, RECOMMENDED or APPLIED (= go ahead)."""

    status: Status
    reason: str
    spec: ActionSpec | None = None
    device: WatchedDevice | None = None
    value: str = ""


@dataclass
class Validator:
    actions: Mapping[str, ActionSpec]
    policy: Policy = field(default_factory=Policy)
    clock_ns: Callable[[], int] = time.time_ns
    monotonic: Callable[[], float] = time.monotonic
    _buckets: dict[int, TokenBucket] = field(default_factory=dict)

    def check(self, rec: Recommendation, owner: int,
              devices: Mapping[str, WatchedDevice], policy: Policy | None = None) -> Verdict:
        """``policy``: the owner's own (its class's), else :attr:`policy`."""
        def reject(reason: str) -> Verdict:
            return Verdict(Status.REJECTED, reason)

        p = policy or self.policy
        bucket = self._buckets.setdefault(owner, TokenBucket(p.rate_per_s, float(p.burst)))
        if not bucket.take(self.monotonic()):
            return reject(f"rate limit: more than {p.rate_per_s:g}/s "
                          f"(burst {p.burst}) from extension {owner}")
        if rec.ext_id != owner:
            return reject(f"extension id {rec.ext_id} in the ring of extension {owner}")
        if rec.ttl_ms <= 0 or rec.ttl_ms > p.max_ttl_ms:
            return reject(f"ttl_ms {rec.ttl_ms} not in (0, {p.max_ttl_ms}]")
        if rec.expired(self.clock_ns()):
            return reject("expired before the agent read it")
        if not rec.confidence <= 1.0:
            return reject(f"confidence {rec.confidence} above 1")
        if rec.confidence < p.confidence_floor:
            return reject(f"confidence {rec.confidence:.3f} below the floor "
                          f"{p.confidence_floor:g}")
        dev = devices.get(rec.device)
        if dev is None:
            return reject(f"unknown device {rec.device!r} (not watched by the agent)")
        if dev.mode is Mode.OBSERVE:
            return Verdict(Status.OBSERVED, f"{dev.bd.name} is in observe mode", device=dev)
        return self.finish(rec, dev)

    def finish(self, rec: Recommendation, dev: WatchedDevice) -> Verdict:
        """Check 6 alone, for a device in recommend or enforce mode: the action, its
        value, and whether the device offers it.  The eBPF checker's verdicts come
        here too: the kernel has no strings, so what the device offers is read here."""
        def reject(reason: str) -> Verdict:
            return Verdict(Status.REJECTED, reason)

        spec = self.actions.get(rec.action)
        if spec is None:
            return reject(f"action {rec.action!r} is not allowed "
                          f"(allowed: {', '.join(sorted(self.actions))})")
        why = spec.why_invalid(rec.value)
        if why:
            return reject(why)
        value = spec.canonical(rec.value)
        try:
            why = spec.applier.available(dev.bd)
            if why is None and isinstance(spec.applier, QueueKnob) and spec.choices:
                offered = spec.applier.choices(dev.bd)
                if value not in offered:
                    why = f"{dev.bd.name} offers schedulers {offered}, not {value!r}"
        except OSError as e:
            why = f"cannot inspect {dev.bd.name}: {e.strerror}"
        if why:
            return reject(why)
        if dev.mode is Mode.RECOMMEND:
            return Verdict(Status.RECOMMENDED, f"valid; {dev.bd.name} is in recommend mode",
                           spec, dev, value)
        return Verdict(Status.APPLIED, "valid", spec, dev, value)
