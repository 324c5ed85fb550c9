"""The validator: every rule rejects with a reason, and no input makes it raise."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kernel_agent.accounting import BlockDevice
from kernel_agent.actions import ActionSpec, QueueKnob, default_actions, no_channel
from kernel_agent.ring import Recommendation, Status
from kernel_agent.validator import Mode, Policy, Validator, WatchedDevice

NOW = 1_000_000_000_000


def fake_sysfs(tmp: Path) -> dict[str, ActionSpec]:
    """The real allow-list, pointed at a directory shaped like /sys/block."""
    q = tmp / "sdz" / "queue"
    q.mkdir(parents=True, exist_ok=True)
    (q / "read_ahead_kb").write_text("128\n")
    (q / "nr_requests").write_text("64\n")
    (q / "scheduler").write_text("[none] mq-deadline\n")
    specs = default_actions(throttle=None, channel_for=no_channel)
    out = {}
    for name, s in specs.items():
        if isinstance(s.applier, QueueKnob):
            s = ActionSpec(s.name, QueueKnob(s.applier.knob, str(tmp)), s.lo, s.hi, s.choices)
        out[name] = s
    return out


def make(tmp: Path, policy: Policy | None = None) -> tuple[Validator, dict[str, WatchedDevice]]:
    t = [0.0]

    def mono() -> float:
        t[0] += 0.001
        return t[0]

    v = Validator(fake_sysfs(tmp), policy or Policy(), clock_ns=lambda: NOW, monotonic=mono)
    devs = {"sdz": WatchedDevice(BlockDevice("sdz", 8, 400), Mode.ENFORCE)}
    return v, devs


def rec(**kw: object) -> Recommendation:
    base: dict[str, object] = dict(device="sdz", action="read_ahead_kb", value="256",
                                   confidence=0.9, model="m", ttl_ms=1000, ext_id=1, seq=1,
                                   created_ns=NOW)
    base.update(kw)
    return Recommendation(**base)  # type: ignore[arg-type]


def test_valid_and_each_rejection(tmp_path: Path) -> None:
    v, devs = make(tmp_path)
    assert v.check(rec(), 1, devs).status is Status.APPLIED
    cases = {
        "out of bounds": rec(value="999999"),
        "needs an integer": rec(value="12abc"),
        "not allowed": rec(action="rm_rf"),
        "unknown device": rec(device="sdq"),
        "expired": rec(created_ns=NOW - 2_000_000_000),
        "below the floor": rec(confidence=0.1),
        "above 1": rec(confidence=1.5),
        "ttl_ms": rec(ttl_ms=0),
        "ring of extension": rec(ext_id=2),
        "not one of": rec(action="scheduler", value="cfq"),
        "offers schedulers": rec(action="scheduler", value="bfq"),
        "no admin socket": rec(action="demote_leg", value="1"),
        "no queue/wbt_lat_usec": rec(action="wbt_lat_usec", value="100"),
        "no cgroup I/O throttling": rec(action="throttle_read_bps", value="1000"),
    }
    for why, r in cases.items():
        verdict = v.check(r, 1, devs)
        assert verdict.status is Status.REJECTED, why
        assert why in verdict.reason, (why, verdict.reason)
    assert v.check(rec(action="scheduler", value="mq-deadline"), 1, devs).status is \
        Status.APPLIED


def test_modes(tmp_path: Path) -> None:
    v, devs = make(tmp_path)
    bd = devs["sdz"].bd
    devs["sdz"] = WatchedDevice(bd, Mode.OBSERVE)
    assert v.check(rec(), 1, devs).status is Status.OBSERVED
    devs["sdz"] = WatchedDevice(bd, Mode.RECOMMEND)
    assert v.check(rec(), 1, devs).status is Status.RECOMMENDED
    assert v.check(rec(value="-1"), 1, devs).status is Status.REJECTED


def test_flood_is_rate_limited_per_extension(tmp_path: Path) -> None:
    v, devs = make(tmp_path, Policy(rate_per_s=1.0, burst=10))
    verdicts = [v.check(rec(), 1, devs) for _ in range(50)]
    ok = [x for x in verdicts if x.status is Status.APPLIED]
    limited = [x for x in verdicts if "rate limit" in x.reason]
    assert len(ok) == 10 and len(limited) == 40
    # Another extension has its own bucket.
    assert v.check(rec(ext_id=2), 2, devs).status is Status.APPLIED


@given(st.builds(Recommendation, device=st.text(max_size=10), action=st.text(max_size=20),
                 value=st.text(max_size=25), confidence=st.floats(),
                 model=st.text(max_size=5), ttl_ms=st.integers(-5, 2**32),
                 ext_id=st.integers(0, 3), seq=st.integers(0, 9),
                 created_ns=st.integers(0, 2**64)),
       st.sampled_from(["read_ahead_kb", "nr_requests", "scheduler", "sdz"]))
def test_never_raises(r: Recommendation, _hint: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        v, devs = make(Path(d))
        verdict = v.check(r, 1, devs)
    assert verdict.status in (Status.APPLIED, Status.REJECTED, Status.OBSERVED)
    if verdict.status is Status.APPLIED:
        assert verdict.spec is not None and verdict.spec.why_invalid(verdict.value) is None
        assert 0.5 <= r.confidence <= 1.0 and r.device == "sdz"
