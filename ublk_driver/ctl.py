"""The control channel of a running server: one Unix stream socket per device.

The socket is ``$UBLKML_STATE_DIR/<dev_id>.sock`` (default ``/run/ublkml``),
created by the server once the device is live and removed when it stops.

Protocol: one UTF-8 JSON object per line, both ways, each line at most
:data:`MAX_LINE` bytes.  A request is ``{"op": NAME, ...fields}``; the answer
is ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line", "code": C}``
with ``C`` one of ``denied``, ``busy``, ``bad_request``, ``failed``.  A
connection may carry several requests in turn.  Ops (:data:`OPS`):

* ``status``: device id, target, queues, stats, legs (if any), faults, jobs;
* ``fault_set`` ``{path: int = 0, spec: FaultSpec dict}``;
* ``fault_clear`` ``{path: int | null = null}`` (null: every path);
* ``leg_set`` ``{leg: int, state: "active" | "demoted" | "failed"}``.
  ``demoted``/``failed`` take effect before the answer.  ``active`` means
  promote: a resync that may take minutes, so it runs in a worker thread and
  the answer carries a job (``{"id", "state": "running", ...}``) at once;
* ``job`` ``{id: int}``: a promotion's state (running, done or failed);
* ``leg_info``: the legs (leg, state, dirty_regions, reads, writes, errors, probes).

Security: the peer is identified with ``SO_PEERCRED`` on every connection;
only root and the uid that owns the server process may use the channel.
Others get a ``denied`` answer, the connection is closed, and the refusal is
logged to the server's stderr (at most :data:`REFUSALS_LOGGED_PER_MIN` a
minute, then a count).  The socket file is mode 0600 from the moment it
appears (bound under a temporary name, chmod-ed, then renamed).

Robustness: nothing a client sends can raise in the server.  Each request
line must arrive within :data:`IO_TIMEOUT` seconds (a deadline for the whole
line, so that a byte-a-second client gains nothing), an over-long line is
answered with an error and the connection closed, at most
:data:`MAX_CLIENTS` connections are served at once (others get ``busy``),
and refused peers never hold a slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ublk_driver.errors import UblkError

if TYPE_CHECKING:
    from ublk_driver.faults import FaultSpec

MAX_LINE = 64 * 1024          # bytes per request line (answers: MAX_ANSWER)
MAX_ANSWER = 1 << 20
IO_TIMEOUT = 5.0              # seconds to receive one request line / send one answer
MAX_CLIENTS = 8               # connections served at once
REFUSALS_LOGGED_PER_MIN = 20
JOBS_KEPT = 32                # finished promotion jobs remembered for `job`/`status`
LEG_STATES = ("active", "demoted", "failed")
_MAX_INT = (1 << 31) - 1


def default_state_dir() -> str:
    return os.environ.get("UBLKML_STATE_DIR", "/run/ublkml")


def socket_path(dev_id: int, state_dir: str | None = None) -> str:
    return os.path.join(state_dir or default_state_dir(), f"{dev_id}.sock")


def fallback_path(path: str) -> str:
    """Where the socket goes when its directory cannot hold sockets: ``<dir>-ctl/``.

    Some file systems refuse them (the test bed's state dir is a 9p share:
    bind fails with ENXIO); server and client both know this second place.
    """
    directory, name = os.path.split(path)
    return os.path.join(directory.rstrip("/") + "-ctl", name)


_SHARED_FS = ("9p", "nfs", "nfs4", "cifs", "smb3", "ceph", "virtiofs", "fuse")


def fs_type(path: str) -> str:
    """The file system type of ``path`` (or of its nearest existing parent)."""
    p = os.path.realpath(path)
    while not os.path.exists(p) and p != "/":
        p = os.path.dirname(p)
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = fields[4].replace("\\040", " ")
                inside = p == mnt or p.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
    except OSError:
        pass
    return kind


def local_path(path: str) -> str:
    """``path``, or its :func:`fallback_path` when its directory is on a shared
    file system (9p, NFS, FUSE...): sockets cannot live there, and a mirror's
    journal needs shared mappings of a local page cache."""
    kind = fs_type(os.path.dirname(path) or ".")
    return fallback_path(path) if kind.split(".")[0] in _SHARED_FS else path


# ---- errors (client side) -------------------------------------------------------


class ControlChannelError(UblkError):
    """The control channel of a device could not be used."""


class ServerUnreachableError(ControlChannelError, ConnectionError):
    """No server listens for that device."""


class ControlAccessError(ControlChannelError, PermissionError):
    """The socket or the server refused this user."""


class ControlTimeoutError(ControlChannelError, TimeoutError):
    """The server did not answer in time."""


class RequestFailedError(ControlChannelError):
    """The server answered the request with an error (``code`` says which kind)."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


