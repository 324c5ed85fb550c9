"""The agent against a hostile ring: garbage records, headers and indices, truncation, floods.

test_ring.py covers the codec (round trips, flipped bytes, garbage records
decoded or refused) and a tail far ahead.  Here a real :class:`Agent` (sysfs
source, no eBPF needed) serves a real ring file that the "extension" abuses;
after every abuse the agent must still answer a good recommendation: it
rejected with a reason and kept running.  Anything that would kill the agent
(SIGBUS on a truncated mapping) runs in a forked child, so that a regression
fails this test instead of ending the test run.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_agent.agent import Agent
from kernel_agent.errors import RingError
from kernel_agent.eventlog import read_jsonl
from kernel_agent.registry import Registry
from kernel_agent.ring import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    OFF_COMP_HEAD,
    OFF_COMP_TAIL,
    OFF_SUB_HEAD,
    OFF_SUB_TAIL,
    RECORD_SIZE,
    VERSION,
    Channel,
    Completion,
    Recommendation,
    Status,
)
from kernel_agent.validator import Policy

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
U64 = (1 << 64) - 1


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Agent, Channel, Path]]:
    """An agent (no eBPF) with one live extension (this process) and its ring."""
    reg = Registry(tmp_path / "agent")
    ext = reg.add("ml-extension", {"pid": str(os.getpid()), "model": "fuzz"})
    agent = Agent(tmp_path / "agent", use_bpf=False, tick_s=0.001,
                  policy=Policy(rate_per_s=1e6, burst=1_000_000))
    agent.sync(force=True)
    ch = Channel.open(ext.ring)
    yield agent, ch, Path(ext.ring)
    ch.close()
    agent.close()


def alive(agent: Agent, ch: Channel) -> Completion:
    """The agent still answers: a recommendation for an unwatched device is rejected."""
    ch.completions()
    ch._store(OFF_SUB_HEAD, ch._load(OFF_SUB_TAIL))  # drop what the abuse left pending
    sent = ch.submit(Recommendation("nosuchdev", "read_ahead_kb", "128", 0.9, "m", 60_000, 0))
    assert sent is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        agent.step(0)
        for c in ch.completions():
            if c.seq == sent.seq:
                assert c.status is Status.REJECTED and "unknown device" in c.reason
                return c
    raise AssertionError("the agent stopped answering")


@FUZZ
@given(st.lists(st.binary(min_size=0, max_size=RECORD_SIZE + 8), min_size=1, max_size=20))
def test_garbage_records_are_rejected_with_a_reason(
        served: tuple[Agent, Channel, Path], blobs: list[bytes]) -> None:
    agent, ch, _ = served
    ch.completions()
    sent = 0
    for b in blobs:
        sent += ch.submit_raw(b)
    got: list[Completion] = []
    for _ in range(10):
        agent.step(0)
        got += ch.completions()
        if len(got) >= sent:
            break
    assert len(got) == sent
    for c in got:  # garbage cannot pass the CRC: every one is refused, with a reason
        assert c.status is Status.REJECTED and c.reason.startswith("malformed: "), c
    alive(agent, ch)


@FUZZ
@given(st.integers(0, U64), st.integers(0, U64), st.integers(0, U64), st.integers(0, U64))
def test_garbage_indices_resynchronise(served: tuple[Agent, Channel, Path], sub_head: int,
                                       sub_tail: int, comp_head: int, comp_tail: int) -> None:
    agent, ch, _ = served
    for off, v in ((OFF_SUB_HEAD, sub_head), (OFF_SUB_TAIL, sub_tail),
                   (OFF_COMP_HEAD, comp_head), (OFF_COMP_TAIL, comp_tail)):
        ch._store(off, v)
    agent.step(0)  # reads what the indices say, or reports and resynchronises
    ch.completions()  # the extension side resynchronises its ring too
    assert ch.pending() <= ch.sub_slots
    alive(agent, ch)


def test_index_at_the_u64_limit(served: tuple[Agent, Channel, Path]) -> None:
    agent, ch, _ = served
    ch._store(OFF_COMP_HEAD, U64 - 1)
    ch._store(OFF_COMP_TAIL, U64)  # one posted, the next store would pass 2^64 - 1
    assert ch.complete(Completion(1, ch.ext_id, Status.REJECTED))  # restarts the ring
    assert (ch._load(OFF_COMP_HEAD), ch._load(OFF_COMP_TAIL)) == (0, 1)
    assert ch.submit_raw(b"") and agent.step(0) is None  # the agent answers nothing, lives
    ch._store(OFF_SUB_HEAD, U64)
    ch._store(OFF_SUB_TAIL, U64)
    assert ch.submit_raw(b"x")  # an empty ring at the limit restarts at 0
    assert ch._load(OFF_SUB_TAIL) == 1
    alive(agent, ch)


def test_flood_is_bounded_per_turn_and_answered(served: tuple[Agent, Channel, Path]) -> None:
    agent, ch, _ = served
    ch.completions()
    answered = 0
    for _ in range(40):  # 40 x 64 slots of garbage: 2560 submissions
        while ch.submit_raw(b"\xff" * RECORD_SIZE):
            pass
        agent.step(0)
        answered += sum(c.reason.startswith("malformed") for c in ch.completions())
        assert ch.pending() <= ch.sub_slots
    assert answered >= 40 * 32  # PER_TURN per step, nothing lost silently
    assert agent.counters["decisions"] >= answered
    alive(agent, ch)


@pytest.mark.parametrize("garbage", [
    b"",                                                    # empty file
    b"x" * (HEADER_SIZE - 1),                               # shorter than a header
    HEADER.pack(MAGIC, VERSION, HEADER_SIZE, 4, RECORD_SIZE, 4, RECORD_SIZE, 1)
    .ljust(HEADER_SIZE + 8 * RECORD_SIZE + 1, b"\0"),       # a byte too many (not u64s)
    HEADER.pack(MAGIC, VERSION, HEADER_SIZE, 1 << 31, RECORD_SIZE, 4, RECORD_SIZE, 1)
    .ljust(HEADER_SIZE + 8 * RECORD_SIZE, b"\0"),           # slots beyond the file
    HEADER.pack(MAGIC, VERSION + 1, HEADER_SIZE, 4, RECORD_SIZE, 4, RECORD_SIZE, 1)
    .ljust(HEADER_SIZE + 8 * RECORD_SIZE, b"\0"),           # another version
    HEADER.pack(MAGIC, VERSION, HEADER_SIZE, 0, RECORD_SIZE, 0, RECORD_SIZE, 1)
    .ljust(HEADER_SIZE, b"\0"),                             # no slots
    HEADER.pack(MAGIC, VERSION, 64, 4, 128, 4, RECORD_SIZE, 1)
    .ljust(HEADER_SIZE + 8 * RECORD_SIZE, b"\0"),           # other record sizes
])
def test_garbage_headers_are_ring_errors(tmp_path: Path, garbage: bytes) -> None:
    p = tmp_path / "r.ring"
    p.write_bytes(garbage)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RingError) as e:
        Channel.open(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)
    assert len(os.listdir("/proc/self/fd")) == fds  # a refused ring leaks no fd


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 4 * RECORD_SIZE))
def test_random_headers_never_raise_anything_else(tmp_path_factory: pytest.TempPathFactory,
                                                  raw: bytes) -> None:
    p = tmp_path_factory.mktemp("h") / "r.ring"
    p.write_bytes(MAGIC + raw[8:] if raw[0] & 1 else raw)  # half with a valid magic
    try:
        Channel.open(p).close()
    except RingError as e:
        assert "\n" not in str(e)


def test_registered_ring_replaced_by_garbage_is_unusable_not_fatal(
        served: tuple[Agent, Channel, Path]) -> None:
    agent, ch, ring = served
    ext_id = ch.ext_id
    ring.write_bytes(b"\x00garbage" * 41)  # 328 bytes: a new file, wrong everywhere
    agent._drop(ext_id)  # re-adopt: as after an agent restart
    agent.sync(force=True)
    agent.step(0)
    audit = [r for r in read_jsonl(agent.root / "audit.jsonl") if r.get("id") == ext_id]
    assert any(r["what"] == "ring-unusable" for r in audit), audit


def _in_child(fn: object) -> int:
    """Run ``fn()`` in a forked child; its exit status (a signal shows as -signum)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()  # type: ignore[operator]
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.mark.parametrize("size", [0, HEADER_SIZE, HEADER_SIZE + RECORD_SIZE])
def test_ring_truncated_under_the_agent(served: tuple[Agent, Channel, Path], size: int) -> None:
    """An extension truncating its ring must not SIGBUS the agent through the mapping."""
    agent, ch, ring = served
    assert ch.submit(Recommendation("nosuchdev", "read_ahead_kb", "1", 0.9, "m", 60_000, 0))

    def child() -> None:
        os.truncate(ring, size)
        for _ in range(5):
            agent.step(0)
        audit = read_jsonl(agent.root / "audit.jsonl")
        assert any(r.get("what") == "ring-unusable" and "truncated" in r["reason"]
                   for r in audit)
        assert all(lv.channel is None for lv in agent._live.values())

    assert _in_child(child) == 0  # -7 would be SIGBUS: the agent died
    assert struct.calcsize("<Q") == 8
