"""SMART attributes: from ``smartctl --json`` (a live drive) and from Backblaze CSVs.

Both give the raw values of the attributes in :data:`ml.features.SMART_FEATURES`.
An attribute a drive does not report is 0, as a blank cell is in the Backblaze
training data ("nothing counted"), and is listed in ``missing`` so that a
caller can say so.  NVMe drives have no ATA attribute table: their health log
maps power-on hours (9), temperature (194) and media errors (to 187, the
nearest ATA counter: uncorrectable errors); the rest is missing.

Beside the attributes, a reading carries the drive's own verdict: ATA's
overall health (``smart_status.passed``, and smartctl's exit-status bit 3,
"DISK FAILING") and NVMe's ``critical_warning`` bits (spare below threshold,
temperature, reliability degraded, read-only, volatile backup failed,
persistent memory read-only).  :func:`assess` puts that verdict next to a
failure model's risk: a drive that says it is failing is critical whatever the
model thinks.

Output that cannot be used (not JSON, smartctl could not open the device, no
attributes at all) raises :class:`SmartError` with one line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ml.features import SMART_FEATURES
from ublk_driver.core.errors import UblkError

if TYPE_CHECKING:
    from ml.model import Model

#: smartctl exit-status bits that mean there is no data (see smartctl(8))
_FATAL_BITS = {0: "the command line did not parse", 1: "the device could not be opened"}
_FAILING_BIT = 3  # SMART status check returned "DISK FAILING"
SMART_IDS = tuple(int(n.split("_")[1]) for n in SMART_FEATURES)
#: NVMe SMART / Health log, byte 0 (Critical Warning), bit -> meaning (NVMe base spec)
NVME_CRITICAL_BITS = {0: "available spare below threshold", 1: "temperature out of range",
                      2: "reliability degraded (media or internal errors)",
                      3: "media placed in read-only mode",
                      4: "volatile memory backup failed",
                      5: "persistent memory region read-only"}


class SmartError(UblkError, ValueError):
    """SMART data cannot be read or parsed; the message says which and why."""


@dataclass(frozen=True)
class SmartReading:
    device: str
    model: str
    serial: str
    passed: bool | None               # the drive's own overall verdict, if given
    features: dict[str, float]        # SMART_FEATURES -> raw value (0 when missing)
    missing: tuple[str, ...] = field(default=())
    critical_warning: int | None = None  # NVMe Critical Warning byte (None: not NVMe)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the drive itself reports as wrong, in words (empty: nothing)."""
        out = []
        if self.critical_warning:
            out += [f"NVMe critical warning: {what}" for bit, what in NVME_CRITICAL_BITS.items()
                    if self.critical_warning & (1 << bit)]
            unknown = self.critical_warning & ~((1 << len(NVME_CRITICAL_BITS)) - 1)
            if unknown:
                out.append(f"NVMe critical warning bits {unknown:#x}")
        if self.passed is False and not out:
            out.append("SMART overall-health self-assessment: FAILED")
        return tuple(out)

    @property
    def critical(self) -> bool:
        """The drive reports itself failing (ATA FAILED, any NVMe critical warning)."""
        return self.passed is False or bool(self.critical_warning)

    def vector(self, names: tuple[str, ...]) -> npt.NDArray[np.float32]:
        """One input row for a model declaring ``names`` (other features 0)."""
        return np.array([[self.features.get(n, 0.0) for n in names]], dtype=np.float32)