# ---- what the channel drives ------------------------------------------------------


class _Info(Protocol):
    @property
    def nr_hw_queues(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...


class _Described(Protocol):
    def describe(self) -> dict[str, object]: ...


class Controlled(Protocol):
    """The parts of :class:`ublk_driver.server.Server` the channel uses.

    What the three setters return is ignored (``object``: any return type fits).
    """

    @property
    def dev_id(self) -> int: ...

    @property
    def info(self) -> _Info | None: ...

    @property
    def backend(self) -> _Described: ...

    def stats(self) -> dict[str, Any]: ...

    def set_fault(self, path: int, spec: FaultSpec | None) -> object: ...

    def set_leg_state(self, leg: int, state: str) -> object: ...

    def leg_info(self) -> Sequence[Any]: ...

    def promote_leg(self, leg: int) -> object: ...


# ---- request validation -------------------------------------------------------------


class BadRequest(Exception):
    """A request that cannot be served as sent (message: what is wrong)."""


def _int_field(op: str, name: str, v: object) -> int:
    # bool is an int to Python, not to a user who typed `true`.
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MAX_INT:
        raise BadRequest(f"{op}: {name} must be an integer 0..{_MAX_INT}, got {_show(v)}")
    return v


def _show(v: object) -> str:
    text = json.dumps(v) if not isinstance(v, bytes) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


#: op -> {field: (required, kind)}; kind: "int", "int?" (int or null), "str", "object"
OPS: dict[str, dict[str, tuple[bool, str]]] = {
    "status": {},
    "leg_info": {},
    "fault_set": {"path": (False, "int"), "spec": (True, "object")},
    "fault_clear": {"path": (False, "int?")},
    "leg_set": {"leg": (True, "int"), "state": (True, "str")},
    "job": {"id": (True, "int")},
}


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """One request line -> (op, fields), or :class:`BadRequest` saying what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request is not UTF-8") from None

    def no_constants(name: str) -> None:
        raise BadRequest(f"{name} is not valid JSON")

    try:
        req = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise BadRequest("request is not valid JSON (one object per line)") from None
    if not isinstance(req, dict):
        raise BadRequest('request must be a JSON object like {"op": "status"}')
    op = req.pop("op", None)
    if not isinstance(op, str):
        raise BadRequest('request needs "op": a string')
    schema = OPS.get(op)
    if schema is None:
        raise BadRequest(f"unknown op {_show(op)} (ops: {', '.join(sorted(OPS))})")
    extra = sorted(set(req) - set(schema))
    if extra:
        raise BadRequest(f"{op}: unexpected field {_show(extra[0])} "
                         f"(fields: {', '.join(schema) or 'none'})")
    out: dict[str, Any] = {}
    for name, (required, kind) in schema.items():
        if name not in req:
            if required:
                raise BadRequest(f"{op}: missing field {name!r}")
            continue
        v = req[name]
        if kind == "int" or (kind == "int?" and v is not None):
            out[name] = _int_field(op, name, v)
        elif kind == "int?":
            out[name] = None
        elif kind == "str":
            if not isinstance(v, str):
                raise BadRequest(f"{op}: {name} must be a string, got {_show(v)}")
            out[name] = v
        elif kind == "object":
            if not isinstance(v, dict):
                raise BadRequest(f"{op}: {name} must be a JSON object, got {_show(v)}")
            out[name] = v
    if op == "leg_set" and out["state"] not in LEG_STATES:
        raise BadRequest(f"leg_set: state must be one of {', '.join(LEG_STATES)}, "
                         f"got {_show(out['state'])}")
    return op, out


def one_line(text: str, limit: int = 500) -> str:
    """Errors travel as one line: collapse whitespace, cap the length."""
    s = " ".join(text.split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _error(message: str, code: str) -> dict[str, Any]:
    return {"ok": False, "error": one_line(message), "code": code}


def encode(obj: Mapping[str, Any]) -> bytes:
    # ensure_ascii (the default) keeps every answer on one line.
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), not from the peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


# ---- the server side -------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """A promotion running in a worker thread."""

    id: int
    leg: int
    op: str = "promote"
    state: str = "running"        # running -> done | failed
    error: str | None = None
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ControlServer:
    """Serves the control socket of one device from daemon threads."""

    def __init__(self, server: Controlled, path: str, log: Callable[[str], None] | None = None,
                 io_timeout: float = IO_TIMEOUT, max_clients: int = MAX_CLIENTS) -> None:
        self.server = server
        self.path = path
        self.owner_uid = os.geteuid()
        self.io_timeout = io_timeout
        self._log_fn = log
        self._slots = threading.BoundedSemaphore(max_clients)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()         # jobs and faults
        self._jobs: dict[int, Job] = {}
        self._job_ids = itertools.count(1)
        self._faults: dict[int, dict[str, Any]] = {}
        self._refusal_window = (0.0, 0)       # (start of the minute, refusals in it)
        self._ino = -1

    # -- lifecycle --

    def start(self) -> ControlServer:
        try:
            sock = self._bind(self.path)
        except OSError as first:
            try:
                sock = self._bind(fallback_path(self.path))
            except OSError:
                raise first from None
            self.path = fallback_path(self.path)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept_loop, name="ublkml-ctl",
                                        daemon=True)
        self._thread.start()
        return self

    def _bind(self, path: str) -> socket.socket:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            # 0600 before it takes its real name: nobody finds it wider (and the
            # peer check below guards the temporary name too).
            os.chmod(tmp, 0o600)
            sock.listen(16)
            os.replace(tmp, path)   # replaces a stale socket of a dead server
            self._ino = os.stat(path).st_ino
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return sock

    def close(self) -> None:
        """Stop accepting, remove the socket file (if still ours); idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)

    # -- threads --

    def _log(self, msg: str) -> None:
        line = f"ublkml ctl[{self._dev_label()}]: {msg}"
        if self._log_fn is not None:
            self._log_fn(line)
        else:
            with contextlib.suppress(OSError, ValueError):
                print(line, file=sys.stderr, flush=True)

    def _dev_label(self) -> str:
        try:
            return f"dev {self.server.dev_id}"
        except Exception:
            return self.path

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                # A short poll rather than a blocking accept: close() can stop
                # the thread without relying on how shutdown() wakes accept.
                if not select.select([listener], [], [], 0.25)[0]:
                    continue
                conn, _ = listener.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                self._log(f"accept failed: {e}")   # EMFILE and the like: back off
                time.sleep(0.5)
                continue
            try:
                self._admit(conn)
            except Exception as e:
                self._log(f"connection dropped: {e}")
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        if uid not in (0, self.owner_uid):
            self._refused(pid, uid, gid)
            self._send_quietly(conn, _error(
                f"permission denied: uid {uid} may not use this control channel (only root "
                f"and uid {self.owner_uid}, the server's owner)", "denied"))
            conn.close()
            return
        if not self._slots.acquire(blocking=False):
            self._send_quietly(conn, _error("busy: too many control connections; retry",
                                            "busy"))
            conn.close()
            return
        try:
            threading.Thread(target=self._serve_connection, args=(conn, uid),
                             name="ublkml-ctl-conn", daemon=True).start()
        except BaseException:
            self._slots.release()
            raise

    def _refused(self, pid: int, uid: int, gid: int) -> None:
        now = time.monotonic()
        start, n = self._refusal_window
        if now - start >= 60:
            if n > REFUSALS_LOGGED_PER_MIN:
                self._log(f"{n - REFUSALS_LOGGED_PER_MIN} more refusals in the last minute "
                          "not logged")
            start, n = now, 0
        n += 1
        self._refusal_window = (start, n)
        if n <= REFUSALS_LOGGED_PER_MIN:
            self._log(f"refused a connection from pid {pid} uid {uid} gid {gid} "
                      f"(only root and uid {self.owner_uid} may connect)")

    def _send_quietly(self, conn: socket.socket, answer: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(0.5)
            conn.sendall(encode(answer))

    def _serve_connection(self, conn: socket.socket, uid: int) -> None:
        try:
            buf = b""
            while not self._stop.is_set():
                line, buf, problem = self._read_line(conn, buf)
                if line is None:
                    if problem:
                        self._send_quietly(conn, _error(problem, "bad_request"))
                    return
                answer = self.handle_line(line, uid)
                conn.settimeout(self.io_timeout)
                conn.sendall(encode(answer))
        except OSError:
            pass  # the client went away or stopped reading: its loss only
        except Exception as e:  # a bug of ours must not kill more than this connection
            self._log(f"internal error serving a connection: {one_line(repr(e))}")
        finally:
            conn.close()
            self._slots.release()

    def _read_line(self, conn: socket.socket, buf: bytes
                   ) -> tuple[bytes | None, bytes, str | None]:
        """(line, rest, None), or (None, b"", why the connection ends or None at EOF)."""
        deadline = time.monotonic() + self.io_timeout
        while b"\n" not in buf:
            if len(buf) > MAX_LINE:
                return None, b"", f"request line longer than {MAX_LINE} bytes"
            left = deadline - time.monotonic()
            if left <= 0:
                return None, b"", f"no complete request line within {self.io_timeout:g} s"
            conn.settimeout(left)
            try:
                chunk = conn.recv(min(65536, MAX_LINE + 1 - len(buf)))
            except TimeoutError:
                return None, b"", f"no complete request line within {self.io_timeout:g} s"
            if not chunk:
                return None, b"", None
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        if len(line) > MAX_LINE:
            return None, b"", f"request line longer than {MAX_LINE} bytes"
        return line, rest, None

    # -- requests --

    def handle_line(self, line: bytes, uid: int = 0) -> dict[str, Any]:
        """Answer one request line; never raises (every problem is an error answer)."""
        try:
            op, fields = parse_request(line.rstrip(b"\r"))
        except BadRequest as e:
            return _error(str(e), "bad_request")
        except Exception as e:   # e.g. a pathological JSON document
            return _error(f"bad request: {e!r}", "bad_request")
        try:
            result = getattr(self, f"_op_{op}")(**fields)
        except BadRequest as e:
            return _error(str(e), "bad_request")
        except Exception as e:
            msg = one_line(str(e) or type(e).__name__)
            self._log(f"{op} from uid {uid} failed: {msg}")
            return _error(msg, "failed")
        return {"ok": True, **result}

    def _op_status(self) -> dict[str, Any]:
        s = self.server
        info = s.info
        out: dict[str, Any] = {"dev_id": s.dev_id, "bdev": f"/dev/ublkb{s.dev_id}",
                               "pid": os.getpid(), "socket": self.path,
                               "queues": info.nr_hw_queues if info else None,
                               "depth": info.queue_depth if info else None,
                               "target": s.backend.describe(), "stats": s.stats()}
        # Not every target has legs: only a mirror's are listed.
        with contextlib.suppress(Exception):
            legs = self._legs()
            if legs:
                out["legs"] = legs
        out["faults"] = self._current_faults()
        with self._lock:
            out["jobs"] = [j.as_dict() for j in self._jobs.values()]
        return out

    def _current_faults(self) -> dict[str, Any]:
        # The server (or its target) knows every fault, `ublkml add --fault`
        # ones included; without either, those set through this channel.
        for getter in self._fault_getters():
            with contextlib.suppress(Exception):
                return {str(p): spec.to_dict() for p, spec in sorted(dict(getter()).items())}
        with self._lock:
            return {str(p): d for p, d in sorted(self._faults.items())}

    def _fault_getters(self) -> list[Callable[[], Any]]:
        owners = (self.server, getattr(self.server, "backend", None))
        return [g for g in (getattr(o, "faults", None) for o in owners) if callable(g)]

    def _op_fault_set(self, spec: dict[str, Any], path: int = 0) -> dict[str, Any]:
        from ublk_driver.faults import FaultSpec

        try:
            parsed = FaultSpec.from_dict(spec)
        except (ValueError, TypeError, KeyError) as e:
            raise BadRequest(f"fault_set: bad spec: {one_line(str(e))}") from None
        self.server.set_fault(path, parsed)
        with self._lock:
            self._faults[path] = parsed.to_dict()
        return {"path": path, "spec": parsed.to_dict()}

    def _op_fault_clear(self, path: int | None = None) -> dict[str, Any]:
        if path is not None:
            paths = [path]
        else:
            with self._lock:
                known = set(self._faults)
            for getter in self._fault_getters():
                with contextlib.suppress(Exception):
                    known |= set(dict(getter()))
            legs: list[dict[str, Any]] = []
            with contextlib.suppress(Exception):
                legs = self._legs()
            paths = sorted(known | set(range(max(len(legs), 1))))
        for p in paths:
            self.server.set_fault(p, None)
            with self._lock:
                self._faults.pop(p, None)
        return {"cleared": paths}

    def _legs(self) -> list[dict[str, Any]]:
        out = []
        for leg in self.server.leg_info():
            d = (dataclasses.asdict(leg)
                 if dataclasses.is_dataclass(leg) and not isinstance(leg, type) else dict(leg))
            out.append(d)
        return out

    def _op_leg_info(self) -> dict[str, Any]:
        return {"legs": self._legs()}

    def _leg_state(self, leg: int) -> str | None:
        with contextlib.suppress(Exception):
            for d in self._legs():
                if d.get("leg") == leg:
                    return str(d.get("state"))
        return None

    def _running_job(self, leg: int) -> Job | None:
        with self._lock:
            for j in self._jobs.values():
                if j.leg == leg and j.state == "running":
                    return j
        return None

    def _op_leg_set(self, leg: int, state: str) -> dict[str, Any]:
        busy = self._running_job(leg)
        if busy is not None:
            raise BadRequest(f"leg {leg} is being promoted (job {busy.id}); wait for it "
                             f"(`ublkml leg -n ID list`)")
        previous = self._leg_state(leg)
        if state != "active":
            self.server.set_leg_state(leg, state)
            return {"leg": leg, "state": state, "previous": previous}
        with self._lock:
            job = Job(next(self._job_ids), leg)
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.state != "running"]
            for old in finished[:max(0, len(finished) - JOBS_KEPT)]:
                del self._jobs[old.id]
        threading.Thread(target=self._promote, args=(job,), name=f"ublkml-promote-{leg}",
                         daemon=True).start()
        return {"leg": leg, "state": "promoting", "previous": previous, "job": job.as_dict()}

    def _promote(self, job: Job) -> None:
        error = None
        try:
            self.server.promote_leg(job.leg)
        except Exception as e:
            error = one_line(str(e) or type(e).__name__)
            self._log(f"promoting leg {job.leg} failed: {error}")
        with self._lock:
            job.state, job.error, job.finished = ("failed" if error else "done"), error, \
                time.time()

    def _op_job(self, id: int) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(id)
            if job is None:
                raise BadRequest(f"no job {id} (jobs are kept for the last {JOBS_KEPT} "
                                 "promotions)")
            return {"job": job.as_dict()}


