"""The admin protocol: one-line errors for bad requests, line limits, fuzzed input.

Requests go to a real AdminServer in front of a FakeServer; whatever arrives,
the answer is one line and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ublk_driver.admin.doubles import FakeLeg, Served, serve
from ublk_driver.admin import MAX_LINE, OPS
from ublk_driver.faults import FaultSpec


def raw(path: str, data: bytes, timeout: float = 5.0) -> list[bytes]:
    """Send bytes, read until the server closes or goes quiet; the answer lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                buf += chunk
    return buf.splitlines()


# ---- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), [
    (b"", "not valid JSON"),
    (b"status", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", 'needs "op"'),
    (b'{"op": 3}', 'needs "op"'),
    (b'{"op": "format_disk"}', "unknown op \"format_disk\" (ops: fault_clear, fault_set, job"),
    (b'{"op": "status", "x": 1}', 'unexpected field "x"'),
    (b'{"op": "leg_set", "state": "demoted"}', "missing field 'leg'"),
    (b'{"op": "leg_set", "leg": "1", "state": "demoted"}', "leg must be an integer"),
    (b'{"op": "leg_set", "leg": true, "state": "demoted"}', "leg must be an integer"),
    (b'{"op": "leg_set", "leg": -1, "state": "demoted"}', "leg must be an integer"),
    (b'{"op": "leg_set", "leg": 1.0, "state": "demoted"}', "leg must be an integer"),
    (b'{"op": "leg_set", "leg": 99999999999, "state": "x"}', "leg must be an integer"),
    (b'{"op": "leg_set", "leg": 1, "state": "gone"}', "state must be one of active, demoted"),
    (b'{"op": "leg_set", "leg": 1, "state": NaN}', "NaN is not valid JSON"),
    (b'{"op": "fault_set", "spec": "delay"}', "spec must be a JSON object"),
    (b'{"op": "fault_clear", "path": "all"}', "path must be an integer"),
    (b'{"op": "job"}', "missing field 'id'"),
    (b"[" * 100000, "not valid JSON"),
])
def test_bad_requests_get_one_line_errors(served: Served, line: bytes, message: str) -> None:
    answer = served.ctl.handle_line(line)
    assert answer["ok"] is False and answer["code"] == "bad_request"
    assert message in answer["error"]
    assert "\n" not in answer["error"]


def test_several_requests_on_one_connection(served: Served) -> None:
    lines = raw(served.path, b'{"op":"leg_info"}\nnope\n{"op":"status"}\r\n')
    answers = [json.loads(x) for x in lines]
    assert [a["ok"] for a in answers] == [True, False, True]


def test_oversize_line_is_refused_and_the_connection_closed(served: Served) -> None:
    lines = raw(served.path, b"x" * (MAX_LINE + 10) + b"\n" + b'{"op":"status"}\n')
    assert len(lines) == 1
    assert json.loads(lines[0])["error"] == f"request line longer than {MAX_LINE} bytes"
    # exactly at the limit is still read (and refused only as bad JSON)
    lines = raw(served.path, b" " * (MAX_LINE - 15) + b'{"op":"status"}\n')
    assert json.loads(lines[0])["ok"] is True


# ---- fuzz -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
requests = st.builds(
    lambda op, fields: {"op": op, **fields},
    st.sampled_from([*OPS, "", "STATUS", "fault"]),
    st.dictionaries(st.sampled_from(["path", "spec", "leg", "state", "id", "x"]),
                    json_values | st.sampled_from(["active", "demoted", "failed"]) |
                    st.integers(0, 3), max_size=3))


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[Served]:
    with serve() as s:
        yield s


def _one_answer(s: Served, line: bytes) -> dict[str, Any]:
    lines = raw(s.path, line + b"\n")
    assert len(lines) == 1, lines
    answer: dict[str, Any] = json.loads(lines[0])
    assert isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert isinstance(answer["error"], str) and answer["error"]
    return answer


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")))
def test_fuzz_bytes_never_hurt_the_server(fuzz_target: Served, line: bytes) -> None:
    _one_answer(fuzz_target, line)
    assert fuzz_target.ctl._thread is not None and fuzz_target.ctl._thread.is_alive()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests)
def test_fuzz_json_requests_get_an_answer(fuzz_target: Served, req: dict[str, Any]) -> None:
    fuzz_target.fake.legs = [FakeLeg(0), FakeLeg(1)]
    _one_answer(fuzz_target, json.dumps(req).encode())
    assert fuzz_target.ctl._thread is not None and fuzz_target.ctl._thread.is_alive()


# ---- fault specs ------------------------------------------------------------------------------

fault_specs = st.builds(
    lambda delay, slow, sched, ppm, ops, err, seed: FaultSpec(
        delay_us=delay, slow=slow, error_ppm=ppm, ops=tuple(ops), errno=err, seed=seed,
        **sched),
    st.integers(0, (1 << 32) - 1), st.floats(1, 1000),
    st.one_of(st.just({}), st.integers(1, 10_000).flatmap(
        lambda period: st.integers(1, period).map(
            lambda on: {"mode": "burst", "burst_period_ms": period, "burst_on_ms": on})),
        st.integers(1, 1 << 20).map(lambda r: {"mode": "ramp", "ramp_ms": r})),
    st.integers(0, 1_000_000),
    st.lists(st.sampled_from(["read", "write", "flush", "discard", "write_zeroes"]),
             min_size=1, unique=True),
    st.integers(1, 4095), st.integers(0, (1 << 64) - 1))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault_specs, st.integers(0, 1))
def test_fault_specs_cross_the_channel_intact(fuzz_target: Served, spec: FaultSpec,
                                              path: int) -> None:
    fuzz_target.fake.legs = [FakeLeg(0), FakeLeg(1)]
    out = fuzz_target.client().call("fault_set", path=path, spec=spec.to_dict())
    assert fuzz_target.fake.calls[-1] == ("set_fault", path, spec)
    assert FaultSpec.from_dict(out["spec"]) == spec
