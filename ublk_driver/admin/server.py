"""The server side of a device's admin socket: :class:`AdminServer`.

A running server (:class:`ublk_driver.server.Server`) serves one Unix stream
socket, created once the device is live and removed when it stops (where:
:mod:`~ublk_driver.admin.paths`; what travels on it:
:mod:`~ublk_driver.admin.protocol`).  ``ublkml status | fault | leg`` and the
kernel agent talk to it.  It is not the kernel's ``/dev/ublk-control``
(:mod:`ublk_driver.control`).

Security: the peer is identified with ``SO_PEERCRED`` on every connection;
only root and the uid that owns the server process may use the socket.
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
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ublk_driver.admin.paths import fallback_path
from ublk_driver.admin.protocol import (
    MAX_LINE,
    BadRequest,
    StatusPath,
    encode,
    error_answer,
    one_line,
    parse_request,
)
from ublk_driver.core.priority import raise_thread_priority

if TYPE_CHECKING:
    from ublk_driver.faults import FaultSpec

IO_TIMEOUT = 5.0              # seconds to receive one request line / send one answer
MAX_CLIENTS = 8               # connections served at once
REFUSALS_LOGGED_PER_MIN = 20
JOBS_KEPT = 32                # finished promotion jobs remembered for `job`/`status`


# ---- what the socket drives ---------------------------------------------------------


class _Info(Protocol):
    @property
    def nr_hw_queues(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...


class _Described(Protocol):
    def describe(self) -> dict[str, object]: ...


class Administered(Protocol):
    """The parts of :class:`ublk_driver.server.Server` the admin socket uses.

    What the three setters return is ignored (``object``: any return type fits).
    Optional, looked up at run time: ``faults()`` (path -> FaultSpec) and
    ``completion_paths()`` (``CompletionPath`` objects, or mappings of the same
    keys: ``status`` lists them as ``paths``).
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


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), not from the peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


# ---- the server ------------------------------------------------------------------------


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


class AdminServer:
    """Serves the admin socket of one device from daemon threads."""

    def __init__(self, server: Administered, path: str, log: Callable[[str], None] | None = None,
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

    def start(self) -> AdminServer:
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
        # Connection threads inherit this priority: a demotion asked by the
        # agent is applied here, and must not wait behind CPU-bound processes.
        why = raise_thread_priority()
        if why is not None:
            self._log(f"admin socket: {why}")
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
            self._send_quietly(conn, error_answer(
                f"permission denied: uid {uid} may not use this admin socket (only root "
                f"and uid {self.owner_uid}, the server's owner)", "denied"))
            conn.close()
            return
        if not self._slots.acquire(blocking=False):
            self._send_quietly(conn, error_answer("busy: too many control connections; retry",
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
                        self._send_quietly(conn, error_answer(problem, "bad_request"))
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
            return error_answer(str(e), "bad_request")
        except Exception as e:   # e.g. a pathological JSON document
            return error_answer(f"bad request: {e!r}", "bad_request")
        try:
            result = getattr(self, f"_op_{op}")(**fields)
        except BadRequest as e:
            return error_answer(str(e), "bad_request")
        except Exception as e:
            msg = one_line(str(e) or type(e).__name__)
            self._log(f"{op} from uid {uid} failed: {msg}")
            return error_answer(msg, "failed")
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
        out["paths"] = self._paths()
        return out

    def _paths(self) -> list[StatusPath]:
        """The server's completion paths and their drives (``status``'s ``paths``):
        ``[{"index", "name", "backing", "drives": [{"name", "dev"}], "no_drive"}]``.
        Empty for a server that does not know them (no ``completion_paths()``)."""
        getter = getattr(self.server, "completion_paths", None)
        if not callable(getter):
            return []
        try:
            paths = list(getter())
        except Exception as e:   # status still answers; the log says what broke
            self._log(f"status: cannot list the completion paths: {one_line(str(e))}")
            return []
        out: list[StatusPath] = []
        for p in paths:
            d = p.to_dict() if hasattr(p, "to_dict") else dict(p)
            out.append({"index": d["index"], "name": d["name"], "backing": d["backing"],
                        "drives": [{"name": x["name"], "dev": x["dev"]} for x in d["drives"]],
                        "no_drive": d["no_drive"]})
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


# The names from when this was ublk_driver.ctl ("control" is the kernel's
# /dev/ublk-control, ublk_driver.control).
ControlServer = AdminServer
Controlled = Administered