def _int(v: Any, what: str, where: str) -> float:
    """A counter from the JSON: a finite number >= 0 (SMART raw values are unsigned).

    JSON allows NaN, Infinity and integers of any size; each must become a
    SmartError, not a bare OverflowError/ValueError (or a NaN for the model).
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SmartError(f"{where}: {what} is {_short(v)}, not a number")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or f < 0:
        raise SmartError(f"{where}: {what} is {_short(v)}; expected a finite number >= 0")
    return f


def _one_line(text: str, limit: int = 100) -> str:
    """A message that quotes file content, kept on one line (cells may hold newlines)."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(v: Any) -> str:
    """``repr`` cut to keep the error on one short line, whatever the input holds."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_smartctl_json(text: str | bytes, where: str = "smartctl") -> SmartReading:
    """A reading from the output of ``smartctl --json -a DEVICE``."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise SmartError(f"{where}: output is not JSON ({e}); run smartctl with --json") \
            from None
    except RecursionError:  # "[[[[..." nested deeper than the interpreter's stack
        raise SmartError(f"{where}: output is not smartctl JSON (nested too deeply); run "
                         "smartctl with --json") from None
    if not isinstance(doc, dict):
        raise SmartError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    ctl = doc.get("smartctl")
    if not isinstance(ctl, dict):
        raise SmartError(f"{where}: no 'smartctl' section: not smartctl --json output")
    status = ctl.get("exit_status", 0)
    if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 255:
        raise SmartError(f"{where}: smartctl.exit_status is {_short(status)}, not an exit "
                         "status 0..255")
    messages = ctl.get("messages")
    msgs = [str(m.get("string", "")).splitlines()[0] if m.get("string") else ""
            for m in (messages if isinstance(messages, list) else [])
            if isinstance(m, dict) and m.get("severity") == "error"]
    for bit, meaning in _FATAL_BITS.items():
        if status & (1 << bit):
            detail = f": {msgs[0]}" if msgs else ""
            raise SmartError(f"{where}: smartctl failed ({meaning}, exit status "
                             f"{status}){detail}")
    dev = doc.get("device") if isinstance(doc.get("device"), dict) else {}
    assert isinstance(dev, dict)
    device = str(dev.get("name", where))
    passed: bool | None = None
    st = doc.get("smart_status")
    if isinstance(st, dict) and isinstance(st.get("passed"), bool):
        passed = st["passed"]
    if status & (1 << _FAILING_BIT):
        passed = False
    values: dict[str, float] = {}
    critical_warning: int | None = None
    table = doc.get("ata_smart_attributes", {})
    nvme = doc.get("nvme_smart_health_information_log")
    if isinstance(table, dict) and "table" in table:
        rows = table["table"]
        if not isinstance(rows, list):
            raise SmartError(f"{where}: ata_smart_attributes.table is not a list")
        for row in rows:
            if not isinstance(row, dict) or "id" not in row:
                raise SmartError(f"{where}: an attribute without an id: {_short(row)}")
            aid_v = row["id"]
            if isinstance(aid_v, bool) or not isinstance(aid_v, int) or not 0 <= aid_v <= 255:
                raise SmartError(f"{where}: attribute id {_short(aid_v)} is not an ATA "
                                 "attribute id 0..255")
            aid = aid_v
            raw = row.get("raw")
            if not isinstance(raw, dict) or "value" not in raw:
                raise SmartError(f"{where}: attribute {aid} has no raw value")
            if aid in SMART_IDS:
                v = _int(raw["value"], f"attribute {aid} raw value", where)
                if aid == 194:
                    v = float(int(v) & 0xFF)  # the low byte is the current temperature
                values[f"smart_{aid}_raw"] = v
    elif isinstance(nvme, dict):
        if "critical_warning" in nvme:
            cw = _int(nvme["critical_warning"], "critical_warning", where)
            if cw > 255:
                raise SmartError(f"{where}: critical_warning is {int(cw)}, not a byte")
            critical_warning = int(cw)
        for key, name in (("power_on_hours", "smart_9_raw"), ("temperature", "smart_194_raw"),
                          ("media_errors", "smart_187_raw")):
            if key in nvme:
                values[name] = _int(nvme[key], key, where)
    else:
        raise SmartError(f"{where}: no SMART attributes in the output (is SMART enabled? "
                         "try smartctl -s on)")
    if "smart_9_raw" not in values and isinstance(doc.get("power_on_time"), dict):
        values["smart_9_raw"] = _int(doc["power_on_time"].get("hours", 0), "power-on hours",
                                     where)
    missing = tuple(n for n in SMART_FEATURES if n not in values)
    feats = {n: values.get(n, 0.0) for n in SMART_FEATURES}
    return SmartReading(device=device, model=str(doc.get("model_name", "")),
                        serial=str(doc.get("serial_number", "")), passed=passed,
                        features=feats, missing=missing, critical_warning=critical_warning)


@dataclass(frozen=True)
class SmartAssessment:
    """A drive's SMART verdict: its own (``critical``) beside the model's (``risk``)."""

    risk: float | None        # the failure model's score (None: no model)
    threshold: float | None
    critical: bool            # the drive reports itself failing
    flagged: bool             # critical, or risk at or above the threshold
    reason: str               # one line: why flagged, or "healthy"

    def to_json(self) -> dict[str, Any]:
        return {"risk": self.risk, "threshold": self.threshold, "critical": self.critical,
                "flagged": self.flagged, "reason": self.reason}


def assess(reading: SmartReading, model: Model | None = None) -> SmartAssessment:
    """The drive's own verdict and, with a ``failure`` model, its risk score."""
    risk: float | None = None
    threshold: float | None = None
    at_risk = False
    if model is not None:
        scores, flags = model.predict(reading.vector(model.features))
        risk, threshold, at_risk = float(scores[0]), model.threshold, bool(flags[0])
    reasons = list(reading.warnings)
    if at_risk:
        reasons.append(f"failure risk {risk:.2f} at or above the model's threshold "
                       f"{threshold:g}")
    return SmartAssessment(risk=risk, threshold=threshold, critical=reading.critical,
                           flagged=reading.critical or at_risk,
                           reason="; ".join(reasons) if reasons else "healthy")


