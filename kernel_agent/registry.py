"""The extension registry, modprobe-style, and the devices the agent watches.

``ublkml agent add CLASS key=value ...`` registers an *instance* of a class:

* ``ublk-server``: a process serving a ublk device.  Params: ``pid``
  (required), ``dev_id`` (the ublk device id; its ``ublkbN`` is then watched),
  ``queues``, ``depth``, ``memory``, ``files``, ``policy`` = ``remove`` (on
  death, delete the device: nobody serves it) or ``keep`` (leave it for a
  recovering server), ``mode`` for the watched device.
* ``ml-extension``: a process sending recommendations (a model).  Params:
  ``pid`` (required), ``memory``, ``files``, ``model``.
* ``monitor``: the host-wide drive monitor (``ublkml monitor run``), one per
  host; the same params as ``ml-extension``.

Each class has limits (instances, queues, depth, memory, files); a
registration over a limit is refused with the limit named.  Limits come from
:data:`DEFAULT_LIMITS`, overridden by ``<state dir>/limits.json`` (same
shape).  The registry is one JSON file, ``<state dir>/registry.json``,
rewritten atomically under an ``flock`` so that the CLI and the agent can both
change it; the agent notices changes by the file's mtime.

The state dir is ``/run/ublkml/agent`` unless ``UBLKML_AGENT_DIR`` says
otherwise (tests use a temporary one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kernel_agent.errors import RegistryError
from kernel_agent.ring import Channel
from kernel_agent.validator import Mode
from ublk_driver.core.errors import ConfigError
from ublk_driver.core.sizes import parse_size

DEFAULT_STATE_DIR = "/run/ublkml/agent"
CLASSES = ("ublk-server", "ml-extension", "monitor")
POLICIES = ("remove", "keep")


def state_dir() -> Path:
    return Path(os.environ.get("UBLKML_AGENT_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class Limits:
    instances: int
    queues: int
    depth: int
    memory: int   # bytes
    files: int


DEFAULT_LIMITS: dict[str, Limits] = {
    "ublk-server": Limits(instances=64, queues=32, depth=4096, memory=16 << 30, files=256),
    "ml-extension": Limits(instances=16, queues=0, depth=0, memory=4 << 30, files=64),
    # One monitor watches every drive of the host: a second would judge the same drives.
    "monitor": Limits(instances=1, queues=0, depth=0, memory=4 << 30, files=64),
}


@dataclass
class Extension:
    """One registered instance."""

    id: int
    cls: str
    pid: int
    starttime: int            # /proc/<pid>/stat field 22: guards against pid reuse
    queues: int = 0
    depth: int = 0
    memory: int = 0
    files: int = 0
    policy: str = "remove"
    dev_id: int | None = None
    model: str = ""
    state: str = "live"       # live | dead (kept for recovery) | removed
    registered: float = field(default_factory=time.time)
    ring: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Extension:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class DeviceConfig:
    name: str
    mode: str = Mode.RECOMMEND.value
    slow_us: int = 0
    owner: int | None = None   # the ublk-server extension that added it


def proc_starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _int_param(params: dict[str, str], key: str, default: int = 0, size: bool = False) -> int:
    if key not in params:
        return default
    text = params.pop(key)
    try:
        return parse_size(text) if size else int(text)
    except (ValueError, ConfigError):
        raise RegistryError(f"{key}={text!r}: expected {'a size' if size else 'an integer'}"
                            ) from None


class Registry:
    """registry.json in a state dir; every method locks, reads, changes, writes."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else state_dir()
        self.path = self.root / "registry.json"
        self.rings = self.root / "rings"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "registry.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = self._read()
            before = json.dumps(doc, sort_keys=True)
            yield doc
            if json.dumps(doc, sort_keys=True) != before:
                tmp = self.path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
                os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            doc = {}
        except ValueError as e:
            raise RegistryError(f"{self.path} is not valid JSON ({e}): fix or remove it"
                                ) from None
        doc.setdefault("next_id", 1)
        doc.setdefault("extensions", {})
        doc.setdefault("devices", {})
        return doc

    def mtime_ns(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def limits(self) -> dict[str, Limits]:
        out = dict(DEFAULT_LIMITS)
        path = self.root / "limits.json"
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                for cls, lim in doc.items():
                    base = asdict(out[cls]) if cls in out else {}
                    out[cls] = Limits(**{**base, **lim})
            except (ValueError, TypeError, KeyError) as e:
                raise RegistryError(f"{path}: bad limits ({e})") from None
        return out

    # -- extensions ---------------------------------------------------------------

    def add(self, cls: str, params: dict[str, str]) -> Extension:
        """Register an instance (and create its recommendation ring)."""
        if cls not in CLASSES:
            raise RegistryError(f"unknown class {cls!r} (classes: {', '.join(CLASSES)})")
        params = dict(params)
        if "pid" not in params:
            raise RegistryError(f"{cls} needs pid=PID")
        pid = _int_param(params, "pid")
        start = proc_starttime(pid) if pid > 0 else None
        if start is None:
            raise RegistryError(f"no process with pid {pid}")
        ext = Extension(id=0, cls=cls, pid=pid, starttime=start,
                        queues=_int_param(params, "queues"), depth=_int_param(params, "depth"),
                        memory=_int_param(params, "memory", size=True),
                        files=_int_param(params, "files"))
        mode = params.pop("mode", Mode.RECOMMEND.value)
        if mode not in {m.value for m in Mode}:
            raise RegistryError(f"mode={mode!r}: one of {', '.join(m.value for m in Mode)}")
        if cls == "ublk-server":
            ext.policy = params.pop("policy", "remove")
            if ext.policy not in POLICIES:
                raise RegistryError(f"policy={ext.policy!r}: one of {', '.join(POLICIES)}")
            if "dev_id" in params:
                ext.dev_id = _int_param(params, "dev_id")
        else:
            ext.policy = "none"
            ext.model = params.pop("model", "")
        if params:
            raise RegistryError(f"unknown parameter(s) for {cls}: {', '.join(sorted(params))}")
        lim = self.limits()[cls]
        for what in ("queues", "depth", "memory", "files"):
            have, cap = getattr(ext, what), getattr(lim, what)
            if have < 0 or have > cap:
                raise RegistryError(f"{cls}: {what}={have} over the limit {cap} "
                                    f"(see {self.root / 'limits.json'})")
        with self._locked() as doc:
            live = [e for e in doc["extensions"].values()
                    if e["cls"] == cls and e["state"] == "live"]
            if len(live) >= lim.instances:
                raise RegistryError(f"{cls}: already {len(live)} instances, the limit is "
                                    f"{lim.instances}")
            ext.id = int(doc["next_id"])
            doc["next_id"] = ext.id + 1
            self.rings.mkdir(parents=True, exist_ok=True)
            ring = self.rings / f"{ext.id}.ring"
            Channel.create(ring, ext.id).close()
            ext.ring = str(ring)
            doc["extensions"][str(ext.id)] = ext.to_json()
            if ext.dev_id is not None:
                name = f"ublkb{ext.dev_id}"
                doc["devices"][name] = asdict(DeviceConfig(name, mode=mode, owner=ext.id))
        return ext

    def remove(self, ext_id: int) -> Extension:
        with self._locked() as doc:
            d = doc["extensions"].pop(str(ext_id), None)
            if d is None:
                raise RegistryError(f"no extension with id {ext_id} (see `ublkml agent list`)")
            for name, dev in list(doc["devices"].items()):
                if dev.get("owner") == ext_id:
                    del doc["devices"][name]
        ext = Extension.from_json(d)
        with contextlib.suppress(OSError):
            os.unlink(ext.ring)
        return ext

    def set_state(self, ext_id: int, state: str) -> None:
        with self._locked() as doc:
            d = doc["extensions"].get(str(ext_id))
            if d is not None:
                d["state"] = state

    def extensions(self) -> list[Extension]:
        with self._locked() as doc:
            return [Extension.from_json(d) for d in doc["extensions"].values()]

    def get(self, ext_id: int) -> Extension:
        for e in self.extensions():
            if e.id == ext_id:
                return e
        raise RegistryError(f"no extension with id {ext_id}")

    # -- devices ------------------------------------------------------------------

    def watch(self, name: str, mode: str = Mode.RECOMMEND.value, slow_us: int = 0) -> None:
        if mode not in {m.value for m in Mode}:
            raise RegistryError(f"mode {mode!r}: one of {', '.join(m.value for m in Mode)}")
        if slow_us < 0:
            raise RegistryError("slow_us must be >= 0")
        with self._locked() as doc:
            old = doc["devices"].get(name, {})
            doc["devices"][name] = asdict(DeviceConfig(name, mode, slow_us, old.get("owner")))

    def unwatch(self, name: str) -> None:
        with self._locked() as doc:
            if doc["devices"].pop(name, None) is None:
                raise RegistryError(f"{name} is not watched")

    def devices(self) -> dict[str, DeviceConfig]:
        with self._locked() as doc:
            return {n: DeviceConfig(**d) for n, d in doc["devices"].items()}
