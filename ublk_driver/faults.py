"""Fault injection specs: what the engine does to one completion path.

A :class:`FaultSpec` is the user's side of ``struct ublkml_fault``
(``csrc/ublkml.h``): a fixed delay, a slowdown of the measured service time,
a schedule (constant, bursts, a ramp) and seeded errors.  It parses from the
command line's compact form::

    delay=2ms,slow=10,burst=1s/200ms,errors=0.01,ops=read+write,errno=EIO,seed=1

and travels as JSON (``to_dict``/``from_dict``) over the admin socket.
Values are kept at the engine's resolution (delay in microseconds, schedule
in milliseconds, errors in parts per million, slowdown in thousandths), so
``parse(str(spec)) == spec`` and ``from_dict(to_dict(spec)) == spec``.
"""

from __future__ import annotations

import errno as _errno
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ublk_driver.core.errors import ConfigError
from ublk_driver.uapi import Op

MODES = ("const", "burst", "ramp")
#: operations an injected error may hit, in ublk's order
OPS = ("read", "write", "flush", "discard", "write_zeroes")
_OP_CODES = {"read": Op.READ, "write": Op.WRITE, "flush": Op.FLUSH, "discard": Op.DISCARD,
             "write_zeroes": Op.WRITE_ZEROES}
_U32 = (1 << 32) - 1
MAX_SLOW = 1000.0
_UNITS_US = {"us": 1, "ms": 1000, "s": 1_000_000, "m": 60_000_000}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(us|ms|s|m)$")
_KEYS = "delay, slow, burst, ramp, errors, ops, errno, seed"


def _duration_us(key: str, text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"fault {key}={text!r}: give a duration with a unit, "
                          "for example 500us, 2ms, 1.5s or 1m")
    return round(float(m.group(1)) * _UNITS_US[m.group(2)])


def _duration_ms(key: str, text: str) -> int:
    us = _duration_us(key, text)
    if us % 1000:
        raise ConfigError(f"fault {key}={text!r}: schedules have millisecond resolution")
    return us // 1000


def _fmt_us(us: int) -> str:
    for unit in ("s", "ms"):
        if us and us % _UNITS_US[unit] == 0:
            return f"{us // _UNITS_US[unit]}{unit}"
    return f"{us}us"


def _fmt_ms(ms: int) -> str:
    return _fmt_us(ms * 1000)


def _errno_value(text: str | int) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str):
        name = text.strip().upper()
        if name.isdigit():
            return int(name)
        value = getattr(_errno, name, None)
        if isinstance(value, int) and name.startswith("E"):
            return value
    raise ConfigError(f"fault errno={text!r}: give an errno name such as EIO or ENOSPC, "
                      "or its number")


def _errno_name(value: int) -> str | int:
    return _errno.errorcode.get(value, value)


