"""The control channel: protocol, hostile input, peer checks, socket file.

The server side runs here for real (socket, threads, SO_PEERCRED) in front of
:class:`FakeServer`, a stand-in for :class:`ublk_driver.server.Server` with
the methods the channel calls (``set_fault``, ``set_leg_state``,
``leg_info``, ``promote_leg``: a colleague is adding them to the real Server
for issue 6).  The real server is in test_ctl_ublk.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ublk_driver.ctl import (
    MAX_LINE,
    OPS,
    ControlAccessError,
    ControlClient,
    ControlServer,
    ControlTimeoutError,
    RequestFailedError,
    ServerUnreachableError,
    socket_path,
)
from ublk_driver.faults import FaultSpec
from ublk_driver.uapi import DevInfo


@dataclass
class FakeLeg:
    leg: int
    state: str = "active"
    dirty_regions: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0
    probes: int = 0


class _Backend:
    def describe(self) -> dict[str, object]:
        return {"target": "mirror", "size": 64 << 20}


@dataclass
class FakeServer:
    """What the channel needs of a Server; records what it was asked to do."""

    dev_id: int = 7
    info: DevInfo | None = field(default_factory=lambda: DevInfo(nr_hw_queues=2,
                                                                 queue_depth=64, dev_id=7))
    backend: _Backend = field(default_factory=_Backend)
    legs: list[FakeLeg] = field(default_factory=lambda: [FakeLeg(0), FakeLeg(1)])
    calls: list[tuple[str, object, object]] = field(default_factory=list)
    promote_gate: threading.Event = field(default_factory=threading.Event)
    promote_error: str | None = None

    def __post_init__(self) -> None:
        self.promote_gate.set()

    def stats(self) -> dict[str, Any]:
        return {"queues": [{"q_id": 0, "ops": [3, 4, 0, 0, 0], "errors": 0, "batches": 5},
                           {"q_id": 1, "ops": [0, 2, 0, 0, 0], "errors": 2, "batches": 1,
                            "last_error": {"errno": "ETIMEDOUT", "op": "WRITE",
                                           "offset": 4096},
                            "plugin": {"timeouts": 1, "late": 0, "unserved": 0,
                                       "stuck": 1}}]}

    def _check_leg(self, leg: int) -> None:
        if leg >= len(self.legs):
            raise ValueError(f"no leg {leg}: the mirror has legs 0..{len(self.legs) - 1}")

    def set_fault(self, path: int, spec: Any) -> None:
        self._check_leg(path)
        self.calls.append(("set_fault", path, spec))

    def set_leg_state(self, leg: int, state: str) -> None:
        self._check_leg(leg)
        self.calls.append(("set_leg_state", leg, state))
        self.legs[leg] = replace(self.legs[leg], state=state)

    def leg_info(self) -> list[FakeLeg]:
        return list(self.legs)

    def promote_leg(self, leg: int) -> None:
        self._check_leg(leg)
        self.calls.append(("promote_leg", leg, None))
        self.promote_gate.wait(30)
        if self.promote_error:
            raise OSError(self.promote_error)
        self.legs[leg] = replace(self.legs[leg], state="active")


@dataclass
class Served:
    fake: FakeServer
    ctl: ControlServer
    state_dir: str
    log: list[str]

    @property
    def path(self) -> str:
        return self.ctl.path

    def client(self, timeout: float = 5.0) -> ControlClient:
        return ControlClient(self.fake.dev_id, timeout, self.state_dir)


@contextlib.contextmanager
def serve(fake: FakeServer | None = None, **kw: Any) -> Iterator[Served]:
    """A ControlServer for ``fake`` in a short temporary state dir (sun_path is 108 bytes)."""
    fake = fake or FakeServer()
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    log: list[str] = []
    ctl = ControlServer(fake, socket_path(fake.dev_id, d), log=log.append, **kw).start()
    try:
        yield Served(fake, ctl, d, log)
    finally:
        ctl.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served() -> Iterator[Served]:
    with serve() as s:
        yield s


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


# ---- the socket file ------------------------------------------------------------------


def test_socket_is_0600_and_removed_on_close() -> None:
    with serve() as s:
        st_ = os.stat(s.path)
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600
        assert st_.st_uid == os.geteuid()
        assert os.listdir(s.state_dir) == ["7.sock"]  # no temporary name left
    assert not os.path.exists(s.path)


def test_stale_socket_is_replaced_and_close_leaves_a_successor_alone() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        path = socket_path(7, d)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()                       # a dead server's file
        first = ControlServer(FakeServer(), path, log=lambda _: None).start()
        assert ControlClient(7, 5, d).call("status")["dev_id"] == 7
        second = ControlServer(FakeServer(), path, log=lambda _: None).start()
        first.close()                       # must not unlink the second's socket
        assert ControlClient(7, 5, d).call("status")["dev_id"] == 7
        second.close()
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_state_dir_that_cannot_hold_sockets_falls_back_to_dir_ctl() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        blocked = os.path.join(d, "state")
        open(blocked, "w").close()          # bind there fails (as on the test bed's 9p share)
        ctl = ControlServer(FakeServer(), socket_path(7, blocked), log=lambda _: None).start()
        try:
            assert ctl.path == os.path.join(d, "state-ctl", "7.sock")
            assert stat.S_IMODE(os.stat(ctl.path).st_mode) == 0o600
            assert ControlClient(7, 5, blocked).call("status")["socket"] == ctl.path
        finally:
            ctl.close()
        assert not os.path.exists(ctl.path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- ops -----------------------------------------------------------------------------


def test_status(served: Served) -> None:
    st_ = served.client().call("status")
    assert st_["dev_id"] == 7 and st_["bdev"] == "/dev/ublkb7" and st_["pid"] == os.getpid()
    assert st_["socket"] == served.path
    assert st_["queues"] == 2 and st_["depth"] == 64
    assert st_["target"] == {"target": "mirror", "size": 64 << 20}
    assert st_["stats"]["queues"][0]["ops"] == [3, 4, 0, 0, 0]
    assert [leg["state"] for leg in st_["legs"]] == ["active", "active"]
    assert st_["legs"][1] == {"leg": 1, "state": "active", "dirty_regions": 0, "reads": 0,
                              "writes": 0, "errors": 0, "probes": 0}
    assert st_["jobs"] == []


def test_status_without_legs(served: Served) -> None:
    served.fake.legs = []
    assert "legs" not in served.client().call("status")
    assert served.client().call("leg_info") == {"legs": []}


def test_demote_and_fail(served: Served) -> None:
    c = served.client()
    assert c.call("leg_set", leg=1, state="demoted") == {"leg": 1, "state": "demoted",
                                                          "previous": "active"}
    assert c.call("leg_set", leg=0, state="failed")["previous"] == "active"
    assert served.fake.calls == [("set_leg_state", 1, "demoted"), ("set_leg_state", 0, "failed")]
    assert [leg["state"] for leg in c.call("leg_info")["legs"]] == ["failed", "demoted"]


def test_promote_runs_in_a_job(served: Served) -> None:
    c = served.client()
    c.call("leg_set", leg=1, state="demoted")
    served.fake.promote_gate.clear()            # the resync "takes time"
    out = c.call("leg_set", leg=1, state="active")
    assert out["state"] == "promoting" and out["previous"] == "demoted"
    job = out["job"]
    assert job["state"] == "running" and job["leg"] == 1
    with pytest.raises(RequestFailedError, match="leg 1 is being promoted"):
        c.call("leg_set", leg=1, state="failed")
    assert c.call("status")["jobs"][0]["state"] == "running"
    with pytest.raises(ControlTimeoutError, match="still being promoted"):
        c.wait_job(job["id"], timeout=0.3)
    served.fake.promote_gate.set()
    done = c.wait_job(job["id"], timeout=10)
    assert done["state"] == "done" and done["error"] is None and done["finished"]
    assert c.call("leg_info")["legs"][1]["state"] == "active"


def test_failed_promotion_is_reported(served: Served) -> None:
    served.fake.promote_error = "resync read error on leg 0"
    c = served.client()
    job = c.wait_job(c.call("leg_set", leg=1, state="active")["job"]["id"], timeout=10)
    assert job["state"] == "failed" and job["error"] == "resync read error on leg 0"
    assert any("promoting leg 1 failed" in line for line in served.log)


def test_a_failing_server_method_is_an_error_answer(served: Served) -> None:
    c = served.client()
    with pytest.raises(RequestFailedError, match=r"no leg 5: the mirror has legs 0\.\.1") as e:
        c.call("leg_set", leg=5, state="demoted")
    assert e.value.code == "failed"
    with pytest.raises(RequestFailedError, match="no job 99"):
        c.call("job", id=99)
    assert c.call("status")["dev_id"] == 7      # still serving


def test_fault_set_and_clear(served: Served) -> None:
    c = served.client()
    spec = FaultSpec.parse("delay=2ms,slow=10,burst=1s/200ms,errors=1%,ops=read")
    out = c.call("fault_set", path=1, spec=spec.to_dict())
    assert out == {"path": 1, "spec": spec.to_dict()}
    assert served.fake.calls == [("set_fault", 1, spec)]
    assert c.call("status")["faults"] == {"1": spec.to_dict()}
    assert c.call("fault_set", spec={"delay_us": 5})["path"] == 0   # path defaults to 0
    assert c.call("fault_clear", path=1) == {"cleared": [1]}
    assert c.call("status")["faults"] == {"0": {**FaultSpec(delay_us=5).to_dict()}}
    assert c.call("fault_clear") == {"cleared": [0, 1]}             # every leg
    assert served.fake.calls[-2:] == [("set_fault", 0, None), ("set_fault", 1, None)]
    assert c.call("status")["faults"] == {}


@pytest.mark.parametrize(("spec", "message"), [
    ({"slow": 0.5}, "fault_set: bad spec: fault: slow must be a factor from 1 to 1000"),
    ({"delay": 5}, "fault_set: bad spec: unknown fault field(s) delay"),
    ({"ops": "read"}, "fault_set: bad spec: fault ops must be a list of names"),
])
def test_bad_fault_specs(served: Served, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestFailedError) as e:
        served.client().call("fault_set", spec=spec)
    assert str(e.value).startswith(message) and e.value.code == "bad_request"
    assert served.fake.calls == []


def test_a_server_that_knows_its_faults_is_asked() -> None:
    fake = FakeServer()
    known = {0: FaultSpec(delay_us=7)}
    fake.faults = lambda: known  # type: ignore[attr-defined]   # like Backend.faults()
    with serve(fake) as s:
        assert s.client().call("status")["faults"] == {"0": known[0].to_dict()}


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


def test_stuck_and_dribbling_clients_are_cut_off() -> None:
    with serve(io_timeout=0.5) as s:
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5)
            c.connect(s.path)
            t0 = time.monotonic()
            for _ in range(10):          # one byte every 0.1 s never completes a line
                with contextlib.suppress(OSError):
                    c.sendall(b"{")
                time.sleep(0.1)
            answer = json.loads(c.recv(65536).splitlines()[0])
            assert "no complete request line within 0.5 s" in answer["error"]
            try:
                rest = c.recv(100)
            except ConnectionResetError:  # closed with our later bytes unread: also closed
                rest = b""
            assert rest == b""            # closed
            assert time.monotonic() - t0 < 3
        assert s.client().call("status")["dev_id"] == 7


def test_connections_beyond_the_limit_are_told_busy() -> None:
    with serve(max_clients=1) as s, socket.socket(socket.AF_UNIX) as hog:
        hog.connect(s.path)
        time.sleep(0.2)               # the hog holds the only slot
        with pytest.raises(RequestFailedError, match="busy: too many control connections") as e:
            s.client().call("status")
        assert e.value.code == "busy"
        hog.close()
        deadline = time.monotonic() + 10   # the slot frees when the server sees the close
        while True:
            try:
                assert s.client().call("status")["dev_id"] == 7
                break
            except RequestFailedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)


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


# ---- who may connect ----------------------------------------------------------------------------

NOBODY = 65534


def _as_nobody(state_dir: str) -> tuple[str, str]:
    """Run a client as uid 65534 in a forked child: (error class, message)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                ControlClient(7, 5, state_dir).call("status")
                out = ("ok", "")
            except Exception as e:
                out = (type(e).__name__, str(e))
            os.write(wfd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    cls, msg = json.loads(data)
    return str(cls), str(msg)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")
def test_another_uid_is_refused_by_the_file_mode_and_by_so_peercred() -> None:
    with serve() as s:
        os.chmod(s.state_dir, 0o755)
        # 0600: the kernel refuses the connect itself
        cls, msg = _as_nobody(s.state_dir)
        assert cls == ControlAccessError.__name__
        assert "permission denied on" in msg and "only root and the user" in msg
        # even with the file opened up, the server checks the peer's uid
        os.chmod(s.path, 0o666)
        cls, msg = _as_nobody(s.state_dir)
        assert cls == ControlAccessError.__name__
        assert msg == (f"permission denied: uid {NOBODY} may not use this control channel "
                       f"(only root and uid 0, the server's owner)")
        assert any("refused a connection from pid" in line and f"uid {NOBODY}" in line
                   for line in s.log)
        assert s.fake.calls == []
        assert s.client().call("status")["dev_id"] == 7     # root still may


def test_refusals_are_logged_at_a_bounded_rate(served: Served) -> None:
    for _ in range(30):
        served.ctl._refused(1, NOBODY, NOBODY)
    assert len([x for x in served.log if "refused" in x]) == 20


# ---- client errors ---------------------------------------------------------------------------


def test_client_without_a_server() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        with pytest.raises(ServerUnreachableError, match=r"is the server running\? see "
                           r"`ublkml list`"):
            ControlClient(3, 1, d).call("status")
        stale = socket.socket(socket.AF_UNIX)      # a file nobody listens on
        stale.bind(socket_path(3, d))
        stale.close()
        with pytest.raises(ServerUnreachableError, match="no control channel for ublk device 3"):
            ControlClient(3, 1, d).call("status")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_client_timeout_and_silent_hangup() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        with socket.socket(socket.AF_UNIX) as mute:
            mute.bind(socket_path(4, d))
            mute.listen(4)                         # accepts (in the backlog), never answers
            with pytest.raises(ControlTimeoutError, match=r"did not answer 'status' within 0\.3 s"):
                ControlClient(4, 0.3, d).call("status")
        with socket.socket(socket.AF_UNIX) as rude:
            rude.bind(socket_path(5, d))
            rude.listen(4)

            def hang_up() -> None:
                conn, _ = rude.accept()
                conn.close()
            t = threading.Thread(target=hang_up)
            t.start()
            with pytest.raises(ServerUnreachableError, match="closed the control channel"):
                ControlClient(5, 5, d).call("status")
            t.join()
    finally:
        shutil.rmtree(d, ignore_errors=True)
