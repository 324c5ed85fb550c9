"""Reading drive telemetry trees (Perseus layout, as published) and label files.

Layout: ``DIR/.../<host>/<any name>.csv``: every directory under ``DIR`` that
holds CSV files is a host, named by its path relative to ``DIR`` with ``/``
(``cluster_A/host_1``); the drives of a host are peers.  Files at the top of
``DIR`` (``labels.csv``, ``slow_drive_info.csv``, ...) are not telemetry.
A telemetry file has the header ``ts,disk_id,throughput,latency`` (quoted or
not, any order, extra columns ignored).  Rows may come in any order (the
published files group them per drive); a host's samples are sorted by time.

Missing values, ``NA`` or an empty cell in ``ts``, ``throughput`` or
``latency`` (about 1 % of the published rows), drop their row; the dropped
rows are counted per file (:attr:`HostData.files`) and in total
(:func:`dropped_rows`).  Anything else that is not a finite number >= 0, a
missing column, an empty ``disk_id``, a short row, or a file without a usable
row raises :class:`TelemetryError` with one line naming the file (and line).

Labels: a CSV with ``host,disk_id``, or Perseus' ``slow_drive_info.csv``
(``cluster,host_name,...,disk_id``: the host is ``cluster/host_name``).

Speed: a file is split into tokens once and each column converted by numpy
in one call (about 1 M rows/s here); a file the fast path cannot take exactly
(quoted cells spanning lines, blank lines, ``\\r``, an error to report) is
read again with the csv module, which also gives the exact line of an error.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ublk_driver.core.errors import UblkError

COLUMNS = ("ts", "disk_id", "throughput", "latency")
#: cells (after stripping blanks) that mean "no value": the row is dropped and counted
NA_CELLS = frozenset({"NA", ""})
_NUMERIC = ("ts", "throughput", "latency")
_NA_BYTES = [b"NA", b"", b'"NA"', b'""']
#: label files that may sit at the top of a tree (``ml train`` looks for them in this order)
LABEL_FILES = ("labels.csv", "slow_drive_info.csv")


class TelemetryError(UblkError, ValueError):
    """A telemetry or label file cannot be used; the message names it."""


def _show(cells: list[str], limit: int = 60) -> str:
    """File content quoted for a one-line error: a quoted CSV cell may hold newlines."""
    text = repr(",".join(cells))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cell(text: str) -> str:
    return _show([text], 40)


@dataclass(frozen=True)
class FileCount:
    """What one telemetry file gave: data rows, and rows dropped for NA/empty values."""

    path: str
    rows: int
    dropped: int


@dataclass(frozen=True)
class TelemetryFile:
    """The usable rows of one file; ``drive`` indexes ``disk_ids``."""

    path: str
    disk_ids: tuple[str, ...]
    ts: npt.NDArray[np.float64]
    drive: npt.NDArray[np.int64]
    throughput: npt.NDArray[np.float64]
    latency: npt.NDArray[np.float64]
    rows: int      # data rows in the file
    dropped: int   # of which dropped for a NA or empty value


@dataclass(frozen=True)
class HostData:
    """All usable samples of one host, ordered by time; ``drive`` indexes ``disk_ids``."""

    host: str
    disk_ids: tuple[str, ...]
    ts: npt.NDArray[np.float64]
    drive: npt.NDArray[np.int64]
    throughput: npt.NDArray[np.float64]
    latency: npt.NDArray[np.float64]
    files: tuple[FileCount, ...] = field(default=())

    @property
    def dropped(self) -> int:
        return sum(f.dropped for f in self.files)


# ---- one file: the fast path ----------------------------------------------------


def _header(line: str) -> list[str]:
    try:
        return next(csv.reader([line]))
    except (csv.Error, StopIteration):
        return []


def _missing(path: str, first: list[str]) -> None:
    header = [c.strip().lower() for c in first]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TelemetryError(f"{path}: missing column(s) {', '.join(missing)} "
                             f"(header: {_show(first)})")


def _column(tokens: list[bytes], maybe_na: bool
            ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_] | None]:
    """(values, NA mask or None) of a numeric column; ValueError for anything else."""
    if not maybe_na:
        try:
            return np.array(tokens, dtype=np.float64), None  # float() of each: C speed
        except ValueError:
            pass
    s = np.array(tokens)
    na = np.isin(np.char.strip(s), _NA_BYTES)
    s[na] = b"0"
    return s.astype(np.float64), na


class _Slow(Exception):
    """The fast path cannot take this file exactly: read it with the csv module."""


def _fast(path: str, data: bytes) -> TelemetryFile:
    if b"\r" in data or b"\x00" in data:
        raise _Slow
    text = data.rstrip(b"\n")
    nl = text.find(b"\n")
    if nl < 0 or text.count(b'"', 0, nl) % 2:
        raise _Slow
    try:
        first = _header(text[:nl].decode())
    except UnicodeDecodeError:
        raise _Slow from None
    _missing(path, first)
    header = [c.strip().lower() for c in first]
    body = text[nl + 1:]
    width = len(header)
    if not body or b"\n\n" in body or body.startswith(b"\n"):
        raise _Slow
    n = body.count(b"\n") + 1
    tok = body.replace(b"\n", b",").split(b",")
    if len(tok) != n * width:
        raise _Slow
    col = {c: header.index(c) for c in COLUMNS}
    na = np.zeros(n, dtype=np.bool_)
    maybe_na = b"NA" in body  # skip a conversion that would fail at the first NA
    vals = {}
    try:
        for name in _NUMERIC:
            v, m = _column(tok[col[name]::width], maybe_na)
            vals[name] = v
            if m is not None:
                na |= m
    except ValueError:
        raise _Slow from None
    keep = ~na
    for v in vals.values():
        if not np.all(np.isfinite(v[keep]) & (v[keep] >= 0)):
            raise _Slow  # garbage: the csv path names the line
    disk = np.array(tok[col["disk_id"]::width])
    # Rows come grouped per drive: name the runs, not every row.
    starts = np.flatnonzero(np.concatenate([[True], disk[1:] != disk[:-1]]))
    names: dict[bytes, int] = {}
    ids: list[str] = []
    run_drive = np.empty(starts.size, dtype=np.int64)
    for i, raw in enumerate(disk[starts].tolist()):
        j = names.get(raw)
        if j is None:
            if raw.count(b'"') and not (len(raw) >= 2 and raw[:1] == raw[-1:] == b'"'
                                        and raw.count(b'"') == 2):
                raise _Slow  # a quoted cell with a comma or newline inside
            try:
                name = raw.decode().strip().strip('"').strip()
            except UnicodeDecodeError:
                raise _Slow from None
            if not name:
                raise _Slow  # the csv path names the line
            j = ids.index(name) if name in ids else len(ids)
            if j == len(ids):
                ids.append(name)
            names[raw] = j
        run_drive[i] = j
    drive = np.repeat(run_drive, np.diff(np.append(starts, n)))
    dropped = int(na.sum())
    if dropped == n:
        raise TelemetryError(f"{path}: no usable rows: all {n} data rows have a NA or empty "
                             "ts, throughput or latency")
    return TelemetryFile(path, tuple(ids), vals["ts"][keep], drive[keep],
                         vals["throughput"][keep], vals["latency"][keep], n, dropped)


# ---- one file: the csv path (exact line numbers) ----------------------------------


def _numbers(path: str, name: str, cells: list[str], lines: list[int]
             ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(values, NA mask) of a column; ``lines[i]`` is the file line of ``cells[i]``."""
    na = np.array([c.strip() in NA_CELLS for c in cells], dtype=np.bool_)
    vals = []
    for i, c in enumerate(cells):
        if na[i]:
            vals.append(0.0)
            continue
        try:
            vals.append(float(c))
        except ValueError:
            raise TelemetryError(f"{path}: line {lines[i]}: {name} {_cell(c)} is not a "
                                 "number") from None
    v = np.array(vals, dtype=np.float64)
    bad = (~np.isfinite(v) | (v < 0)) & ~na
    if bad.any():
        i = int(np.argmax(bad))
        raise TelemetryError(f"{path}: line {lines[i]}: {name} is {_cell(cells[i])}; "
                             "expected a finite number >= 0 (or NA)")
    return v, na