def read_smart(device: str, timeout: float = 30.0,
               runner: Callable[[list[str]], tuple[int, str]] | None = None) -> SmartReading:
    """Run ``smartctl --json -a DEVICE`` and parse it."""
    cmd = ["smartctl", "--json", "-a", device]
    if runner is None:
        if shutil.which("smartctl") is None:
            raise SmartError("smartctl not found: install smartmontools")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               check=False)
        except subprocess.TimeoutExpired:
            raise SmartError(f"{device}: smartctl did not answer in {timeout:g} s") from None
        except OSError as e:
            raise SmartError(f"{device}: cannot run smartctl: {e}") from None
        out = p.stdout
    else:
        _, out = runner(cmd)
    return parse_smartctl_json(out, device)


# ---- Backblaze history ----------------------------------------------------------


@dataclass(frozen=True)
class SmartHistory:
    """Rows of a Backblaze tree: one per drive and day, in file (date) order."""

    date: npt.NDArray[np.int64]       # days since 1970-01-01
    serial: npt.NDArray[np.str_]
    failure: npt.NDArray[np.int64]
    x: npt.NDArray[np.float64]        # [rows, len(SMART_FEATURES)], blanks as 0


def read_backblaze(root: str, progress: Callable[[int, int], None] | None = None
                   ) -> SmartHistory:
    """Read ``root/*.csv`` (Backblaze daily layout)."""
    if not os.path.isdir(root):
        raise SmartError(f"{root}: not a directory")
    files = sorted(f for f in os.listdir(root) if f.endswith(".csv"))
    if not files:
        raise SmartError(f"{root}: no Backblaze CSVs (expected {root}/<YYYY-MM-DD>.csv)")
    dates: list[int] = []
    serials: list[str] = []
    fails: list[int] = []
    rows_x: list[list[float]] = []
    for k, name in enumerate(files):
        path = os.path.join(root, name)
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SmartError(f"{path}: cannot read it: {e}") from None
        if not rows:
            raise SmartError(f"{path}: empty file")
        header = [c.strip() for c in rows[0]]
        need = ["date", "serial_number", "failure"]
        missing = [c for c in need if c not in header]
        if missing:
            raise SmartError(f"{path}: missing column(s) {', '.join(missing)}")
        idx = {c: header.index(c) for c in need}
        fcol = [header.index(n) if n in header else -1 for n in SMART_FEATURES]
        for i, r in enumerate(rows[1:]):
            if not r:
                continue
            if len(r) != len(header):
                raise SmartError(f"{path}: line {i + 2}: {len(r)} fields, the header has "
                                 f"{len(header)}")
            try:
                day = int(np.datetime64(r[idx["date"]].strip(), "D").astype(np.int64))
                fail = int(r[idx["failure"]])
                vals = [float(r[c]) if c >= 0 and r[c].strip() else 0.0 for c in fcol]
            except ValueError as e:
                raise SmartError(f"{path}: line {i + 2}: {_one_line(str(e))}") from None
            if fail not in (0, 1) or not all(np.isfinite(vals)):
                raise SmartError(f"{path}: line {i + 2}: failure must be 0/1 and values "
                                 "finite")
            dates.append(day)
            serials.append(r[idx["serial_number"]].strip())
            fails.append(fail)
            rows_x.append(vals)
        if progress is not None:
            progress(k + 1, len(files))
    if not dates:
        raise SmartError(f"{root}: no data rows")
    return SmartHistory(date=np.array(dates, dtype=np.int64), serial=np.array(serials),
                        failure=np.array(fails, dtype=np.int64),
                        x=np.array(rows_x, dtype=np.float64).reshape(len(dates), -1))


def failure_labels(h: SmartHistory, horizon_days: int) -> npt.NDArray[np.int64]:
    """1 for rows of a drive that fails within ``horizon_days`` of that row's date."""
    fail_day: dict[str, int] = {}
    for s, d in zip(h.serial[h.failure == 1], h.date[h.failure == 1], strict=True):
        fail_day[str(s)] = int(d)
    fd = np.array([fail_day.get(str(s), 1 << 40) for s in h.serial], dtype=np.int64)
    y: npt.NDArray[np.int64] = ((fd - h.date >= 0) & (fd - h.date < horizon_days)).astype(
        np.int64)
    return y