@dataclass(frozen=True)
class FaultSpec:
    """A fault on one completion path (a mirror leg, or path 0 of null/mem/loop).

    The schedule's intensity d (const: 1; burst: 1 during the first
    ``burst_on_ms`` of every ``burst_period_ms``, else 0; ramp: growing from
    0 to 1 over ``ramp_ms``) scales the delay, the slowdown and the error
    rate.  The clock starts when the fault is set.
    """

    delay_us: int = 0
    slow: float = 1.0            # service time multiplier (10 = ten times slower)
    mode: str = "const"
    burst_period_ms: int = 0
    burst_on_ms: int = 0
    ramp_ms: int = 0
    error_ppm: int = 0           # error probability per I/O, parts per million
    ops: tuple[str, ...] = OPS   # which operations injected errors hit
    errno: int = _errno.EIO
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"fault: {msg}")

        for name in ("delay_us", "burst_period_ms", "burst_on_ms", "ramp_ms", "error_ppm",
                     "errno", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool),
                 f"{name} must be an integer, got {v!r}")
        need(0 <= self.delay_us <= _U32, f"delay must be 0..{_U32} us, got {self.delay_us}")
        need(isinstance(self.slow, (int, float)) and not isinstance(self.slow, bool)
             and math.isfinite(self.slow) and 1.0 <= self.slow <= MAX_SLOW,
             f"slow must be a factor from 1 to {MAX_SLOW:g}, got {self.slow!r}")
        # The engine keeps thousandths: so does the spec, for exact round trips.
        object.__setattr__(self, "slow", round(float(self.slow) * 1000) / 1000)
        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "burst":
            need(0 < self.burst_on_ms <= self.burst_period_ms <= _U32,
                 "burst=PERIOD/ON needs 0 < ON <= PERIOD, for example burst=1s/200ms")
        else:
            need(self.burst_period_ms == 0 and self.burst_on_ms == 0,
                 f"burst times given but mode is {self.mode!r}")
        if self.mode == "ramp":
            need(0 < self.ramp_ms <= _U32, "ramp needs a positive duration, e.g. ramp=30s")
        else:
            need(self.ramp_ms == 0, f"ramp time given but mode is {self.mode!r}")
        need(0 <= self.error_ppm <= 1_000_000,
             f"error rate must be 0..1 (0..1000000 ppm), got {self.error_ppm} ppm")
        ops = tuple(self.ops) if not isinstance(self.ops, str) else (self.ops,)
        bad = [o for o in ops if o not in OPS]
        need(not bad, f"unknown operation(s) {', '.join(map(str, bad))}: use "
             f"{'+'.join(OPS)} or all")
        need(bool(ops), "ops must name at least one operation")
        object.__setattr__(self, "ops", tuple(o for o in OPS if o in ops))
        need(1 <= self.errno <= 4095, f"errno must be 1..4095, got {self.errno}")
        need(0 <= self.seed < 1 << 64, f"seed must be 0..2^64-1, got {self.seed}")

    # ---- the compact form -------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """``delay=2ms,slow=10,burst=1s/200ms|ramp=30s,errors=0.01,ops=read+write,...``"""
        kw: dict[str, Any] = {}
        seen: set[str] = set()
        items = [p.strip() for p in text.split(",") if p.strip()]
        if not items:
            raise ConfigError(f"empty fault spec: give KEY=VALUE items ({_KEYS}), "
                              "for example delay=2ms,errors=0.01")
        for item in items:
            key, sep, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or not value:
                raise ConfigError(f"fault spec item {item!r}: expected KEY=VALUE ({_KEYS})")
            if key in seen:
                raise ConfigError(f"fault spec gives {key} twice")
            seen.add(key)
            if key == "delay":
                kw["delay_us"] = _duration_us(key, value)
            elif key == "slow":
                try:
                    kw["slow"] = float(value.rstrip("xX"))
                except ValueError:
                    raise ConfigError(f"fault slow={value!r}: give a factor such as 10 "
                                      "(ten times the service time)") from None
            elif key == "burst":
                period, slash, on = value.partition("/")
                if not slash:
                    raise ConfigError(f"fault burst={value!r}: give PERIOD/ON, for example "
                                      "burst=1s/200ms (200 ms on in every second)")
                kw["burst_period_ms"] = _duration_ms(key, period)
                kw["burst_on_ms"] = _duration_ms(key, on)
                kw["mode"] = "burst"
            elif key == "ramp":
                kw["ramp_ms"] = _duration_ms(key, value)
                kw["mode"] = "ramp"
            elif key == "errors":
                kw["error_ppm"] = _rate_ppm(value)
            elif key == "ops":
                names = [o.strip().lower().replace("-", "_") for o in value.split("+")]
                kw["ops"] = OPS if names == ["all"] else tuple(names)
            elif key == "errno":
                kw["errno"] = _errno_value(value)
            elif key == "seed":
                try:
                    kw["seed"] = int(value, 0)
                except ValueError:
                    raise ConfigError(f"fault seed={value!r}: give an integer") from None
            else:
                raise ConfigError(f"unknown fault setting {key!r}: use {_KEYS}")
        if "burst" in seen and "ramp" in seen:
            raise ConfigError("a fault has one schedule: burst=... or ramp=..., not both")
        return cls(**kw)

    def __str__(self) -> str:
        parts = []
        if self.delay_us:
            parts.append(f"delay={_fmt_us(self.delay_us)}")
        if self.slow != 1.0:
            parts.append(f"slow={self.slow:g}")
        if self.mode == "burst":
            parts.append(f"burst={_fmt_ms(self.burst_period_ms)}/{_fmt_ms(self.burst_on_ms)}")
        if self.mode == "ramp":
            parts.append(f"ramp={_fmt_ms(self.ramp_ms)}")
        if self.error_ppm:
            parts.append(f"errors={self.error_ppm / 1e6!r}")
        if self.ops != OPS:
            parts.append("ops=" + "+".join(self.ops))
        if self.errno != _errno.EIO:
            parts.append(f"errno={_errno_name(self.errno)}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        return ",".join(parts) or "delay=0us"

    # ---- JSON -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ops"] = list(self.ops)
        d["errno"] = _errno_name(self.errno)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a fault spec is a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown fault field(s) {', '.join(map(str, unknown))}: "
                              f"known are {', '.join(sorted(names))}")
        kw = dict(data)
        if "ops" in kw:
            ops = kw["ops"]
            if isinstance(ops, str) or not isinstance(ops, (list, tuple)):
                raise ConfigError(f"fault ops must be a list of names, got {ops!r}")
            kw["ops"] = tuple(ops)
        if "errno" in kw:
            kw["errno"] = _errno_value(kw["errno"])
        return cls(**kw)

    # ---- the engine's struct -------------------------------------------------------

    def to_c(self) -> dict[str, int]:
        """The fields of ``struct ublkml_fault`` (for ``_bindings.CTarget.set_fault``)."""
        mask = 0
        for o in self.ops:
            mask |= 1 << int(_OP_CODES[o])
        return {"delay_us": self.delay_us, "slow_x1000": round(self.slow * 1000),
                "mode": MODES.index(self.mode), "burst_period_ms": self.burst_period_ms,
                "burst_on_ms": self.burst_on_ms, "ramp_ms": self.ramp_ms,
                "err_ppm": self.error_ppm, "err_ops": mask, "err_errno": self.errno,
                "seed": self.seed}

    @classmethod
    def from_c(cls, c: Mapping[str, int]) -> FaultSpec:
        mask = c["err_ops"]
        ops = OPS if mask == 0 else tuple(o for o in OPS if mask & 1 << int(_OP_CODES[o]))
        return cls(delay_us=c["delay_us"], slow=max(c["slow_x1000"], 1000) / 1000,
                   mode=MODES[c["mode"]], burst_period_ms=c["burst_period_ms"],
                   burst_on_ms=c["burst_on_ms"], ramp_ms=c["ramp_ms"], error_ppm=c["err_ppm"],
                   ops=ops, errno=c["err_errno"] or _errno.EIO, seed=c["seed"])


def _rate_ppm(text: str) -> int:
    t = text.strip()
    try:
        if t.endswith("%"):
            rate = float(t[:-1]) / 100
        elif t.lower().endswith("ppm"):
            rate = float(t[:-3]) / 1e6
        else:
            rate = float(t)
    except ValueError:
        rate = -1.0
    if not (math.isfinite(rate) and 0 <= rate <= 1):
        raise ConfigError(f"fault errors={text!r}: give a probability per I/O from 0 to 1, "
                          "a percentage (1%) or parts per million (50ppm)")
    ppm = round(rate * 1e6)
    if rate > 0 and ppm == 0:
        raise ConfigError(f"fault errors={text!r}: below one per million, the engine's "
                          "resolution")
    return ppm