def _slow(path: str, data: bytes) -> TelemetryFile:
    try:
        reader = csv.reader(io.StringIO(data.decode(), newline=""))
        # The line each row ends on: a quoted cell may span lines, and blank
        # lines are skipped below, so a row's index is not its line number.
        rows = [(reader.line_num, r) for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise TelemetryError(f"{path}: cannot read it: {e}") from None
    if not rows or not any(c.strip() for c in rows[0][1]):
        raise TelemetryError(f"{path}: empty file (expected the header "
                             f"{','.join(COLUMNS)})")
    first = rows[0][1]
    _missing(path, first)
    header = [c.strip().lower() for c in first]
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
    na = np.zeros(len(body), dtype=np.bool_)
    vals = {}
    for name in _NUMERIC:
        vals[name], m = _numbers(path, name, [r[col[name]] for _, r in body], lines)
        na |= m
    disks = [r[col["disk_id"]].strip() for _, r in body]
    if any(not d for d in disks):
        raise TelemetryError(f"{path}: line {lines[disks.index('')]}: empty disk_id")
    if na.all():
        raise TelemetryError(f"{path}: no usable rows: all {len(body)} data rows have a NA "
                             "or empty ts, throughput or latency")
    keep = ~na
    ids, drive = np.unique(np.array(disks, dtype=object).astype(str), return_inverse=True)
    return TelemetryFile(path, tuple(str(i) for i in ids), vals["ts"][keep],
                         drive.astype(np.int64)[keep], vals["throughput"][keep],
                         vals["latency"][keep], len(body), int(na.sum()))


def read_telemetry_file(path: str) -> TelemetryFile:
    """The usable rows of one telemetry CSV, with its row and NA counts."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TelemetryError(f"{path}: cannot read it: {e.strerror or e}") from None
    return read_telemetry_bytes(path, data)


def read_telemetry_bytes(path: str, data: bytes) -> TelemetryFile:
    """:func:`read_telemetry_file` of content already read (``path`` names it)."""
    try:
        return _fast(path, data)
    except _Slow:
        return _slow(path, data)


def read_file(path: str) -> tuple[npt.NDArray[np.float64], list[str], npt.NDArray[np.float64],
                                  npt.NDArray[np.float64]]:
    """(ts, disk_id, throughput, latency) of the usable rows of one telemetry CSV."""
    t = read_telemetry_file(path)
    return t.ts, [t.disk_ids[d] for d in t.drive], t.throughput, t.latency


# ---- hosts and trees ------------------------------------------------------------


def read_host(host: str, files: list[str]) -> HostData:
    """A host's files (one per day, say) merged and sorted by time, drive second."""
    parts = [read_telemetry_file(p) for p in sorted(files)]
    ids = sorted({d for p in parts for d in p.disk_ids})
    index = {d: i for i, d in enumerate(ids)}
    drive = np.concatenate([np.array([index[d] for d in p.disk_ids], dtype=np.int64)[p.drive]
                            for p in parts])
    ts = np.concatenate([p.ts for p in parts])
    order = np.lexsort((drive, ts))
    return HostData(host=host, disk_ids=tuple(ids), ts=ts[order], drive=drive[order],
                    throughput=np.concatenate([p.throughput for p in parts])[order],
                    latency=np.concatenate([p.latency for p in parts])[order],
                    files=tuple(FileCount(p.path, p.rows, p.dropped) for p in parts))


def list_tree(root: str) -> dict[str, list[str]]:
    """host -> its CSV files: every directory below ``root`` holding CSV files is a
    host, named by its path relative to ``root`` (``cluster_A/host_1``)."""
    if not os.path.isdir(root):
        raise TelemetryError(f"{root}: not a directory")
    hosts: dict[str, list[str]] = {}
    for d, dirs, names in os.walk(root):
        dirs.sort()
        if os.path.samefile(d, root):
            continue  # label files, notes: not telemetry
        files = sorted(os.path.join(d, f) for f in names if f.endswith(".csv"))
        if files:
            hosts[os.path.relpath(d, root).replace(os.sep, "/")] = files
    if not hosts:
        raise TelemetryError(f"{root}: no telemetry (expected {root}/<host>/<day>.csv files "
                             f"with columns {','.join(COLUMNS)})")
    return dict(sorted(hosts.items()))


def read_tree(root: str, progress: Callable[[int, int], None] | None = None) -> list[HostData]:
    """Every host of a telemetry tree."""
    tree = list_tree(root)
    out = []
    for i, (host, files) in enumerate(tree.items()):
        out.append(read_host(host, files))
        if progress is not None:
            progress(i + 1, len(tree))
    return out


def dropped_rows(hosts: list[HostData]) -> dict[str, Any]:
    """The NA summary of hosts: data rows, dropped rows, and the files with drops."""
    files = [f for h in hosts for f in h.files]
    return {"rows": sum(f.rows for f in files), "dropped": sum(f.dropped for f in files),
            "files": len(files),
            "files_with_dropped": {f.path: f.dropped for f in files if f.dropped}}


# ---- labels -----------------------------------------------------------------------


def read_labels(path: str) -> set[tuple[str, str]]:
    """The (host, disk_id) pairs of a labels CSV: ``host,disk_id`` or Perseus'
    ``cluster,host_name,...,disk_id`` (host ``cluster/host_name``)."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TelemetryError(f"{path}: cannot read the labels: {e}") from None
    if not rows:
        raise TelemetryError(f"{path}: empty labels file (expected the header host,disk_id)")
    header = [c.strip().lower() for c in rows[0][1]]
    if "disk_id" in header and "host" in header:
        hcols = [header.index("host")]
    elif "disk_id" in header and "cluster" in header and "host_name" in header:
        hcols = [header.index("cluster"), header.index("host_name")]
    else:
        raise TelemetryError(f"{path}: labels need columns host,disk_id (or Perseus' "
                             f"cluster,host_name,disk_id) (header: {_show(rows[0][1])})")
    d = header.index("disk_id")
    out = set()
    for ln, r in rows[1:]:
        if not r or not any(c.strip() for c in r):
            continue
        if len(r) <= max(*hcols, d) or any(not r[c].strip() for c in (*hcols, d)):
            raise TelemetryError(f"{path}: line {ln}: expected "
                                 + ("host,disk_id" if len(hcols) == 1
                                    else "cluster,host_name,...,disk_id"))
        out.add(("/".join(r[c].strip() for c in hcols), r[d].strip()))
    return out


def find_labels(root: str) -> str | None:
    """The label file at the top of a tree (:data:`LABEL_FILES`), if any."""
    for name in LABEL_FILES:
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return None


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
