"""The extension's record encoder: names to ids, confidence to permille, values to integers.

Pure: no kernel here (the host tests in test_agent_host.py submit through a real
queue); these check the encoding the kernel is then given.
"""

from __future__ import annotations

import math
import re

from hypothesis import given
from hypothesis import strategies as st

from kernel_agent.rcqueue import UNENCODABLE, encode, model_id
from kernel_agent.recocheck_model import ACTION_IDS, SCHEDULERS, SUB, Submission
from kernel_agent.ring import Recommendation

U32_MAX = (1 << 32) - 1


def rec(action: str, value: str, confidence: float = 0.9, ttl_ms: int = 1000,
        model: str = "m") -> Recommendation:
    return Recommendation("loop0", action, value, confidence, model, ttl_ms, ext_id=7, seq=3)


@given(action=st.sampled_from(sorted(set(ACTION_IDS) - {"scheduler"})),
       value=st.integers(-(10**17), 10**17),
       confidence=st.floats(allow_nan=True, allow_infinity=True),
       ttl=st.integers(-10, 1 << 40), created=st.integers(0, (1 << 64) - 1),
       model=st.text(max_size=70))
def test_integer_actions_round_trip(action: str, value: int, confidence: float, ttl: int,
                                    created: int, model: str) -> None:
    sub = encode(rec(action, str(value), confidence, ttl, model), 7 << 20 | 3, created)
    raw = sub.pack()
    assert len(raw) == SUB.size
    back = Submission.unpack(raw)
    assert back == sub
    assert (back.ext_id, back.seq, back.dev, back.created_ns) == (7, 3, 7 << 20 | 3, created)
    assert back.action == ACTION_IDS[action] and back.value == value
    assert back.ttl_ms == max(0, min(U32_MAX, ttl)) and back.model == model_id(model)
    if math.isnan(confidence) or confidence * 1000 >= U32_MAX:
        assert back.confidence == U32_MAX           # refused as above 1, like the validator
    elif confidence <= 0:
        assert back.confidence == 0
    else:
        assert back.confidence == round(confidence * 1000)


@given(st.sampled_from(SCHEDULERS))
def test_scheduler_names_become_indices(name: str) -> None:
    assert encode(rec("scheduler", f" {name}\n"), 1, 1).value == SCHEDULERS.index(name)


@given(st.text(max_size=30).filter(lambda t: t.strip() not in SCHEDULERS))
def test_unknown_scheduler_cannot_pass(text: str) -> None:
    assert encode(rec("scheduler", text), 1, 1).value == UNENCODABLE


@given(st.one_of(st.text(max_size=40), st.from_regex(r"\A\s*-{0,2}[0-9]{1,20}\s*\Z")))
def test_anything_encodes_and_non_integers_cannot_pass(text: str) -> None:
    sub = encode(rec("read_ahead_kb", text), 1, 1)
    v = text.strip()
    integer = re.fullmatch(r"-?[0-9]{1,18}", v) is not None
    assert sub.value == (int(v) if integer else UNENCODABLE)
    assert len(sub.pack()) == SUB.size


def test_unknown_action_is_id_zero() -> None:
    """Id 0 is never allowed in rc_actions: the kernel answers ACTION."""
    assert encode(rec("format_disk", "1"), 1, 1).action == 0
