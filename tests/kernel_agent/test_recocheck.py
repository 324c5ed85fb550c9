"""The eBPF recommendation checker answers exactly as its reference model, on the real kernel.

Needs root (skipped, with the reason, otherwise); as root an unusable eBPF
*fails*: CI runs as root, so a broken set-up is never a silent pass.  The
model is fed the clock reading the kernel wrote into each verdict, so the
comparison is exact, not timing-dependent.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kernel_agent.accounting import ensure_bpffs, kdev
from kernel_agent.errors import AgentError, BpfUnavailableError
from kernel_agent.recocheck import OBJECT_PATH, RecoCheck, recocheck_unavailable_reason
from kernel_agent.recocheck_model import (
    ACTION,
    ACTION_IDS,
    ARGS,
    EXT,
    MAX_ACTIONS,
    NS_PER_MS,
    STATE,
    SUB,
    VERDICT,
    Bounds,
    ExtPolicy,
    Reason,
    RecoCheckModel,
    Submission,
    Verdict,
    default_bounds,
)
from kernel_agent.ring import Status
from kernel_agent.validator import Mode

U32_MAX = (1 << 32) - 1
S64_MIN, S64_MAX = -(1 << 63), (1 << 63) - 1
EXT_IDS = (11, 4_000_000_001)  # two extensions, one id above 2^31
DEVS = (kdev(7, 200), kdev(7, 201), kdev(259, 3))
UNKNOWN_DEV = kdev(7, 250)


def _require_bpf() -> None:
    if os.geteuid() != 0:
        pytest.fail("the eBPF checker needs root (CAP_BPF): run the tests as root, as CI does")
    reason = recocheck_unavailable_reason()
    if reason:
        pytest.fail(f"root, but the eBPF checker is unusable: {reason}")
    ensure_bpffs()


@pytest.fixture(scope="module")
def rc() -> Iterator[RecoCheck]:
    _require_bpf()
    with RecoCheck(f"rctest{os.getpid()}") as checker:
        for ext_id in EXT_IDS:
            checker.add_extension(ext_id)
        yield checker


def _model_for(rc: RecoCheck) -> RecoCheckModel:
    return RecoCheckModel(owners={rc.queues(e).slot: (e, ExtPolicy()) for e in EXT_IDS})


# Member names of each mirrored structure, in the order of its struct format.
LAYOUTS: dict[str, tuple[struct.Struct, tuple[str, ...]]] = {
    "rc_rec": (SUB, ("seq", "ext_id", "created_ns", "ttl_ms", "confidence", "dev", "action",
                     "value", "model", "reserved")),
    "rc_verdict": (struct.Struct(VERDICT.format + "48s"),
                   ("kseq", "now_ns", "status", "reason", "owner", "tokens", "holders",
                    "rec")),
    "rc_ext": (EXT, ("ext_id", "rate_per_s", "burst", "floor_permille", "max_ttl_ms",
                     "reserved")),
    "rc_state": (STATE, ("tokens", "stamp_ns", "kseq", "primed", "reserved", "lost")),
    "rc_action": (ACTION, ("allowed", "reserved", "lo", "hi")),
    "rc_args": (ARGS, ("slot", "max", "checked", "full")),
}


def _offsets(fmt: str) -> list[int]:
    """Byte offset of each field of a little-endian, padding-free struct format."""
    codes = re.findall(r"\d*[a-zA-Z]", fmt.lstrip("<"))
    out, prefix = [], "<"
    for code in codes:
        out.append(struct.calcsize(prefix))
        prefix += code
    return out


def test_layouts_match_the_object() -> None:
    """The Python mirrors have the C structures' sizes and member offsets (the object's BTF)."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(OBJECT_PATH)],
                         capture_output=True, text=True, check=True).stdout
    for name, (layout, members) in LAYOUTS.items():
        m = re.search(rf"STRUCT '{name}' size=(\d+) vlen=\d+\n((?:\t.*\n)*)", out)
        assert m, f"struct {name} is not in the object's BTF"
        got = [(mm[0], int(mm[1]) // 8) for mm in
               re.findall(r"\t'(\w+)' type_id=\d+ bits_offset=(\d+)", m[2])]
        assert int(m[1]) == layout.size, name
        assert got == list(zip(members, _offsets(layout.format), strict=True)), name


def test_missing_object_names_the_fallback(tmp_path: Path) -> None:
    """Without the object the error says what to do and that the Python validator takes over."""
    with pytest.raises(BpfUnavailableError, match=r"kernel_agent\.validator"):
        RecoCheck("rcmissing", object_path=tmp_path / "recocheck.bpf.o")


def test_foreign_device_is_refused_with_its_owner(rc: RecoCheck) -> None:
    """A recommendation for a device leased to another extension: OWNER, naming the holder."""
    mine, theirs = EXT_IDS
    rc.reset(mine)
    rc.set_policy(mine, ExtPolicy())
    rc.set_actions(default_bounds())
    rc.set_mode(DEVS[0], Mode.ENFORCE)
    rc.set_lease(DEVS[0], {theirs})
    rc.set_mode(DEVS[1], Mode.ENFORCE)
    rc.set_lease(DEVS[1], {mine})
    now = time.monotonic_ns()
    ra = ACTION_IDS["read_ahead_kb"]
    rc.submit(mine, Submission(mine, DEVS[0], ra, 256, 900, 5000, now, seq=1))
    rc.submit(mine, Submission(mine, DEVS[1], ra, 256, 900, 5000, now, seq=2))
    foreign, own = rc.check(mine)
    assert (foreign.status, foreign.reason) == (Status.REJECTED, Reason.OWNER)
    assert rc.holders(foreign.holders) == [theirs]
    assert (foreign.owner, foreign.rec.seq, foreign.rec.dev) == (mine, 1, DEVS[0])
    assert (own.status, own.reason, rc.holders(own.holders)) == (Status.APPLIED, Reason.OK,
                                                                 [mine])
    assert (foreign.kseq, own.kseq) == (1, 2)


def test_a_device_leased_to_two_extensions(rc: RecoCheck) -> None:
    """A device leased to both extensions (a server's leg policy and the monitor):
    either may act on it, and a third, with a queue but no lease, is refused with
    OWNER naming both holders."""
    a, b = EXT_IDS
    third = 77
    rc.add_extension(third)
    try:
        for e in (a, b, third):
            rc.reset(e)
            rc.set_policy(e, ExtPolicy())
        rc.set_actions(default_bounds())
        rc.set_mode(DEVS[2], Mode.ENFORCE)
        rc.set_lease(DEVS[2], {a, b})
        assert rc.lease(DEVS[2]) == 1 << rc.queues(a).slot | 1 << rc.queues(b).slot
        now = time.monotonic_ns()
        demote = ACTION_IDS["demote_leg"]
        for e in (a, b, third):
            rc.submit(e, Submission(e, DEVS[2], demote, 1, 1000, 5000, now, seq=e))
        (va,), (vb,), (vt,) = (rc.check(e) for e in (a, b, third))
        assert (va.status, va.reason, vb.status, vb.reason) == (
            Status.APPLIED, Reason.OK, Status.APPLIED, Reason.OK)
        assert (vt.status, vt.reason) == (Status.REJECTED, Reason.OWNER)
        assert rc.holders(vt.holders) == sorted((a, b), key=lambda e: rc.queues(e).slot)
    finally:
        rc.remove_extension(third)


def test_a_lease_follows_its_extension_not_its_slot() -> None:
    """A removed extension's bit leaves every lease: the next extension given its
    slot does not inherit the lease; a holder added later enters the mask then."""
    _require_bpf()
    with RecoCheck(f"rcslot{os.getpid()}") as checker:
        dev = DEVS[0]
        checker.set_mode(dev, Mode.ENFORCE)
        checker.set_lease(dev, {21, 22})   # neither has a slot yet
        assert checker.lease(dev) == 0
        slot = checker.add_extension(21).slot
        assert checker.lease(dev) == 1 << slot
        checker.remove_extension(21)
        assert checker.lease(dev) == 0
        assert checker.add_extension(23).slot == slot   # the freed slot, reused
        assert checker.lease(dev) == 0
        now = time.monotonic_ns()
        checker.submit(23, Submission(23, dev, 1, 128, 900, 5000, now))
        (v,) = checker.check(23)
        assert (v.reason, v.holders) == (Reason.OWNER, 0)
        slot22 = checker.add_extension(22).slot
        assert checker.lease(dev) == 1 << slot22
        checker.submit(22, Submission(22, dev, 1, 128, 900, 5000, now))
        (v,) = checker.check(22)
        assert (v.status, v.reason, checker.holders(v.holders)) == (
            Status.APPLIED, Reason.OK, [22])
        checker.set_lease(dev, ())
        assert checker.lease(dev) == 0


def test_every_reason_in_order(rc: RecoCheck) -> None:
    """One record per reason, each failing exactly the check named (not only model-equal)."""
    ext, other = EXT_IDS
    rc.reset(ext)
    rc.set_policy(ext, ExtPolicy(rate_per_s=0, burst=13, floor_permille=600, max_ttl_ms=10_000))
    rc.set_actions({1: Bounds(10, 20)})
    dev, obs, rec_dev = DEVS
    rc.set_mode(dev, Mode.ENFORCE)
    rc.set_lease(dev, {ext})
    rc.set_mode(obs, Mode.OBSERVE)
    rc.set_lease(obs, {ext})
    rc.set_mode(rec_dev, Mode.RECOMMEND)
    rc.set_lease(rec_dev, {ext})
    rc.set_mode(UNKNOWN_DEV, None)
    now = time.monotonic_ns()
    good = Submission(ext, dev, 1, 15, 600, 5000, now)
    cases: list[tuple[Submission | bytes, Status, Reason]] = [
        (good.pack()[:-1], Status.REJECTED, Reason.MALFORMED),
        (Submission(other, dev, 1, 15, 600, 5000, now), Status.REJECTED, Reason.EXT),
        (Submission(ext, dev, 1, 15, 600, 10_001, now), Status.REJECTED, Reason.TTL),
        (Submission(ext, dev, 1, 15, 600, 1, now - 2 * NS_PER_MS), Status.REJECTED,
         Reason.EXPIRED),
        (Submission(ext, dev, 1, 15, 1001, 5000, now), Status.REJECTED, Reason.CONF_HIGH),
        (Submission(ext, dev, 1, 15, 599, 5000, now), Status.REJECTED, Reason.CONF_LOW),
        (Submission(ext, UNKNOWN_DEV, 1, 15, 600, 5000, now), Status.REJECTED, Reason.DEVICE),
        (Submission(ext, obs, 9, 99, 600, 5000, now), Status.OBSERVED, Reason.OBSERVE),
        (Submission(ext, dev, 2, 15, 600, 5000, now), Status.REJECTED, Reason.ACTION),
        (Submission(ext, dev, 1, 21, 600, 5000, now), Status.REJECTED, Reason.BOUNDS),
        (Submission(ext, rec_dev, 1, 20, 1000, 5000, now), Status.RECOMMENDED, Reason.OK),
        (good, Status.APPLIED, Reason.OK),
        (good.pack() + b"\0", Status.REJECTED, Reason.MALFORMED),
        (good, Status.REJECTED, Reason.RATE),  # 13 tokens, no refill: the 14th record
    ]
    for rec, _, _ in cases:
        rc.submit(ext, rec)
    got = [(v.status, v.reason) for v in rc.check(ext)]
    assert got == [(status, reason) for _, status, reason in cases]
    rc.set_lease(obs, {other})  # the lease is checked before the mode
    rc.set_policy(ext, ExtPolicy(rate_per_s=0, burst=1))
    rc.reset(ext)
    rc.submit(ext, Submission(ext, obs, 1, 15, 600, 5000, time.monotonic_ns()))
    (v,) = rc.check(ext)
    assert (v.reason, rc.holders(v.holders)) == (Reason.OWNER, [other])


def test_completion_room_limits_a_run() -> None:
    """A run never takes a record it has no room to answer: the rest waits for the next run."""
    _require_bpf()
    page = os.sysconf("SC_PAGE_SIZE")
    per_page = page // 96  # an 88-byte verdict plus the ring's 8-byte header
    with RecoCheck(f"rcroom{os.getpid()}", queue_bytes=page) as small:
        small.add_extension(5, ExtPolicy(rate_per_s=0, burst=1000))
        n = per_page + 10
        for i in range(n):
            small.submit(5, Submission(5, UNKNOWN_DEV, 1, 0, 900, 1000, 0, seq=i))
        first = small.run(5)
        assert (first.checked, first.full) == (per_page, True)
        assert small.run(5).checked == 0  # nothing consumed: still no room
        seen = small.verdicts(5)
        second = small.run(5)
        assert (second.checked, second.full) == (10, False)
        seen += small.verdicts(5)
        assert [v.kseq for v in seen] == list(range(1, n + 1))
        assert [v.rec.seq for v in seen] == list(range(n))
        assert small.state(5).lost == 0


def test_full_submission_queue_refuses_clearly() -> None:
    """A full submission queue refuses the next record with an error naming it; a run frees it."""
    _require_bpf()
    page = os.sysconf("SC_PAGE_SIZE")
    fits = page // (SUB.size + 8)  # each sample carries an 8-byte header
    with RecoCheck(f"rcfull{os.getpid()}", queue_bytes=page) as small:
        small.add_extension(6, ExtPolicy(rate_per_s=0, burst=0))
        for i in range(fits):
            small.submit(6, Submission(6, UNKNOWN_DEV, 1, 0, 900, 1000, 0, seq=i))
        with pytest.raises(AgentError, match="submission queue of extension 6"):
            small.submit(6, Submission(6, UNKNOWN_DEV, 1, 0, 900, 1000, 0))
        verdicts = small.check(6)
        assert len(verdicts) == fits
        assert {v.reason for v in verdicts} == {Reason.RATE}  # burst 0: nothing passes
        small.submit(6, Submission(6, UNKNOWN_DEV, 1, 0, 900, 1000, 0))


def test_an_extension_submits_through_its_pinned_queue(rc: RecoCheck) -> None:
    """Another process opens its pinned submission queue and submits; the checker answers."""
    ext = EXT_IDS[1]
    rc.reset(ext)
    rc.set_policy(ext, ExtPolicy())
    path = f"{rc.pin_dir}/rc_sub_{ext}"
    rec = Submission(ext, UNKNOWN_DEV, 1, 0, 900, 60_000, time.monotonic_ns(), seq=77)
    code = ("import sys\nfrom kernel_agent import _libbpf\n"
            "q = _libbpf.UserRingBuffer(_libbpf.obj_get(sys.argv[1]))\n"
            "q.submit(bytes.fromhex(sys.argv[2]))\nq.free()\n")
    subprocess.run([sys.executable, "-c", code, path, rec.pack().hex()], check=True,
                   timeout=60)
    (v,) = rc.check(ext)
    assert (v.rec, v.reason, v.owner) == (rec, Reason.DEVICE, ext)


# -- the property: kernel == model ---------------------------------------------------


Planned = tuple[int, int | None, Submission | bytes]
# Between batches an extension's policy may change (its bucket carries over).
Batch = tuple[list[ExtPolicy | None], list[Planned]]
Scenario = tuple[list[tuple[int, ExtPolicy]], dict[int, Bounds], dict[int, Mode | None],
                 dict[int, frozenset[int]], list[Batch]]


def _policy() -> st.SearchStrategy[ExtPolicy]:
    return st.builds(
        ExtPolicy,
        rate_per_s=st.sampled_from([0, 1, 3, 1000, U32_MAX]),
        burst=st.one_of(st.integers(0, 6), st.just(U32_MAX)),
        floor_permille=st.one_of(st.sampled_from([0, 500, 1000, 1001]), st.integers(0, 1000)),
        max_ttl_ms=st.sampled_from([1, 50, 3_600_000, U32_MAX]),
    )


def _actions() -> st.SearchStrategy[dict[int, Bounds]]:
    wide = st.builds(Bounds, st.just(S64_MIN), st.just(S64_MAX))
    narrow = st.integers(-1000, 1000).flatmap(
        lambda lo: st.integers(lo, lo + 50).map(lambda hi: Bounds(lo, hi)))
    default = default_bounds()
    return st.one_of(st.just(default), st.dictionaries(
        st.integers(1, MAX_ACTIONS - 1), st.one_of(wide, narrow, st.sampled_from(
            list(default.values()))), max_size=5))


def _around(x: int, lo: int, hi: int) -> list[int]:
    return [v for v in (x - 1, x, x + 1) if lo <= v <= hi]


def _mostly(draw: st.DrawFn, valid: st.SearchStrategy[int],
            edges: st.SearchStrategy[int]) -> int:
    """A valid value seven times in eight, else a boundary or arbitrary one."""
    return draw(valid if draw(st.integers(0, 7)) else edges)


@st.composite
def _record(draw: st.DrawFn, slot: int, owners: list[tuple[int, ExtPolicy]],
            actions: dict[int, Bounds], mine: dict[int, list[int]]) -> Planned:
    """(which extension, created_ns as an offset from the submission time or None when
    the record's own value stands, the record or a malformed sample).

    Each field is valid most of the time, so that whole records often reach
    the last checks; otherwise it sits on or next to a bound.
    """
    own, pol = owners[slot]
    other = owners[1 - slot][0]
    if draw(st.integers(0, 15)) == 0:  # malformed: any size but the record's
        size = draw(st.one_of(st.sampled_from([1, SUB.size - 1, SUB.size + 1, SUB.size + 8]),
                              st.integers(1, 3 * SUB.size).filter(lambda n: n != SUB.size)))
        return slot, None, draw(st.binary(min_size=size, max_size=size))
    ext_id = _mostly(draw, st.just(own), st.sampled_from([other, 0, U32_MAX, own]))
    ttl = _mostly(draw, st.integers(1, min(pol.max_ttl_ms, 60_000)),
                  st.sampled_from([0, 1, 2, U32_MAX, *_around(pol.max_ttl_ms, 0, U32_MAX)]))
    ttl_ns = ttl * NS_PER_MS
    # created_ns: fresh; about to expire (either side of the deadline by a few
    # hundred microseconds); long expired; in the future; or any absolute value.
    when = draw(st.sampled_from(["fresh"] * 5 + ["edge", "edge", "expired", "future",
                                                 "abs"]))
    offset: int | None = {"fresh": 0, "expired": -ttl_ns - 10**10, "future": 10**10,
                          "edge": -ttl_ns + draw(st.integers(-500_000, 1_500_000)),
                          "abs": None}[when]
    created = draw(st.integers(0, (1 << 64) - 1)) if offset is None else 0
    floor = pol.floor_permille
    conf = _mostly(draw, st.integers(floor, 1000) if floor <= 1000 else st.just(1000),
                   st.sampled_from([0, 999, 1000, 1001, U32_MAX, *_around(floor, 0, U32_MAX)]))
    dev = _mostly(draw, st.sampled_from(mine[own] or [DEVS[0]]),
                  st.sampled_from([*DEVS, UNKNOWN_DEV]))
    action = _mostly(draw, st.sampled_from(sorted(actions) or [1]),
                     st.sampled_from([0, MAX_ACTIONS - 1, MAX_ACTIONS, U32_MAX, 2, 9]))
    b = actions.get(action)
    edges = [] if b is None else [*_around(b.lo, S64_MIN, S64_MAX),
                                  *_around(b.hi, S64_MIN, S64_MAX)]
    value = _mostly(draw, st.integers(b.lo, b.hi) if b else st.integers(0, 100),
                    st.one_of(st.sampled_from(edges or [S64_MIN, S64_MAX]),
                              st.integers(S64_MIN, S64_MAX)))
    rec = Submission(ext_id, dev, action, value, conf, ttl, created,
                     seq=draw(st.integers(0, U32_MAX)), model=draw(st.integers(0, 3)))
    return slot, offset, rec


@st.composite
def _scenario(draw: st.DrawFn) -> Scenario:
    owners = [(ext_id, draw(_policy())) for ext_id in EXT_IDS]
    actions = draw(_actions())
    modes = {d: draw(st.sampled_from([None, *Mode, Mode.RECOMMEND, Mode.ENFORCE]))
             for d in DEVS}
    # Each device leased to nobody, one extension, both, or 99 (an id with no
    # queue: never in the kernel's mask) with or without one of them.
    leases = {d: draw(st.sampled_from([frozenset(), *(frozenset({e}) for e in EXT_IDS),
                                       *(frozenset({e}) for e in EXT_IDS), frozenset(EXT_IDS),
                                       frozenset({99}), frozenset({99, EXT_IDS[1]})]))
              for d in DEVS}
    mine = {e: [d for d in DEVS if e in leases[d]] for e in EXT_IDS}
    record = st.integers(0, 1).flatmap(lambda s: _record(s, owners, actions, mine))
    new_policy = st.one_of(st.none(), st.none(), _policy())
    batches = draw(st.lists(st.tuples(st.lists(new_policy, min_size=2, max_size=2),
                                      st.lists(record, min_size=1, max_size=16)),
                            min_size=1, max_size=3))
    return owners, actions, modes, leases, batches


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenario())
def test_kernel_verdicts_equal_the_model(rc: RecoCheck, scenario: Scenario) -> None:
    """Generated policies, leases, modes and records: every verdict equals the model's."""
    owners, actions, modes, leases, batches = scenario
    model = _model_for(rc)
    slots = {e: rc.queues(e).slot for e in EXT_IDS}
    for ext_id, pol in owners:
        rc.set_policy(ext_id, pol)
        rc.reset(ext_id)
        model.owners[slots[ext_id]] = (ext_id, pol)
    rc.set_actions(actions)
    model.actions = dict(actions)
    for d in (*DEVS, UNKNOWN_DEV):
        rc.set_mode(d, modes.get(d))
        rc.set_lease(d, leases.get(d, frozenset()))
    model.modes = {d: m for d, m in modes.items() if m is not None}
    # The mask the kernel must hold, computed here from the slots, not asked of rc.
    model.leases = {d: sum(1 << slots[e] for e in holders if e in slots)
                    for d, holders in leases.items()}

    for new_policies, batch in batches:
        for (ext_id, _), changed in zip(owners, new_policies, strict=True):
            if changed is not None:
                rc.set_policy(ext_id, changed)
                model.owners[slots[ext_id]] = (ext_id, changed)
        sent: dict[int, deque[bytes]] = {e: deque() for e in EXT_IDS}
        for slot_index, offset, rec in batch:
            ext_id = owners[slot_index][0]
            if isinstance(rec, Submission) and offset is not None:
                rec = Submission(rec.ext_id, rec.dev, rec.action, rec.value, rec.confidence,
                                 rec.ttl_ms, max(0, time.monotonic_ns() + offset), rec.seq,
                                 rec.model)
            raw = rec.pack() if isinstance(rec, Submission) else rec
            rc.submit(ext_id, raw)
            sent[ext_id].append(raw)
        for ext_id in EXT_IDS:
            for got in rc.check(ext_id):
                expected: Verdict = model.check(slots[ext_id], sent[ext_id].popleft(),
                                                got.now_ns)
                event(f"{got.status.name}/{got.reason.name}")
                assert got == expected
            assert not sent[ext_id], "records the kernel did not answer"
            assert rc.state(ext_id).lost == 0


