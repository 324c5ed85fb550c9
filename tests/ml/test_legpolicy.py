"""The leg policy's state machine (hypothesis) and its road through the kernel agent.

The agent and its rings are real (``kernel_agent.agent.Agent`` without eBPF);
behind the control socket is tests/ublk_driver/admin/doubles.py's FakeServer, as
in tests/kernel_agent/test_control_channel.py.  The watched device is one of
this host's block devices (the agent reads its /sys/block stat); its driver
actions go to the fake's socket: nothing here needs the ublk driver.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kernel_agent.actions import UblkControlChannel, default_actions
from kernel_agent.agent import Agent
from kernel_agent.registry import Registry
from ml.legpolicy import (
    PROBE_TAG,
    AgentSink,
    LegController,
    LegPolicy,
    LegPolicyError,
    LegState,
    PolicyConfig,
    Request,
    read_events,
    summary,
)
from tests.ublk_driver.admin.doubles import Served, serve
from ublk_driver.records import COMPLETION_DTYPE, RECORD_PROBED

CFG = PolicyConfig(demote_after=3, readmit_hold_s=5.0, min_health_samples=5, min_dwell_s=10.0,
                   dwell_backoff=2.0, max_dwell_s=80.0, flap_window_s=60.0,
                   answer_timeout_s=5.0, retry_after_s=5.0, resync_timeout_s=30.0,
                   settle_ticks=0)   # these tests call verdict() without tick()
TICK = 0.1
TTL_S = 2.0   # AgentSink's default ttl_ms


def flag(p: LegPolicy, leg: int, n: int, t: float, flagged: bool = True) -> tuple[
        list[Request], float]:
    out = []
    for _ in range(n):
        t += TICK
        r = p.verdict(leg, 0.9 if flagged else 0.1, flagged, t)
        if r:
            out.append(r)
    return out, t


# ---- unit -----------------------------------------------------------------------


def test_demotes_after_k_consecutive_flags_and_only_then() -> None:
    p = LegPolicy(2, CFG)
    reqs, t = flag(p, 1, 2, 0.0)
    assert reqs == [] and p.state(1) is LegState.ACTIVE
    reqs, t = flag(p, 1, 1, t)
    assert [(r.action, r.leg) for r in reqs] == [("demote_leg", 1)]
    assert reqs[0].confidence == pytest.approx(0.9)
    assert p.state(1) is LegState.DEMOTING
    p.answer(1, "demote_leg", True, t)
    assert p.state(1) is LegState.DEMOTED


def test_an_unconfident_flag_is_watched_not_sent() -> None:
    p = LegPolicy(2, CFG)
    t = 0.0
    for score in (0.45, 0.47, 0.48, 0.49):    # flagged (threshold 0.39), below the floor
        t += TICK
        assert p.verdict(1, score, True, t) is None
    r = p.verdict(1, 0.93, True, t + TICK)
    assert r is not None and r.confidence == 0.93 and "5 ticks in a row" in r.reason


def test_never_demotes_the_last_active_leg() -> None:
    p = LegPolicy(2, CFG)
    reqs, t = flag(p, 0, 3, 0.0)
    p.answer(0, "demote_leg", True, t)
    reqs, t = flag(p, 1, 50, t)
    assert reqs == [] and p.state(1) is LegState.ACTIVE


def test_a_lone_active_leg_builds_no_streak_and_windows_settle() -> None:
    """Flags on the only active leg do not count (it serves every read): when the
    other leg comes back, it takes K fresh flags after the settle time."""
    p = LegPolicy(2, CFG)
    _, t = flag(p, 1, 3, 0.0)
    p.answer(1, "demote_leg", True, t)
    reqs, t = flag(p, 0, 30, t)
    p.observe_states(["active", "active"], t)     # leg 1 back (an operator)
    reqs, t = flag(p, 0, 9, t)                    # within the settle second
    assert reqs == []
    reqs, t = flag(p, 0, 3, t + CFG.settle_s)
    assert [r.action for r in reqs] == ["demote_leg"]


def test_verdicts_wait_a_whole_scorer_window_of_ticks_after_a_change() -> None:
    """Late ticks (a starved machine) stretch the window: seconds alone do not settle it."""
    p = LegPolicy(2, PolicyConfig(settle_s=1.0, settle_ticks=10), states=["active", "demoted"])
    p.observe_states(["active", "active"], 0.0)       # re-admitted
    t = 0.0
    for _ in range(9):                                 # 9 ticks, 0.5 s apart: 4.5 s
        t += 0.5
        for _ in range(3):
            assert p.verdict(1, 0.9, True, t) is None
        p.tick(t)
    assert p.verdict(1, 0.9, True, t) is None and p.streak(1) == 0
    p.tick(t)                                          # the 10th tick
    reqs, _ = flag(p, 1, 3, t)
    assert [r.action for r in reqs] == ["demote_leg"]


def test_a_refused_demotion_is_retried_only_after_a_pause() -> None:
    p = LegPolicy(2, CFG)
    reqs, t = flag(p, 1, 3, 0.0)
    p.answer(1, "demote_leg", False, t)      # observe mode, or rejected
    assert p.state(1) is LegState.ACTIVE
    reqs, t2 = flag(p, 1, 10, t)             # 1 s later: still in the pause
    assert reqs == []
    reqs, _ = flag(p, 1, 50, t2)
    assert len(reqs) == 1 and reqs[0].action == "demote_leg"


def test_readmission_needs_the_hold_and_the_dwell() -> None:
    p = LegPolicy(2, CFG)
    _, t = flag(p, 1, 3, 0.0)
    p.answer(1, "demote_leg", True, t)
    demoted = t
    promoted = None
    while promoted is None and t < 100:
        t += TICK
        r = p.health(1, True, 0.05, t)
        if r:
            promoted = t
            assert r.action == "promote_leg" and r.confidence == pytest.approx(0.95)
    assert promoted is not None and promoted - demoted >= CFG.min_dwell_s
    assert promoted - demoted < CFG.min_dwell_s + 0.2
    assert p.state(1) is LegState.PROMOTING
    p.answer(1, "promote_leg", True, t)
    assert p.state(1) is LegState.PROMOTING        # resync running
    p.observe_states(["active", "demoted"], t + 1)
    assert p.state(1) is LegState.PROMOTING
    p.observe_states(["active", "active"], t + 2)
    assert p.state(1) is LegState.ACTIVE


def test_flagged_probes_restart_the_hold_a_noisy_tick_does_not() -> None:
    p = LegPolicy(2, CFG)
    _, t = flag(p, 1, 3, 0.0)
    p.answer(1, "demote_leg", True, t)
    t += 20  # the dwell is over
    for _ in range(45):
        t += TICK
        assert p.health(1, True, 0.1, t) is None
    # As many flagged ticks in a row as demote an active leg: the hold restarts.
    for _ in range(CFG.demote_after):
        t += TICK
        assert p.health(1, False, 0.9, t) is None
    assert p.hold(1, t) is None
    for _ in range(49):     # 4.9 s since the first healthy tick after the bad ones
        t += TICK
        assert p.health(1, True, 0.1, t) is None
    fired = [p.health(1, True, 0.1, t + i * TICK) for i in (1, 2)]
    assert fired[0] is not None or fired[1] is not None
    # One or two noisy windows in a row do not restart it (a busy machine).
    p2 = LegPolicy(2, CFG)
    _, t = flag(p2, 1, 3, 0.0)
    p2.answer(1, "demote_leg", True, t)
    t += 20
    for i in range(60):
        t += TICK
        noisy = i % 10 in (3, 4)            # 80 % healthy, never 3 flagged in a row
        r = p2.health(1, not noisy, 0.9 if noisy else 0.1, t)
        if r is not None:
            assert r.action == "promote_leg" and r.confidence == pytest.approx(0.9)
            assert 5.0 <= i * TICK <= 5.5, i
            break
    else:
        pytest.fail("never promoted")


def test_mostly_flagged_probes_never_readmit() -> None:
    """Healthy one tick in three (never 3 flagged in a row) is below the 80 % share."""
    p = LegPolicy(2, CFG)
    _, t = flag(p, 1, 3, 0.0)
    p.answer(1, "demote_leg", True, t)
    for i in range(2000):
        t += TICK
        assert p.health(1, i % 3 == 0, 0.5, t) is None
    assert p.state(1) is LegState.DEMOTED


def test_a_relapse_doubles_the_dwell_up_to_the_cap() -> None:
    p = LegPolicy(2, CFG)
    t = 0.0
    dwells = []
    for _ in range(6):
        _, t = flag(p, 1, 3, t)
        p.answer(1, "demote_leg", True, t)
        dwells.append(p.dwell_s(1))
        r = None
        while r is None:
            t += TICK
            assert t < 10_000, "never promoted"
            r = p.health(1, True, 0.1, t)
        p.answer(1, "promote_leg", True, t)
        p.observe_states(["active", "active"], t)
        t += CFG.settle_s     # verdicts are ignored while the scorer's window settles
    assert dwells == [10.0, 20.0, 40.0, 80.0, 80.0, 80.0]
    # A long healthy spell resets it.
    t += CFG.flap_window_s + 1
    _, t = flag(p, 1, 3, t)
    p.answer(1, "demote_leg", True, t)
    assert p.dwell_s(1) == 10.0


def test_unanswered_requests_are_forgotten() -> None:
    p = LegPolicy(2, CFG)
    _, t = flag(p, 1, 3, 0.0)
    p.tick(t + 4.9)
    assert p.state(1) is LegState.DEMOTING
    p.tick(t + 5.1)
    assert p.state(1) is LegState.ACTIVE


def test_books_follow_the_server() -> None:
    p = LegPolicy(3, CFG, states=["active", "demoted", "failed"])
    assert p.states() == [LegState.ACTIVE, LegState.DEMOTED, LegState.FAILED]
    p.observe_states(["demoted", "active", "failed"], 1.0)   # an operator's doing
    assert p.states() == [LegState.DEMOTED, LegState.ACTIVE, LegState.FAILED]
    assert p.verdict(2, 1.0, True, 2.0) is None              # failed legs are not ours


@pytest.mark.parametrize(("kw", "msg"), [
    ({"demote_after": 0}, "demote_after must be >= 1 tick"),
    ({"min_active": 0}, "min_active must be >= 1 leg"),
    ({"min_dwell_s": -1.0}, "min_dwell_s must be >= 0"),
])
def test_bad_config_is_one_line(kw: dict[str, float], msg: str) -> None:
    with pytest.raises(LegPolicyError, match=msg):
        PolicyConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(LegPolicyError, match="2 or more legs"):
        LegPolicy(1)


# ---- properties --------------------------------------------------------------------


@given(st.integers(2, 6), st.booleans())
def test_alternating_verdicts_never_demote(k: int, start: bool) -> None:
    p = LegPolicy(2, PolicyConfig(demote_after=k))
    t = 0.0
    for i in range(500):
        t += TICK
        assert p.verdict(1, 0.9, (i % 2 == 0) == start, t) is None


class LegMachine(RuleBasedStateMachine):
    """A policy against a simulated server that applies or refuses what it is asked."""

    @initialize(legs=st.integers(2, 4))
    def setup(self, legs: int) -> None:
        self.t = 0.0
        self.p = LegPolicy(legs, CFG)
        self.server = ["active"] * legs
        self.pending: list[tuple[float, Request]] = []
        self.promoting: dict[int, float] = {}      # leg -> when the resync finishes
        self.demoted_at: dict[int, float] = {}
        self.history: list[tuple[float, str, int]] = []

    def _handle(self, r: Request | None) -> None:
        if r is not None:
            self.pending.append((self.t, r))
            self.history.append((self.t, r.action, r.leg))

    @rule(leg=st.integers(0, 3), flagged=st.booleans(), score=st.floats(0, 1))
    def verdict(self, leg: int, flagged: bool, score: float) -> None:
        self.t += TICK
        self._handle(self.p.verdict(leg, score, flagged, self.t))

    @rule(leg=st.integers(0, 3), healthy=st.booleans(), score=st.floats(0, 1))
    def probe(self, leg: int, healthy: bool, score: float) -> None:
        self.t += TICK
        self._handle(self.p.health(leg, healthy, score, self.t))

    @rule(seconds=st.floats(0, 30))
    def wait(self, seconds: float) -> None:
        self.t += seconds
        for leg, done in list(self.promoting.items()):
            if self.t >= done:
                self.server[leg] = "active"
                del self.promoting[leg]
        self.p.observe_states(list(self.server), self.t)
        self.p.tick(self.t)

    @rule(apply=st.booleans())
    def agent_answers(self, apply: bool) -> None:
        if not self.pending:
            return
        asked, r = self.pending.pop(0)
        # The agent rejects a recommendation older than its ttl (shorter than
        # the policy's answer timeout, so a forgotten request is never applied).
        ok = apply and self.t - asked <= TTL_S
        if r.action == "demote_leg":
            # The real server refuses to demote its last active leg (EBUSY).
            ok = ok and self.server[r.leg] == "active" and self.server.count("active") > 1
            if ok:
                self.server[r.leg] = "demoted"
        elif ok and self.server[r.leg] == "demoted":
            self.promoting[r.leg] = self.t + 2.0
        self.p.answer(r.leg, r.action, ok, self.t)

    @invariant()
    def never_zero_active_legs(self) -> None:
        if hasattr(self, "server"):
            assert "active" in self.server

    @invariant()
    def books_never_claim_more_than_the_server(self) -> None:
        if not hasattr(self, "server"):
            return
        for leg, s in enumerate(self.p.states()):
            if s is LegState.DEMOTED:
                assert self.server[leg] == "demoted"
            if s is LegState.ACTIVE:
                assert self.server[leg] == "active"

    @invariant()
    def no_flapping(self) -> None:
        """A promotion is asked for at least min_dwell_s after the demotion it undoes."""
        if not hasattr(self, "history"):
            return
        last_demote: dict[int, float] = {}
        for t, action, leg in self.history:
            if action == "demote_leg":
                last_demote[leg] = t
            elif leg in last_demote:
                assert t - last_demote[leg] >= CFG.min_dwell_s - 1e-9


TestLegMachine = LegMachine.TestCase
TestLegMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


# ---- through the agent ---------------------------------------------------------------


@dataclass
class Loop:
    served: Served
    agent: Agent
    root: Path
    device: str


def _host_device() -> str:
    for name in sorted(os.listdir("/sys/block")):
        if os.path.exists(f"/sys/block/{name}/stat"):
            return name
    pytest.fail("no block device in /sys/block to watch")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    with serve() as s:
        root = tmp_path / "agent"
        channel = UblkControlChannel(7, state_dir=s.state_dir)
        actions = default_actions(throttle=None, channel_for=lambda _bd: channel)
        agent = Agent(root, use_bpf=False, actions=actions)
        dev = _host_device()
        Registry(root).watch(dev, mode="enforce")
        agent.sync(force=True)
        assert dev in agent.devices
        try:
            yield Loop(s, agent, root, dev)
        finally:
            agent.close()


def _controller(loop: Loop, tmp_path: Path, **kw: object) -> LegController:
    sink = AgentSink(loop.device, str(loop.root))
    return LegController(2, sink, server=loop.served.fake, config=CFG,
                         log_path=str(tmp_path / "7.legs.jsonl"), **kw)  # type: ignore[arg-type]


def test_demotion_goes_through_the_agent_to_the_server(loop: Loop, tmp_path: Path) -> None:
    ctl = _controller(loop, tmp_path)
    try:
        for _ in range(3):
            ctl.on_verdict(1, 0.97, True)
            ctl.on_tick()
        assert ctl.policy.state(1) is LegState.DEMOTING
        loop.agent.step(0.01)   # adopts the extension; validates; applies over the socket
        loop.agent.step(0.01)
        assert loop.served.fake.legs[1].state == "demoted"
        ctl.on_tick()
        assert ctl.policy.state(1) is LegState.DEMOTED
    finally:
        ctl.close()
    events = read_events(str(tmp_path / "7.legs.jsonl"))
    answers = [e for e in events if e["event"] == "answer"]
    assert answers[0]["status"] == "applied" and answers[0]["action"] == "demote_leg"
    assert summary(events) == {"demotions": 1, "promotions": 0}
    assert Registry(loop.root).extensions() == []   # unregistered on close


def test_observe_mode_changes_nothing(loop: Loop, tmp_path: Path) -> None:
    Registry(loop.root).watch(loop.device, mode="observe")
    loop.agent.sync()
    ctl = _controller(loop, tmp_path)
    try:
        for _ in range(3):
            ctl.on_verdict(1, 0.97, True)
        loop.agent.step(0.01)
        loop.agent.step(0.01)
        ctl.on_tick()
        assert loop.served.fake.legs[1].state == "active"
        assert ctl.policy.state(1) is LegState.ACTIVE
        assert ctl.events[-1]["status"] == "observed"
    finally:
        ctl.close()


def test_without_an_agent_scoring_goes_on_and_says_so_once(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    sink = AgentSink("ublkb7", str(tmp_path / "no-agent"))
    ctl = LegController(2, sink, config=CFG)
    for _ in range(40):   # several demotion attempts (each after the retry pause)
        ctl.on_verdict(1, 0.97, True)
        ctl.on_tick()
    assert ctl.counters["unsent"] >= 1 and ctl.policy.state(1) is LegState.ACTIVE
    said = [r for r in caplog.records if "no kernel agent is running" in r.getMessage()]
    assert len(said) == 1


def _records(path: list[int], tag: list[int], lat_us: list[float],
             flags: list[int] | None = None) -> np.ndarray:
    r = np.zeros(len(path), dtype=COMPLETION_DTYPE)
    r["path"], r["tag"] = path, tag
    r["lat_ns"] = np.array(lat_us) * 1000
    r["op"], r["result"], r["length"] = 0, 4096, 4096
    r["t_ns"] = np.arange(len(path)) * 1_000_000
    if flags is not None:
        r["flags"] = flags
    return r


def test_probes_are_judged_by_the_model_against_their_own_user_reads(tmp_path: Path) -> None:
    """A demoted leg whose probes are 10x slower stays out; as fast as the user reads
    they went out with, it returns - although those are twice as slow as the others
    (a probe and its read share a submission: measured so in the test bed)."""
    from ml.model import reference_model

    model = reference_model("fail_slow")
    sink = _ListSink()
    clock = [0.0]
    ctl = LegController(2, sink, config=CFG, model=lambda: model, clock=lambda: clock[0])
    for _ in range(3):
        ctl.on_verdict(1, 0.97, True)
    ctl.policy.answer(1, "demote_leg", True, clock[0])
    sink.sent.clear()
    rng = np.random.default_rng(1)

    def run(probe_us: float, seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            clock[0] += TICK
            lone, k = 30, 10    # user reads without a probe; probes (and their reads)
            lat = list(rng.lognormal(np.log(100), 0.2, lone)) + \
                list(rng.lognormal(np.log(200), 0.2, k)) + \
                list(rng.lognormal(np.log(probe_us), 0.2, k))
            ctl.on_records(_records([0] * (lone + k) + [1] * k,
                                    [3] * (lone + k) + [PROBE_TAG] * k, lat,
                                    [0] * lone + [RECORD_PROBED] * k + [0] * k))
            ctl.on_tick()

    run(2000.0, 30)
    assert sink.sent == [] and ctl.policy.state(1) is LegState.DEMOTED
    cleared = clock[0]
    for _ in range(100):   # the 3 s probe window clears, then the 5 s hold
        run(200.0, TICK)
        if sink.sent:
            break
    assert [(r.action, r.leg) for r in sink.sent] == [("promote_leg", 1)]
    assert 5.0 < clock[0] - cleared <= 3.0 + 5.0 + 0.2
    probes = [e for e in ctl.events if e["event"] == "probe"]
    assert probes and probes[-1]["peer_lat_ratio"] == pytest.approx(1.0, abs=0.2)


def test_score_lines_give_the_margin_and_the_features_of_flagged_ticks() -> None:
    from ml.scorer import PathVerdict

    clock = [0.0]
    ctl = LegController(2, _ListSink(), config=CFG, clock=lambda: clock[0])
    for i in range(10):
        clock[0] += TICK
        vs = [PathVerdict(0, 0.1, False, 100, 1.0, 0.0, "1", {"peer_lat_ratio": 1.0}),
              PathVerdict(1, 0.6 if i in (4, 5) else 0.2, i in (4, 5), 100, 1.0, 0.0, "1",
                          {"peer_lat_ratio": 2.5 if i in (4, 5) else 1.0, "samples": 100.0})]
        for v in vs:
            ctl.on_verdict(v.path, v.score, v.flagged)
        ctl.on_tick(vs)
    clock[0] += 2 * TICK
    ctl.on_tick([])                       # a second has passed: the lines are written
    lines = {e["leg"]: e for e in ctl.events if e["event"] == "score"}
    assert lines[0]["flagged"] == 0 and "features" not in lines[0]
    assert lines[1]["flagged"] == 2 and lines[1]["streak"] == 2 and lines[1]["max"] == 0.6
    assert lines[1]["features"] == {"peer_lat_ratio": 2.5, "samples": 100.0}
    assert lines[1]["ticks"] == 10


class _ListSink:
    def __init__(self) -> None:
        self.sent: list[Request] = []

    def submit(self, req: Request, model: str) -> str | None:
        self.sent.append(req)
        return None

    def answers(self) -> list[object]:
        return []

    def close(self) -> None:
        pass


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.booleans()), max_size=80))
def test_controller_never_raises_on_any_verdicts(seq: list[tuple[int, bool]]) -> None:
    ctl = LegController(2, _ListSink(), config=CFG)  # type: ignore[arg-type]
    for leg, f in seq:
        ctl.on_verdict(leg, 0.9, f)
        ctl.on_tick()