# ---- the client side -------------------------------------------------------------------


class ControlClient:
    """Talks to the control channel of device ``dev_id``; one connection per call."""

    def __init__(self, dev_id: int, timeout: float = 10.0, state_dir: str | None = None
                 ) -> None:
        self.dev_id = dev_id
        self.timeout = timeout
        self.path = socket_path(dev_id, state_dir)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; the answer without ``ok``, or a :class:`ControlChannelError`."""
        request = encode({"op": op, **fields})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(self.timeout)
            self._connect(s)
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    # A refusing server may hang up first: its answer still waits.
                    s.sendall(request)
                text = self._read_answer(s)
            except TimeoutError:
                raise ControlTimeoutError(
                    f"the server of ublk device {self.dev_id} did not answer {op!r} within "
                    f"{self.timeout:g} s") from None
            except OSError as e:
                raise ServerUnreachableError(
                    f"lost the control channel of ublk device {self.dev_id}: "
                    f"{e.strerror or e}") from None
        try:
            answer = json.loads(text)
            ok = answer.pop("ok")
        except (ValueError, AttributeError, KeyError):
            raise ControlChannelError(f"unreadable answer from the server of ublk device "
                                      f"{self.dev_id}: {one_line(text, 80)!r}") from None
        if ok is not True:
            msg = str(answer.get("error", "request failed"))
            code = str(answer.get("code", "failed"))
            if code == "denied":
                raise ControlAccessError(msg)
            raise RequestFailedError(msg, code)
        result: dict[str, Any] = answer
        return result

    def _connect(self, s: socket.socket) -> None:
        try:
            try:
                s.connect(self.path)
            except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):
                s.connect(fallback_path(self.path))
        except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):
            raise ServerUnreachableError(
                f"no control channel for ublk device {self.dev_id} ({self.path}): is the "
                "server running? see `ublkml list`") from None
        except PermissionError:
            raise ControlAccessError(
                f"permission denied on {self.path}: only root and the user who started the "
                f"server of ublk device {self.dev_id} may use it") from None
        except TimeoutError:
            raise ControlTimeoutError(f"connecting to {self.path} timed out after "
                                      f"{self.timeout:g} s") from None

    def _read_answer(self, s: socket.socket) -> str:
        buf = b""
        while b"\n" not in buf:
            if len(buf) > MAX_ANSWER:
                raise ControlChannelError(f"answer from the server of ublk device "
                                          f"{self.dev_id} is longer than {MAX_ANSWER} bytes")
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:   # it closed with our request unread
                chunk = b""
            if not chunk:
                raise ServerUnreachableError(
                    f"the server of ublk device {self.dev_id} closed the control channel "
                    "without answering (is it stopping?)")
            buf += chunk
        return buf.partition(b"\n")[0].decode("utf-8", "replace")

    def wait_job(self, job_id: int, timeout: float | None = None, poll: float = 0.2
                 ) -> dict[str, Any]:
        """Poll a promotion job until it is no longer running; its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.call("job", id=job_id)["job"]
            if job.get("state") != "running":
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise ControlTimeoutError(
                    f"leg {job.get('leg')} is still being promoted after {timeout:g} s "
                    f"(job {job_id}); `ublkml leg -n {self.dev_id} list` shows its progress")
            time.sleep(poll)
