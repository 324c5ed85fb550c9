"""The closed loop of a mirror: fail-slow verdicts in, leg demotions and promotions out.

Three layers, each testable alone:

* :class:`LegPolicy` -- pure logic, clock injected (every method takes
  ``now``).  A leg flagged by the scorer for ``demote_after`` consecutive
  ticks is demoted, unless it is the last active one; a demoted leg is
  promoted again only after its health probes looked healthy for
  ``readmit_hold_s`` *and* it stayed demoted for its dwell time.  The dwell
  time doubles when a leg is demoted again soon after a promotion, so a leg
  that keeps relapsing is tried ever more rarely (hysteresis: no flapping).
  The policy only *asks*; a leg changes state in the policy's books when the
  answer (or the server) says it did.
* :class:`AgentSink` -- the road to the driver, through the kernel agent: the
  process registers as an ``ml-extension``, writes recommendations
  (``demote_leg`` / ``promote_leg``, value = the leg, confidence, model, ttl)
  to its submission ring and reads the agent's decisions from the
  completion ring.  The agent validates them in the device's mode (observe,
  recommend, enforce) and applies them through the server's admin socket.
  Without a running agent nothing is sent; that is said once, and scoring
  goes on.
* :class:`LegController` -- the glue run by the scorer's hooks
  (``on_records``, ``on_verdict``, ``on_tick``): it feeds verdicts to the
  policy, judges the demoted legs' health probes with the same model, syncs
  the policy with the server's real leg states, and logs every step as JSON
  lines in ``$UBLKML_STATE_DIR/<dev>.legs.jsonl`` (the demonstration reads
  its detection and demotion times from there).

Why probes, and why the model judges them: a demoted leg serves no user
reads, so its only read latencies are the health probes (every Nth user read
copied to it, ``tag == PROBE_TAG``).  Reads-only windows (probes of the
demoted legs, and on the active legs the user reads those probes went out
with, flagged ``RECORD_PROBED``) go through the same features and model as
detection: "healthy" is "the model no longer flags it next to its peers", not
a second, hand-tuned rule.  One feature is neutralised for probes: the
throughput ratio (probes come at the rate we chose, so a demoted leg's low
throughput says nothing about its health).

Why only the probed user reads: a probe and its user read are submitted
together; where reads complete inside the submission (a RAM disk, the qemu
test bed) the pair takes about twice as long as a lone read, and both
records say so.  In the test bed, with the demoted leg healthy: probes p50
156 us, all user reads 75 us (a median ratio of 2, which the model flags: a
healthy leg would never be re-admitted), probed user reads 189 us next to
their probes' 191 us (docs/failslow.md).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kernel_agent.errors import AgentError
from kernel_agent.link import ExtensionLink
from kernel_agent.ring import Recommendation
from ml.features import FEATURE_INDEX, Summary, select, summarize, summary_features
from ml.scorer import state_dir
from ublk_driver.core.errors import UblkError
from ublk_driver.records import COMPLETION_DTYPE, RECORD_PROBED

log = logging.getLogger("ublkml.ml.legpolicy")

#: ``tag`` of a health-probe completion record (``UBLKML_PROBE_TAG`` in the engine).
PROBE_TAG = 0xFFFF
_OP_READ = 0


class LegPolicyError(UblkError, ValueError):
    """A leg policy cannot be built as asked (the message says what to change)."""


class LegState(enum.Enum):
    ACTIVE = "active"
    DEMOTING = "demoting"      # demotion asked, no answer yet
    DEMOTED = "demoted"
    PROMOTING = "promoting"    # promotion asked (or applied: resync running)
    FAILED = "failed"          # failed by the driver or an operator: not ours to change


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs; defaults for a scorer ticking every 100 ms over a 1 s window."""

    demote_after: int = 3          # consecutive flagged ticks before asking for a demotion
    #: the agent's confidence floor (validator.Policy): a flagged leg whose
    #: latest score is lower keeps being watched rather than asked about and
    #: refused (a refusal costs a retry pause)
    min_confidence: float = 0.5
    #: after any leg changes state, verdicts are ignored this long *and* for
    #: this many ticks (:meth:`LegPolicy.tick` calls): the scorer's window
    #: (10 ticks, 1 s when ticks come on time) still mixes before and after.
    #: A leg just re-admitted has a window of writes and probes, which looks
    #: slow next to a peer's reads; a leg that just took over every read
    #: looks slow next to its old self.  Counted in ticks too because on a
    #: starved machine (the test bed under load) ticks come late and the
    #: window spans seconds: counted in time alone, a re-admitted leg could
    #: be demoted again within 1.5 s.
    settle_s: float = 1.0
    settle_ticks: int = 10
    min_active: int = 1            # never fewer active legs than this
    readmit_hold_s: float = 5.0    # probes healthy this long before a promotion
    min_health_samples: int = 5    # ... in at least this many ticks
    #: ... and in at least this share of the ticks judged during the hold.
    #: The hold restarts when the probes are flagged for ``demote_after``
    #: ticks in a row (the evidence that demotes an active leg): one noisy
    #: window does not, or a leg would never come back from a noisy machine.
    readmit_healthy_frac: float = 0.8
    min_dwell_s: float = 10.0      # demoted at least this long
    dwell_backoff: float = 2.0     # dwell x this when demoted again within flap_window_s
    max_dwell_s: float = 600.0
    flap_window_s: float = 120.0   # a demotion this soon after a promotion is a relapse
    answer_timeout_s: float = 5.0  # no answer to a request: it is forgotten
    resync_timeout_s: float = 900.0  # applied promotion: the server resyncs, then activates
    retry_after_s: float = 5.0     # a refused request is not repeated sooner

    def __post_init__(self) -> None:
        if self.demote_after < 1:
            raise LegPolicyError(f"demote_after must be >= 1 tick, got {self.demote_after}")
        if self.min_active < 1:
            raise LegPolicyError(f"min_active must be >= 1 leg, got {self.min_active}")
        if self.settle_ticks < 0:
            raise LegPolicyError(f"settle_ticks must be >= 0, got {self.settle_ticks}")
        for name in ("readmit_hold_s", "min_dwell_s", "settle_s", "answer_timeout_s",
                     "retry_after_s", "resync_timeout_s", "flap_window_s"):
            if not getattr(self, name) >= 0:
                raise LegPolicyError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.readmit_healthy_frac <= 1:
            raise LegPolicyError("readmit_healthy_frac must be in (0, 1], got "
                                 f"{self.readmit_healthy_frac}")
        if self.dwell_backoff < 1 or self.max_dwell_s < self.min_dwell_s:
            raise LegPolicyError("dwell_backoff must be >= 1 and max_dwell_s >= min_dwell_s")


