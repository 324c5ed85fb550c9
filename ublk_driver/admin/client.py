"""The client side of a device's admin socket: :class:`AdminClient`.

One connection per call; every failure is an :class:`~ublk_driver.admin.protocol.AdminError`
whose message says what to do (is the server running? who may use it?).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from typing import Any

from ublk_driver.admin.paths import fallback_path, socket_path
from ublk_driver.admin.protocol import (
    MAX_ANSWER,
    AdminAccessError,
    AdminError,
    AdminTimeoutError,
    RequestFailedError,
    ServerUnreachableError,
    encode,
    one_line,
)


class AdminClient:
    """Talks to the admin socket of device ``dev_id``; one connection per call."""

    def __init__(self, dev_id: int, timeout: float = 10.0, state_dir: str | None = None
                 ) -> None:
        self.dev_id = dev_id
        self.timeout = timeout
        self.path = socket_path(dev_id, state_dir)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; the answer without ``ok``, or an :class:`AdminError`."""
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
                raise AdminTimeoutError(
                    f"the server of ublk device {self.dev_id} did not answer {op!r} within "
                    f"{self.timeout:g} s") from None
            except OSError as e:
                raise ServerUnreachableError(
                    f"lost the connection to the admin socket of ublk device {self.dev_id}: "
                    f"{e.strerror or e}") from None
        try:
            answer = json.loads(text)
            ok = answer.pop("ok")
        except (ValueError, AttributeError, KeyError):
            raise AdminError(f"unreadable answer from the server of ublk device "
                             f"{self.dev_id}: {one_line(text, 80)!r}") from None
        if ok is not True:
            msg = str(answer.get("error", "request failed"))
            code = str(answer.get("code", "failed"))
            if code == "denied":
                raise AdminAccessError(msg)
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
                f"no admin socket for ublk device {self.dev_id} ({self.path}): is the "
                "server running? see `ublkml list`") from None
        except PermissionError:
            raise AdminAccessError(
                f"permission denied on {self.path}: only root and the user who started the "
                f"server of ublk device {self.dev_id} may use it") from None
        except TimeoutError:
            raise AdminTimeoutError(f"connecting to {self.path} timed out after "
                                    f"{self.timeout:g} s") from None

    def _read_answer(self, s: socket.socket) -> str:
        buf = b""
        while b"\n" not in buf:
            if len(buf) > MAX_ANSWER:
                raise AdminError(f"answer from the server of ublk device "
                                 f"{self.dev_id} is longer than {MAX_ANSWER} bytes")
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:   # it closed with our request unread
                chunk = b""
            if not chunk:
                raise ServerUnreachableError(
                    f"the server of ublk device {self.dev_id} closed the admin socket "
                    "connection without answering (is it stopping?)")
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
                raise AdminTimeoutError(
                    f"leg {job.get('leg')} is still being promoted after {timeout:g} s "
                    f"(job {job_id}); `ublkml leg -n {self.dev_id} list` shows its progress")
            time.sleep(poll)


# The name from when this was ublk_driver.ctl ("control" is the kernel's
# /dev/ublk-control, ublk_driver.control).
ControlClient = AdminClient