def test_reason_texts_are_the_validators_words() -> None:
    """Each refusal the kernel gives is worded with the phrase the Python validator
    uses for it, so logs and extensions read the same either way (OWNER is new)."""
    from kernel_agent.recocheck import reason_text
    from kernel_agent.ring import Recommendation

    phrases = {Reason.RATE: "rate limit: more than 5/s (burst 20) from extension 11",
               Reason.MALFORMED: "malformed", Reason.EXT: "extension id 12 in the queue",
               Reason.TTL: "ttl_ms 9 not in (0, 3600000]",
               Reason.EXPIRED: "expired before", Reason.CONF_HIGH: "above 1",
               Reason.CONF_LOW: "confidence 0.250 below the floor 0.5",
               Reason.DEVICE: "unknown device 'loop9' (not watched by the agent)",
               Reason.OWNER: "owner: loop9 is leased to extensions 13 and 14, not to "
                             "extension 11",
               Reason.OBSERVE: "loop9 is in observe mode",
               Reason.ACTION: "action 'read_ahead_kb' is not allowed",
               Reason.BOUNDS: "read_ahead_kb=77 out of bounds [0, 16384]"}
    assert set(phrases) == set(Reason) - {Reason.OK}
    sub = Submission(12, kdev(7, 9), ACTION_IDS["read_ahead_kb"], 77, 250, 9, 0)
    rec = Recommendation("loop9", "read_ahead_kb", "77", 0.25, "m", 9, 12)
    for reason, phrase in phrases.items():
        status = Status.OBSERVED if reason is Reason.OBSERVE else Status.REJECTED
        v = Verdict(1, 0, status, reason, 11, 0, 0b11, sub)
        assert phrase in reason_text(v, rec, ExtPolicy(), holders=[13, 14]), reason
    owner = Verdict(1, 0, Status.REJECTED, Reason.OWNER, 11, 0, 0b1, sub)
    assert reason_text(owner, rec, ExtPolicy(), holders=[13]) == \
        "owner: loop9 is leased to extension 13, not to extension 11"
    assert reason_text(owner, rec, ExtPolicy()) == \
        "owner: loop9 is leased to no extension, not to extension 11"
    sched = Recommendation("loop9", "scheduler", "cfq", 0.9, "m", 9, 12)
    v = Verdict(1, 0, Status.REJECTED, Reason.BOUNDS, 11, 0, 0b1, sub)
    assert "'cfq' is not one of" in reason_text(v, sched, ExtPolicy())