@dataclass(frozen=True)
class Request:
    """What the policy asks for: ``action`` is ``demote_leg`` or ``promote_leg``."""

    action: str
    leg: int
    confidence: float
    reason: str


@dataclass
class _Leg:
    state: LegState = LegState.ACTIVE
    streak: int = 0                      # consecutive flagged ticks (ACTIVE)
    streak_scores: list[float] = field(default_factory=list)
    since: float = 0.0                   # when the current state began
    asked: float = 0.0                   # when the pending request was made
    applied: bool = False                # PROMOTING: the agent applied it (resync running)
    retry_at: float = float("-inf")
    healthy_since: float | None = None   # DEMOTED: when the current hold began
    healthy_ticks: int = 0               # ... healthy ticks in it
    sick_streak: int = 0                 # ... consecutive flagged ticks
    hold_scores: list[float] = field(default_factory=list)   # every tick judged in it
    dwell_s: float = 0.0
    promoted_at: float | None = None


class LegPolicy:
    """Demotion and re-admission decisions for the legs of one mirror."""

    def __init__(self, legs: int, config: PolicyConfig | None = None, now: float = 0.0,
                 states: Iterable[str] | None = None) -> None:
        if legs < 2:
            raise LegPolicyError(f"a leg policy needs a mirror of 2 or more legs, got {legs}")
        self.config = config or PolicyConfig()
        self._legs = [_Leg(since=now, dwell_s=self.config.min_dwell_s) for _ in range(legs)]
        self._settle_until = float("-inf")
        self._ticks = 0
        self._settle_tick = 0
        if states is not None:
            self.observe_states(list(states), now)

    # ---- queries ----------------------------------------------------------------

    @property
    def legs(self) -> int:
        return len(self._legs)

    def state(self, leg: int) -> LegState:
        return self._legs[leg].state

    def states(self) -> list[LegState]:
        return [lg.state for lg in self._legs]

    def dwell_s(self, leg: int) -> float:
        return self._legs[leg].dwell_s

    def streak(self, leg: int) -> int:
        """Consecutive flagged ticks of an active leg."""
        return self._legs[leg].streak

    def hold(self, leg: int, now: float) -> dict[str, float | int] | None:
        """A demoted leg's re-admission hold so far (None: not holding)."""
        lg = self._legs[leg]
        if lg.state is not LegState.DEMOTED or lg.healthy_since is None:
            return None
        return {"s": round(now - lg.healthy_since, 3), "healthy": lg.healthy_ticks,
                "judged": len(lg.hold_scores)}

    def _active(self) -> int:
        return sum(1 for lg in self._legs if lg.state is LegState.ACTIVE)

    # ---- inputs -----------------------------------------------------------------

    def verdict(self, leg: int, score: float, flagged: bool, now: float) -> Request | None:
        """One scoring tick's verdict on ``leg``; maybe a demotion request."""
        if not 0 <= leg < len(self._legs):
            return None  # a path the mirror does not have (path 0 of something else)
        lg = self._legs[leg]
        if lg.state is not LegState.ACTIVE:
            return None  # demoted legs are judged by their probes, not by these verdicts
        # Judged only next to other active legs (the peers in the same role:
        # a lone active leg serves every read and looks slow next to a demoted
        # leg's writes and probes), and not while the windows settle.
        if not flagged or now < self._settle_until or self._ticks < self._settle_tick \
                or self._active() < 2:
            lg.streak, lg.streak_scores = 0, []
            return None
        lg.streak += 1
        lg.streak_scores = [*lg.streak_scores[-(self.config.demote_after - 1):], score] \
            if self.config.demote_after > 1 else [score]
        if lg.streak < self.config.demote_after or now < lg.retry_at \
                or score < self.config.min_confidence:
            return None
        if self._active() - 1 < self.config.min_active:
            return None  # the last active leg(s): slow beats gone
        ticks = lg.streak
        lg.state, lg.asked, lg.streak = LegState.DEMOTING, now, 0
        return Request("demote_leg", leg, score,
                       f"flagged {ticks} ticks in a row (score {score:.3f})")

    def health(self, leg: int, healthy: bool, score: float, now: float) -> Request | None:
        """One tick's judgement of a demoted leg's probes; maybe a promotion request.

        The hold begins at a healthy tick and restarts when the probes are
        flagged ``demote_after`` ticks in a row; a promotion is asked when
        the hold has lasted ``readmit_hold_s`` with at least
        ``min_health_samples`` healthy ticks making up at least
        ``readmit_healthy_frac`` of the ticks judged, the latest tick is
        healthy, and the leg has been demoted for its dwell time.
        """
        if not 0 <= leg < len(self._legs):
            return None
        lg = self._legs[leg]
        if lg.state is not LegState.DEMOTED:
            return None
        c = self.config
        lg.sick_streak = 0 if healthy else lg.sick_streak + 1
        if lg.sick_streak >= c.demote_after:
            lg.healthy_since, lg.healthy_ticks, lg.hold_scores = None, 0, []
        if lg.healthy_since is None:
            if not healthy:
                return None
            lg.healthy_since = now
        lg.healthy_ticks += healthy
        lg.hold_scores.append(score)
        judged = len(lg.hold_scores)
        if (not healthy or now - lg.healthy_since < c.readmit_hold_s
                or lg.healthy_ticks < c.min_health_samples
                or lg.healthy_ticks < c.readmit_healthy_frac * judged
                or now - lg.since < lg.dwell_s or now < lg.retry_at):
            return None
        median = float(np.median(lg.hold_scores))
        held, ok = now - lg.healthy_since, lg.healthy_ticks
        lg.state, lg.asked, lg.applied = LegState.PROMOTING, now, False
        lg.healthy_since, lg.healthy_ticks, lg.sick_streak, lg.hold_scores = None, 0, 0, []
        return Request("promote_leg", leg, 1.0 - median,
                       f"probes healthy in {ok} of {judged} ticks over {held:.1f} s "
                       f"(median score {median:.3f})")

    def answer(self, leg: int, action: str, applied: bool, now: float) -> None:
        """The agent's decision on a request: applied, or not (any other status)."""
        if not 0 <= leg < len(self._legs):
            return
        lg = self._legs[leg]
        if action == "demote_leg" and lg.state is LegState.DEMOTING:
            if applied:
                self._demoted(lg, now)
            else:
                self._back(lg, LegState.ACTIVE, now)
        elif action == "promote_leg" and lg.state is LegState.PROMOTING:
            if applied:
                lg.applied, lg.asked = True, now  # resync runs; the server says when active
            else:
                self._back(lg, LegState.DEMOTED, now)

    def observe_states(self, actual: list[str], now: float) -> None:
        """The server's leg states (``leg_info``): the truth the books follow."""
        for leg, text in enumerate(actual[:len(self._legs)]):
            lg = self._legs[leg]
            try:
                real = LegState(text)
            except ValueError:
                continue
            if lg.state is LegState.DEMOTING:
                if real is LegState.DEMOTED:
                    self._demoted(lg, now)
                elif real is LegState.FAILED:
                    self._set(lg, LegState.FAILED, now)
            elif lg.state is LegState.PROMOTING:
                if real is LegState.ACTIVE:
                    self._set(lg, LegState.ACTIVE, now)
                    lg.promoted_at = now
                elif real is LegState.FAILED:
                    self._set(lg, LegState.FAILED, now)
            elif real is not lg.state:
                # Changed behind our back (an operator, a failing write): adopt it.
                if real is LegState.DEMOTED:
                    self._demoted(lg, now)
                else:
                    self._set(lg, real, now)

    def tick(self, now: float) -> None:
        """One scorer tick has passed; forget requests nobody answered (the agent
        stopped, the ring was full)."""
        self._ticks += 1
        for lg in self._legs:
            if lg.state is LegState.DEMOTING and now - lg.asked > self.config.answer_timeout_s:
                self._back(lg, LegState.ACTIVE, now)
            elif lg.state is LegState.PROMOTING:
                limit = self.config.resync_timeout_s if lg.applied else \
                    self.config.answer_timeout_s
                if now - lg.asked > limit:
                    self._back(lg, LegState.DEMOTED, now)

    # ---- transitions ------------------------------------------------------------

    def _set(self, lg: _Leg, state: LegState, now: float) -> None:
        if state is not lg.state:
            self._settle_until = max(self._settle_until, now + self.config.settle_s)
            self._settle_tick = self._ticks + self.config.settle_ticks
        lg.state, lg.since, lg.applied = state, now, False
        lg.streak, lg.streak_scores = 0, []
        lg.healthy_since, lg.healthy_ticks, lg.sick_streak, lg.hold_scores = None, 0, 0, []

    def _demoted(self, lg: _Leg, now: float) -> None:
        c = self.config
        relapse = lg.promoted_at is not None and now - lg.promoted_at <= c.flap_window_s
        lg.dwell_s = min(lg.dwell_s * c.dwell_backoff, c.max_dwell_s) if relapse \
            else c.min_dwell_s
        self._set(lg, LegState.DEMOTED, now)

    def _back(self, lg: _Leg, state: LegState, now: float) -> None:
        """A request that did not happen: the old state, and a pause before asking again."""
        since = lg.since
        self._set(lg, state, now)
        lg.since = since  # the dwell counts from the real demotion, not from the refusal
        lg.retry_at = now + self.config.retry_after_s


