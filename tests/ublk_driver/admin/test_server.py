"""The admin server: its socket file, its ops, slow and surplus clients, who may connect.

The server runs here for real (socket, threads, SO_PEERCRED) in front of
:class:`~tests.ublk_driver.admin.doubles.FakeServer`; the real server is in
test_admin_ublk.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.ublk_driver.admin.doubles import FakeServer, Served, serve
from ublk_driver.admin import (
    AdminAccessError,
    AdminClient,
    AdminServer,
    AdminTimeoutError,
    RequestFailedError,
    socket_path,
)
from ublk_driver.faults import FaultSpec

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
        first = AdminServer(FakeServer(), path, log=lambda _: None).start()
        assert AdminClient(7, 5, d).call("status")["dev_id"] == 7
        second = AdminServer(FakeServer(), path, log=lambda _: None).start()
        first.close()                       # must not unlink the second's socket
        assert AdminClient(7, 5, d).call("status")["dev_id"] == 7
        second.close()
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_state_dir_that_cannot_hold_sockets_falls_back_to_dir_ctl() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        blocked = os.path.join(d, "state")
        open(blocked, "w").close()          # bind there fails (as on the test bed's 9p share)
        ctl = AdminServer(FakeServer(), socket_path(7, blocked), log=lambda _: None).start()
        try:
            assert ctl.path == os.path.join(d, "state-ctl", "7.sock")
            assert stat.S_IMODE(os.stat(ctl.path).st_mode) == 0o600
            assert AdminClient(7, 5, blocked).call("status")["socket"] == ctl.path
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


def test_status_paths(served: Served) -> None:
    assert served.client().call("status")["paths"] == [
        {"index": 0, "name": "leg0", "backing": "/data/leg0.img",
         "drives": [{"name": "sda", "dev": "8:0"}], "no_drive": None},
        {"index": 1, "name": "leg1", "backing": "/dev/shm/leg1.img", "drives": [],
         "no_drive": "/dev/shm/leg1.img is on tmpfs (device 0:27), a file system with no "
                     "block device of its own"}]


def test_status_paths_as_mappings_keep_only_the_schema(served: Served) -> None:
    served.fake.paths = [{"index": 0, "name": "python", "backing": None, "extra": 1,
                          "drives": [{"name": "nvme0n1", "dev": "259:0", "model": "x"}],
                          "no_drive": None}]
    assert served.client().call("status")["paths"] == [
        {"index": 0, "name": "python", "backing": None,
         "drives": [{"name": "nvme0n1", "dev": "259:0"}], "no_drive": None}]


def test_status_paths_when_the_server_cannot_tell(served: Served) -> None:
    served.fake.paths = OSError("sysfs is gone")
    st_ = served.client().call("status")
    assert st_["paths"] == [] and st_["dev_id"] == 7          # the rest still answers
    assert any("cannot list the completion paths: sysfs is gone" in m for m in served.log)


@dataclass
class _Older(FakeServer):
    """A server without completion_paths() (the Administered protocol's optional part)."""

    completion_paths = None  # type: ignore[assignment]


def test_status_paths_of_a_server_without_them() -> None:
    with serve(_Older()) as s:
        st_ = s.client().call("status")
        assert st_["paths"] == [] and st_["target"] == {"target": "mirror", "size": 64 << 20}


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
    with pytest.raises(AdminTimeoutError, match="still being promoted"):
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


# ---- slow and surplus clients ------------------------------------------------------------


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
                AdminClient(7, 5, state_dir).call("status")
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
        assert cls == AdminAccessError.__name__
        assert "permission denied on" in msg and "only root and the user" in msg
        # even with the file opened up, the server checks the peer's uid
        os.chmod(s.path, 0o666)
        cls, msg = _as_nobody(s.state_dir)
        assert cls == AdminAccessError.__name__
        assert msg == (f"permission denied: uid {NOBODY} may not use this admin socket "
                       f"(only root and uid 0, the server's owner)")
        assert any("refused a connection from pid" in line and f"uid {NOBODY}" in line
                   for line in s.log)
        assert s.fake.calls == []
        assert s.client().call("status")["dev_id"] == 7     # root still may


def test_refusals_are_logged_at_a_bounded_rate(served: Served) -> None:
    for _ in range(30):
        served.ctl._refused(1, NOBODY, NOBODY)
    assert len([x for x in served.log if "refused" in x]) == 20
