"""Reading drive telemetry trees (Perseus layout) and label files, strictly.

Layout: ``DIR/<host>/<any name>.csv`` with the header ``ts,disk_id,throughput,
latency`` (extra columns are ignored, order is free); the drives of a host are
peers.  Files at the top of ``DIR`` (``labels.csv``, ...) are not telemetry.
Labels: a CSV with ``host,disk_id`` naming the fail-slow drives.

Every problem (missing column, a value that is not a finite non-negative
number, time going backwards, an empty file) raises :class:`TelemetryError`
with one line naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ublk_driver.core.errors import UblkError

COLUMNS = ("ts", "disk_id", "throughput", "latency")


class TelemetryError(UblkError, ValueError):
    """A telemetry or label file cannot be used; the message names it."""


def _show(cells: list[str], limit: int = 60) -> str:
    """File content quoted for a one-line error: a quoted CSV cell may hold newlines."""
    text = repr(",".join(cells))
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class HostData:
    """All samples of one host, ordered by time; ``drive`` indexes ``disk_ids``."""

    host: str
    disk_ids: tuple[str, ...]
    ts: npt.NDArray[np.float64]
    drive: npt.NDArray[np.int64]
    throughput: npt.NDArray[np.float64]
    latency: npt.NDArray[np.float64]


def _numbers(path: str, name: str, cells: list[str], lines: list[int]
             ) -> npt.NDArray[np.float64]:
    """The column as floats; ``lines[i]`` is the file line of ``cells[i]`` (for errors)."""
    try:
        v = np.array(cells, dtype=np.float64)
    except ValueError:
        # numpy and float() do not accept quite the same spellings: name the cell
        # float() refuses, else take float()'s reading of every cell.
        vals = []
        for i, c in enumerate(cells):
            try:
                vals.append(float(c))
            except ValueError:
                raise TelemetryError(f"{path}: line {lines[i]}: {name} {_cell(c)} is not a "
                                     "number") from None
        v = np.array(vals, dtype=np.float64)
    bad = ~np.isfinite(v) | (v < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise TelemetryError(f"{path}: line {lines[i]}: {name} is {_cell(cells[i])}; "
                             "expected a finite number >= 0")
    return v


def _cell(text: str) -> str:
    return _show([text], 40)


def read_file(path: str) -> tuple[npt.NDArray[np.float64], list[str], npt.NDArray[np.float64],
                                  npt.NDArray[np.float64]]:
    """(ts, disk_id, throughput, latency) of one telemetry CSV."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            # The line each row ends on: a quoted cell may span lines, and blank
            # lines are skipped below, so a row's index is not its line number.
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TelemetryError(f"{path}: cannot read it: {e}") from None
    if not rows or not any(c.strip() for c in rows[0][1]):
        raise TelemetryError(f"{path}: empty file (expected the header "
                             f"{','.join(COLUMNS)})")
    first = rows[0][1]
    header = [c.strip().lower() for c in first]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TelemetryError(f"{path}: missing column(s) {', '.join(missing)} "
                             f"(header: {_show(first)})")
    body = [(ln, r) for ln, r in rows[1:] if r and any(c.strip() for c in r)]
    if not body:
        raise TelemetryError(f"{path}: no data rows after the header")
    width = len(header)
    for ln, r in body:
        if len(r) != width:
            raise TelemetryError(f"{path}: line {ln}: {len(r)} fields, the header has "
                                 f"{width}")
    col = {c: header.index(c) for c in COLUMNS}
    lines = [ln for ln, _ in body]
    ts = _numbers(path, "ts", [r[col["ts"]] for _, r in body], lines)
    tput = _numbers(path, "throughput", [r[col["throughput"]] for _, r in body], lines)
    lat = _numbers(path, "latency", [r[col["latency"]] for _, r in body], lines)
    disks = [r[col["disk_id"]].strip() for _, r in body]
    if any(not d for d in disks):
        raise TelemetryError(f"{path}: line {lines[disks.index('')]}: empty disk_id")
    back = np.flatnonzero(np.diff(ts) < 0)
    if back.size:
        i = int(back[0]) + 1
        raise TelemetryError(f"{path}: line {lines[i]}: ts goes backwards "
                             f"({_cell(body[i][1][col['ts']])} after "
                             f"{_cell(body[i - 1][1][col['ts']])}); rows must be sorted by time")
    return ts, disks, tput, lat


def read_host(host: str, files: list[str]) -> HostData:
    """Concatenate a host's files (one per day) in name order."""
    parts = [read_file(p) for p in sorted(files)]
    ts = np.concatenate([p[0] for p in parts])
    disks = [d for p in parts for d in p[1]]
    tput = np.concatenate([p[2] for p in parts])
    lat = np.concatenate([p[3] for p in parts])
    order = np.argsort(ts, kind="stable")  # days named out of order still merge
    ids, drive = np.unique(np.array(disks, dtype=object)[order].astype(str), return_inverse=True)
    return HostData(host=host, disk_ids=tuple(str(i) for i in ids), ts=ts[order],
                    drive=drive.astype(np.int64), throughput=tput[order], latency=lat[order])


def list_tree(root: str) -> dict[str, list[str]]:
    """host -> its CSV files, for ``root/<host>/*.csv``."""
    if not os.path.isdir(root):
        raise TelemetryError(f"{root}: not a directory")
    hosts: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(root)):
        d = os.path.join(root, entry)
        if os.path.isdir(d):
            files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".csv"))
            if files:
                hosts[entry] = files
    if not hosts:
        raise TelemetryError(f"{root}: no telemetry (expected {root}/<host>/<day>.csv files "
                             f"with columns {','.join(COLUMNS)})")
    return hosts


def read_tree(root: str, progress: Callable[[int, int], None] | None = None) -> list[HostData]:
    """Every host of a telemetry tree."""
    tree = list_tree(root)
    out = []
    for i, (host, files) in enumerate(tree.items()):
        out.append(read_host(host, files))
        if progress is not None:
            progress(i + 1, len(tree))
    return out


def read_labels(path: str) -> set[tuple[str, str]]:
    """The (host, disk_id) pairs of a labels CSV."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TelemetryError(f"{path}: cannot read the labels: {e}") from None
    if not rows:
        raise TelemetryError(f"{path}: empty labels file (expected the header host,disk_id)")
    header = [c.strip().lower() for c in rows[0][1]]
    if "host" not in header or "disk_id" not in header:
        raise TelemetryError(f"{path}: labels need columns host,disk_id (header: "
                             f"{_show(rows[0][1])})")
    h, d = header.index("host"), header.index("disk_id")
    out = set()
    for ln, r in rows[1:]:
        if not r or not any(c.strip() for c in r):
            continue
        if len(r) <= max(h, d) or not r[h].strip() or not r[d].strip():
            raise TelemetryError(f"{path}: line {ln}: expected host,disk_id")
        out.add((r[h].strip(), r[d].strip()))
    return out


def tree_window(root: str) -> float | None:
    """The detection window a tree asks for: ``window_s`` of ``root/recording.json``
    (written by ``ublkml ml record``: 1-s rows want 30-s windows), else None."""
    path = os.path.join(root, "recording.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            w = json.load(f).get("window_s")
    except (OSError, ValueError, AttributeError) as e:
        raise TelemetryError(f"{path}: cannot read it: {e}") from None
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
            or w <= 0:
        raise TelemetryError(f"{path}: window_s must be a positive number, got {w!r}")
    return float(w)