# ---- the road through the kernel agent ----------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The agent's decision on one request."""

    leg: int
    action: str
    status: str        # applied, recommended, observed, rejected, failed, ...
    reason: str

    @property
    def applied(self) -> bool:
        return self.status == "applied"


class Sink(Protocol):
    """Where requests go and answers come from."""

    def submit(self, req: Request, model: str) -> str | None:
        """Send it; None if sent, else why not (one line)."""

    def answers(self) -> list[Answer]: ...

    def close(self) -> None: ...


class AgentSink:
    """Recommendations through the kernel agent (an ``ml-extension`` holding its device's
    lease; ``link.submit`` takes the eBPF queue where the agent checks in the kernel).

    Registration is lazy and retried: the agent may start after the device.
    Without an agent, :meth:`submit` says so (the caller logs it once).
    """

    def __init__(self, device: str, agent_dir: str | None = None, ttl_ms: int = 2000,
                 retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.agent_dir = agent_dir
        self.ttl_ms = ttl_ms
        self.link = ExtensionLink("ml-extension", agent_dir, retry_s, clock,
                                  what="leg recommendations")
        self._pending: dict[int, Request] = {}

    @property
    def ext_id(self) -> int | None:
        return self.link.ext_id

    def submit(self, req: Request, model: str) -> str | None:
        if self.link.channel is None:
            # device=: the extension acts for its own device and asks for its lease
            # (the eBPF checker refuses recommendations for devices leased elsewhere).
            why = self.link.connect({"pid": str(os.getpid()), "model": "fail-slow",
                                     "device": self.device})
            if why is not None:
                return why
            log.warning("legpolicy: registered with the kernel agent as extension %d",
                        self.link.ext_id)
        try:
            rec = self.link.submit(Recommendation(
                device=self.device, action=req.action, value=str(req.leg),
                confidence=max(0.0, min(1.0, req.confidence)), model=model,
                ttl_ms=self.ttl_ms, ext_id=0))
        except (AgentError, OSError) as e:
            return f"not sent: {e}"
        if rec is None:
            return "the agent's submission ring is full (is the agent stuck?)"
        self._pending[int(rec.seq)] = req
        return None

    def answers(self) -> list[Answer]:
        if self.link.channel is None:
            return []
        out = []
        for c in self.link.channel.completions():
            req = self._pending.pop(c.seq, None)
            if req is None:
                continue  # follow-ups (KEPT) of requests already answered, or not ours
            out.append(Answer(req.leg, req.action, c.status.name.lower(), c.reason))
        return out

    def close(self) -> None:
        self.link.close()


# ---- the glue on the scorer's hooks ------------------------------------------------


class LegSource(Protocol):
    """The server (in process): the legs' real states."""

    def leg_info(self) -> Any: ...


class ModelLike(Protocol):
    features: tuple[str, ...]

    def predict(self, x: npt.NDArray[np.float32]) -> tuple[Any, Any]: ...


def legs_log_file(dev_id: int, directory: str | None = None) -> str:
    return os.path.join(directory or state_dir(), f"{dev_id}.legs.jsonl")


class LegController:
    """Runs a :class:`LegPolicy` on a live mirror from the scorer's hooks.

    ``attach(scorer)`` sets ``on_records``, ``on_verdict`` and ``on_tick``.
    All calls come from the scorer's one thread.
    """

    def __init__(self, legs: int, sink: Sink, *, server: LegSource | None = None,
                 model: Callable[[], ModelLike] | None = None,
                 config: PolicyConfig | None = None, log_path: str | None = None,
                 probe_window_s: float = 3.0, min_probe_reads: int = 32,
                 clock: Callable[[], float] = time.monotonic,
                 model_name: Callable[[], str] | None = None) -> None:
        self.clock = clock
        self.policy = LegPolicy(legs, config, clock())
        self.sink = sink
        self.server = server
        self._model = model
        self._model_name = model_name or (lambda: "fail_slow")
        self.log_path = log_path
        if not probe_window_s > 0 or min_probe_reads < 1:
            raise LegPolicyError("probe_window_s must be > 0 and min_probe_reads >= 1")
        self.probe_window_s = probe_window_s
        self.min_probe_reads = min_probe_reads
        # Reads-only windows, a running sum of per-tick summaries as in the
        # scorer: probed user reads and probes apart, so that each leg
        # contributes what its state makes it serve.
        self._win_user = Summary.empty()
        self._win_probe = Summary.empty()
        self._ring: deque[tuple[Summary, Summary, float]] = deque()
        self._tick_reads: list[npt.NDArray[Any]] = []
        self._last_tick = clock()
        #: leg -> [max score, flagged ticks, ticks, longest streak] this second
        self._active_stats: dict[int, list[float]] = {}
        #: leg -> the features of its highest-scored verdict this second
        self._active_top: dict[int, dict[str, float]] = {}
        self._active_logged = clock()
        self._said: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.counters = {"requests": 0, "applied": 0, "refused": 0, "unsent": 0}
        self._faults: dict[int, str] = {}
        self._probe_logged: dict[int, float] = {}
        self._sync_states()

    def attach(self, scorer: Any) -> LegController:
        scorer.on_records = self.on_records
        scorer.on_verdict = self.on_verdict
        scorer.on_tick = self.on_tick
        if self._model is None:
            self._model = lambda: scorer.model
            self._model_name = lambda: f"{scorer.model.info.kind}-{scorer.model.info.version}"
        return self

    # ---- log --------------------------------------------------------------------

    def _event(self, what: str, **fields: Any) -> None:
        rec = {"t": round(time.time(), 6), "mono": round(self.clock(), 6), "event": what,
               **fields}
        self.events.append(rec)
        del self.events[:-1000]
        if self.log_path is not None:
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                self._once(f"cannot write {self.log_path}: {e.strerror}")

    def _once(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            log.warning("legpolicy: %s", msg)

    # ---- hooks ------------------------------------------------------------------

    def on_records(self, recs: npt.NDArray[Any]) -> None:
        """Keep this tick's successful reads (user reads and probes) for the health check."""
        reads = recs[(recs["op"] == _OP_READ) & (recs["result"] > 0)]
        if reads.shape[0]:
            self._tick_reads.append(reads.copy())

    def on_verdict(self, path: int, score: float, flagged: bool) -> None:
        active = 0 <= path < self.policy.legs and self.policy.state(path) is LegState.ACTIVE
        req = self.policy.verdict(path, score, flagged, self.clock())
        if active:
            st = self._active_stats.setdefault(path, [0.0, 0, 0, 0])
            st[0] = max(st[0], score)
            st[1] += flagged
            st[2] += 1
            # a request resets the streak: it reached demote_after
            st[3] = max(st[3], self.policy.streak(path) if req is None
                        else self.policy.config.demote_after)
        if req is not None:
            self._send(req, score=score)

    def on_tick(self, verdicts: object = None) -> None:
        now = self.clock()
        self._note_features(verdicts)
        for a in self.sink.answers():
            self.counters["applied" if a.applied else "refused"] += 1
            self.policy.answer(a.leg, a.action, a.applied, now)
            self._event("answer", leg=a.leg, action=a.action, status=a.status,
                        reason=a.reason, state=self.policy.state(a.leg).value)
            (log.warning if a.applied else log.info)(
                "legpolicy: %s %d: %s (%s)", a.action, a.leg, a.status, a.reason)
        before = self.policy.states()
        self._sync_states()
        self.policy.tick(now)
        self._window_add(now)
        after = self.policy.states()
        if any(a is LegState.DEMOTED and b is not LegState.DEMOTED
               for a, b in zip(after, before, strict=True)):
            self._window_reset()   # a new demotion: its probes only
        if any(s is LegState.DEMOTED for s in after):
            self._judge_probes(now)
        if now - self._active_logged >= 1.0:
            self._log_active(now)

    # ---- internals --------------------------------------------------------------

    def _send(self, req: Request, **extra: Any) -> None:
        self.counters["requests"] += 1
        why = self.sink.submit(req, self._model_name())
        self._event("request", leg=req.leg, action=req.action,
                    confidence=round(req.confidence, 4), reason=req.reason,
                    sent=why is None, why=why, **extra)
        if why is not None:
            self.counters["unsent"] += 1
            self._once(why)
            # Not sent: no answer will come; the policy's timeout would get
            # there too, but the books should say so now.
            self.policy.answer(req.leg, req.action, False, self.clock())
        else:
            log.warning("legpolicy: asked the agent to %s %d: %s", req.action, req.leg,
                        req.reason)

    def _sync_states(self) -> None:
        if self.server is None:
            return
        try:
            infos = self.server.leg_info()
        except Exception as e:  # the device is going away: the scorer carries on
            self._once(f"cannot read the legs' states: {e}")
            return
        self._log_faults()
        before = self.policy.states()
        self.policy.observe_states([str(i.state) for i in infos], self.clock())
        after = self.policy.states()
        for leg, (b, a) in enumerate(zip(before, after, strict=True)):
            if a is not b:
                self._event("state", leg=leg, old=b.value, new=a.value)

    def _log_faults(self) -> None:
        """Log injected faults as the server sees them: for the record, never for decisions.

        The demonstration measures detection from here (the onset as the
        server saw it, within one tick) rather than from when `ublkml fault
        set` returned, which can take seconds on a loaded test bed.
        """
        fn = getattr(self.server, "faults", None)
        if fn is None:
            return
        try:
            now = {int(k): str(v) for k, v in fn().items()}
        except Exception:
            return
        if now != self._faults:
            for leg in sorted(set(now) | set(self._faults)):
                if now.get(leg) != self._faults.get(leg):
                    self._event("fault", leg=leg, spec=now.get(leg))
            self._faults = now

    def _window_add(self, now: float) -> None:
        reads = np.concatenate(self._tick_reads) if self._tick_reads \
            else np.empty(0, dtype=_empty_dtype())
        self._tick_reads = []
        probe = reads["tag"] == PROBE_TAG
        # The user reads a probe went out with: the probes' comparison group.
        twin = ~probe & ((reads["flags"] & RECORD_PROBED) != 0)
        u, p = summarize(reads[twin]), summarize(reads[probe])
        elapsed, self._last_tick = max(now - self._last_tick, 0.0), now
        self._ring.append((u, p, elapsed))
        self._win_user.add(u)
        self._win_probe.add(p)
        span = sum(e for _, _, e in self._ring)
        while len(self._ring) > 1 and span - self._ring[0][2] >= self.probe_window_s:
            ou, op, e = self._ring.popleft()
            self._win_user.subtract(ou)
            self._win_probe.subtract(op)
            span -= e

    def _window_reset(self) -> None:
        self._ring.clear()
        self._win_user, self._win_probe = Summary.empty(), Summary.empty()

    def _log_active(self, now: float) -> None:
        """Once a second: the highest score and flagged ticks of each active leg.

        The margin of a healthy run (how close it came to a demotion) is
        read from these lines.
        """
        self._active_logged = now
        for leg, (top, flagged, ticks, streak) in sorted(self._active_stats.items()):
            extra = {"features": self._active_top[leg]} if flagged and leg in self._active_top \
                else {}
            self._event("score", leg=leg, max=round(top, 4), flagged=int(flagged),
                        ticks=int(ticks), streak=int(streak), **extra)
        self._active_stats, self._active_top = {}, {}

    def _note_features(self, verdicts: object) -> None:
        """Keep the features of each active leg's highest-scored verdict (for the log)."""
        if not isinstance(verdicts, list):
            return
        for v in verdicts:
            leg, score = getattr(v, "path", None), getattr(v, "score", None)
            if not isinstance(leg, int) or not isinstance(score, float):
                continue
            st = self._active_stats.get(leg)
            if st is None or score != st[0]:
                continue
            feats = getattr(v, "features", {})
            self._active_top[leg] = {k: round(float(feats[k]), 3) for k in (
                "peer_lat_ratio", "peer_p90_ratio", "peer_p99_ratio", "peer_tput_ratio",
                "samples", "lat_p50_us") if k in feats}

    def _judge_probes(self, now: float) -> None:
        """Score reads-only windows: probes of the demoted legs next to the active
        legs' probed user reads.

        The window is ``probe_window_s`` long (3 s by default, three times
        the scorer's; in time, not ticks, which come late on a starved
        machine): a demoted leg gets one read in ``probe_every`` (8), and
        quantiles of a few dozen probes are too noisy to be held healthy for
        seconds on a busy machine.
        """
        if self._model is None or not self._ring:
            return
        states = self.policy.states()
        legs = len(states)
        win = Summary.empty(legs)
        for src, role in ((self._win_user, LegState.ACTIVE), (self._win_probe, LegState.DEMOTED)):
            rows = [leg for leg in range(min(legs, src.n_paths)) if states[leg] is role]
            if rows:
                part = Summary.empty(legs)
                part.n[rows], part.errors[rows] = src.n[rows], src.errors[rows]
                part.bytes[rows], part.lat_sum[rows] = src.bytes[rows], src.lat_sum[rows]
                part.lat_sumsq[rows], part.hist[rows] = src.lat_sumsq[rows], src.hist[rows]
                win.add(part)
        span = max(sum(e for _, _, e in self._ring), 1e-3)
        paths, x = summary_features(win, span, self.min_probe_reads)
        if paths.size < 2:
            return  # a probe needs a peer to be judged against
        # A demoted leg's probe rate is ours (every Nth read), not a symptom: a
        # low throughput ratio would read as "slow drive serves less" to the model.
        x[:, FEATURE_INDEX["peer_tput_ratio"]] = 1.0
        model = self._model()
        scores, flags = model.predict(select(x, model.features))
        for i, p in enumerate(paths):
            leg = int(p)
            if states[leg] is not LegState.DEMOTED:
                continue
            req = self.policy.health(leg, not bool(flags[i]), float(scores[i]), now)
            if now - self._probe_logged.get(leg, float("-inf")) >= 1.0 or req is not None:
                # Once a second: why a leg is (not) re-admitted, for whoever asks.
                self._probe_logged[leg] = now
                self._event("probe", leg=leg, score=round(float(scores[i]), 4),
                            flagged=bool(flags[i]), probes=int(x[i, FEATURE_INDEX["samples"]]),
                            hold=self.policy.hold(leg, now),
                            **{k: round(float(x[i, FEATURE_INDEX[k]]), 3)
                               for k in ("peer_lat_ratio", "peer_p90_ratio",
                                         "peer_p99_ratio")})
            if req is not None:
                self._send(req, score=float(scores[i]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sink.close()


def _empty_dtype() -> np.dtype[Any]:
    return COMPLETION_DTYPE


def controller_for(server: Any, scorer: Any, *, agent_dir: str | None = None,
                   config: PolicyConfig | None = None,
                   directory: str | None = None) -> LegController:
    """The leg controller of a live mirror device, attached to its scorer."""
    legs = len(server.leg_info())
    sink = AgentSink(f"ublkb{server.dev_id}", agent_dir)
    log_path = legs_log_file(server.dev_id, directory)
    with contextlib.suppress(OSError):
        os.unlink(log_path)   # a new device: a new log (ids are reused)
    if config is None:
        config = PolicyConfig(settle_ticks=scorer.window_ticks)
    ctl = LegController(legs, sink, server=server, config=config, log_path=log_path,
                        probe_window_s=3 * scorer.window_s)
    return ctl.attach(scorer)


def read_events(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a ``<dev>.legs.jsonl`` file (missing file: none)."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def summary(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Counts of applied demotions and promotions in a legs log."""
    out = {"demotions": 0, "promotions": 0}
    for e in events:
        if e.get("event") == "answer" and e.get("status") == "applied":
            key = "demotions" if e.get("action") == "demote_leg" else "promotions"
            out[key] += 1
    return out
