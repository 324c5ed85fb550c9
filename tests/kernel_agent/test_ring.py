"""The recommendation ring: codec round trips, hostile bytes, SPSC behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_agent.errors import RingError
from kernel_agent.ring import (
    RECORD_SIZE,
    Channel,
    Completion,
    MalformedRecord,
    Recommendation,
    Status,
    decode_completion,
    decode_submission,
    encode_completion,
    encode_submission,
)

text32 = st.text(st.characters(codec="utf-8", categories=("L", "N", "P"), include_characters=" "),
                 max_size=8)
recs = st.builds(Recommendation, device=text32, action=text32, value=text32,
                 confidence=st.floats(allow_nan=False, allow_infinity=False), model=text32,
                 ttl_ms=st.integers(0, 2**32 - 1), ext_id=st.integers(0, 2**32 - 1),
                 seq=st.integers(0, 2**32 - 1), created_ns=st.integers(0, 2**64 - 1))


@given(recs)
def test_submission_round_trip(rec: Recommendation) -> None:
    raw = encode_submission(rec)
    assert len(raw) == RECORD_SIZE
    assert decode_submission(raw) == rec


@given(st.binary(min_size=0, max_size=300))
def test_arbitrary_bytes_are_rejected_or_decoded(raw: bytes) -> None:
    try:
        rec = decode_submission(raw)
    except MalformedRecord as e:
        assert str(e)
    else:
        assert math.isfinite(rec.confidence)


@given(recs, st.integers(0, RECORD_SIZE - 1), st.integers(1, 255))
def test_any_flipped_byte_is_detected(rec: Recommendation, pos: int, xor: int) -> None:
    raw = bytearray(encode_submission(rec))
    raw[pos] ^= xor
    with pytest.raises(MalformedRecord):
        decode_submission(bytes(raw))


@given(st.builds(Completion, seq=st.integers(0, 2**32 - 1), ext_id=st.integers(0, 2**32 - 1),
                 status=st.sampled_from(Status), device=text32, action=text32, old=text32,
                 new=text32, reason=st.text(max_size=30).filter(str.isprintable),
                 ts_ns=st.integers(0, 2**64 - 1)))
def test_completion_round_trip(c: Completion) -> None:
    assert decode_completion(encode_completion(c)) == c


def test_long_strings_are_cut_not_refused() -> None:
    rec = Recommendation("é" * 40, "a" * 40, "v" * 100, 0.9, "m" * 100, 10, 1)
    back = decode_submission(encode_submission(rec))
    assert back.device == "é" * 16 and back.action == "a" * 32 and len(back.model) == 64


def test_channel_spsc(tmp_path: Path) -> None:
    agent_side = Channel.create(tmp_path / "r.ring", ext_id=7, slots=4)
    ext_side = Channel.open(tmp_path / "r.ring")
    sent = [ext_side.submit(Recommendation("loop0", "read_ahead_kb", str(i), 0.9, "m", 1000, 0))
            for i in range(5)]
    assert all(s is not None for s in sent[:4]) and sent[4] is None  # full at 4
    raws, problem = agent_side.take_submissions(10)
    assert problem is None
    recs_ = [decode_submission(r) for r in raws]
    assert [r.value for r in recs_] == ["0", "1", "2", "3"]
    assert all(r.ext_id == 7 for r in recs_) and len({r.seq for r in recs_}) == 4
    for r in recs_:
        assert agent_side.complete(Completion(r.seq, 7, Status.REJECTED, reason="x"))
    assert [c.seq for c in ext_side.completions()] == [r.seq for r in recs_]
    assert ext_side.completions() == []
    # Wrap-around: the slots are reused.
    for i in range(10):
        assert ext_side.submit(Recommendation("d", "a", str(i), 1, "m", 1, 0)) is not None
        raws, _ = agent_side.take_submissions(10)
        assert decode_submission(raws[0]).value == str(i)


def test_corrupt_indices_resynchronise(tmp_path: Path) -> None:
    ch = Channel.create(tmp_path / "r.ring", ext_id=1, slots=4)
    ch._store(128, 1000)  # tail far ahead of head
    raws, problem = ch.take_submissions(10)
    assert raws == [] and problem and "resynchronised" in problem
    assert ch.pending() == 0


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"x" * 10)
    with pytest.raises(RingError, match="truncated"):
        Channel.open(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"x" * 4096)
    with pytest.raises(RingError, match="magic"):
        Channel.open(tmp_path / "junk")
    with pytest.raises(RingError):
        Channel.open(tmp_path / "missing")


@settings(max_examples=50)
@given(st.lists(st.binary(min_size=RECORD_SIZE, max_size=RECORD_SIZE), max_size=6))
def test_raw_garbage_through_the_ring(tmp_path_factory: pytest.TempPathFactory,
                                      blobs: list[bytes]) -> None:
    d = tmp_path_factory.mktemp("ring")
    ch = Channel.create(d / "r.ring", ext_id=1, slots=8)
    for b in blobs:
        assert ch.submit_raw(b)
    raws, _ = ch.take_submissions(100)
    assert raws == blobs
