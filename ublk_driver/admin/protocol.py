"""The admin socket's protocol, shared by :mod:`~ublk_driver.admin.server` and
:mod:`~ublk_driver.admin.client`: requests, answers, limits and errors.

One UTF-8 JSON object per line, both ways, each request line at most
:data:`MAX_LINE` bytes (answers: :data:`MAX_ANSWER`).  A request is
``{"op": NAME, ...fields}``; the answer is ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line", "code": C}`` with ``C`` one of ``denied``,
``busy``, ``bad_request``, ``failed``.  A connection may carry several requests
in turn.  Ops (:data:`OPS`):

* ``status``: device id, target, queues, stats, legs (if any), faults, jobs,
  and ``paths``: per completion path (the ``path`` of records, summaries and
  faults) ``{"index": int, "name": str, "backing": str | null, "drives":
  [{"name": "sda", "dev": "8:0"}], "no_drive": null | "why there is none"}``;
* ``fault_set`` ``{path: int = 0, spec: FaultSpec dict}``;
* ``fault_clear`` ``{path: int | null = null}`` (null: every path);
* ``leg_set`` ``{leg: int, state: "active" | "demoted" | "failed"}``.
  ``demoted``/``failed`` take effect before the answer.  ``active`` means
  promote: a resync that may take minutes, so it runs in a worker thread and
  the answer carries a job (``{"id", "state": "running", ...}``) at once;
* ``job`` ``{id: int}``: a promotion's state (running, done or failed);
* ``leg_info``: the legs (leg, state, dirty_regions, reads, writes, errors, probes).

:func:`parse_request` raises :class:`BadRequest` (the server answers
``bad_request``); the client raises an :class:`AdminError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypedDict

from ublk_driver.core.errors import UblkError

MAX_LINE = 64 * 1024          # bytes per request line
MAX_ANSWER = 1 << 20          # bytes per answer line
LEG_STATES = ("active", "demoted", "failed")
_MAX_INT = (1 << 31) - 1


# ---- errors (client side) -------------------------------------------------------


class AdminError(UblkError):
    """The admin socket of a device could not be used."""


class ServerUnreachableError(AdminError, ConnectionError):
    """No server listens for that device."""


class AdminAccessError(AdminError, PermissionError):
    """The socket or the server refused this user."""


class AdminTimeoutError(AdminError, TimeoutError):
    """The server did not answer in time."""


class RequestFailedError(AdminError):
    """The server answered the request with an error (``code`` says which kind)."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


# The names from when this was ublk_driver.ctl: "control" said the kernel's
# /dev/ublk-control (ublk_driver.control, ControlError) as much as this socket.
ControlChannelError = AdminError
ControlAccessError = AdminAccessError
ControlTimeoutError = AdminTimeoutError


# ---- status's "paths" -------------------------------------------------------------------


class StatusDrive(TypedDict):
    """A drive under a completion path: ``{"name": "sda", "dev": "8:0"}``."""

    name: str      # the whole disk as in /sys/block
    dev: str       # "MAJ:MIN"


class StatusPath(TypedDict):
    """One entry of ``status``'s ``paths`` (ublk_driver.drives resolves the drives)."""

    index: int                  # the ``path`` of completion records, summaries, faults
    name: str                   # "leg0"... for a mirror, else the target's name
    backing: str | None         # the file or block device behind the path
    drives: list[StatusDrive]   # empty when there is none
    no_drive: str | None        # why ``drives`` is empty; null when it is not


# ---- requests (server side) ---------------------------------------------------------


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


# ---- answers ----------------------------------------------------------------------------


def one_line(text: str, limit: int = 500) -> str:
    """Errors travel as one line: collapse whitespace, cap the length."""
    s = " ".join(text.split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def error_answer(message: str, code: str) -> dict[str, Any]:
    """The answer ``{"ok": false, "error": message, "code": code}``, message on one line."""
    return {"ok": False, "error": one_line(message), "code": code}


def encode(obj: Mapping[str, Any]) -> bytes:
    """One request or answer as its line, newline included."""
    # ensure_ascii (the default) keeps every answer on one line.
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
