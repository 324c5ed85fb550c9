"""The extension registry, modprobe-style, and the devices the agent watches.

``ublkml agent add CLASS key=value ...`` registers an *instance* of a class:

* ``ublk-server``: a process serving a ublk device.  Params: ``pid``
  (required), ``dev_id`` (the ublk device id; its ``ublkbN`` is then watched),
  ``queues``, ``depth``, ``memory``, ``files``, ``policy`` = ``remove`` (on
  death, delete the device: nobody serves it) or ``keep`` (leave it for a
  recovering server), ``mode`` for the watched device.
* ``ml-extension``: a process sending recommendations (a model).  Params:
  ``pid`` (required), ``memory``, ``files``, ``model``, ``device`` (the
  device it acts for: leased to it unless a live extension holds it; ``mode``
  then watches it in that mode if nobody watches it yet).
* ``monitor``: the host-wide drive monitor (``ublkml monitor run``), one per
  host; the same params as ``ml-extension``, and ``claims`` (comma-separated
  device names: the devices whose drives it watches, see below).

Each class has limits (instances, queues, depth, memory, files) and a
recommendation policy (rate, burst, confidence floor, longest TTL: what the
eBPF checker enforces); a registration over a limit is refused with the
limit named.  A device's ``owner`` is the extension that registered it (a
server's ``ublkbN``, a ``device=`` claim, ``agent watch --owner``): it holds
the device's *lease*, and only the lease's holders' recommendations for the
device pass the eBPF checker.  A lease may have several holders: the owner,
and every live extension of a class in :data:`CO_HOLDERS` (the drive
monitor) that *claims* the device (:meth:`Registry.claim`, or ``claims=`` at
registration), provided the device is watched; :func:`lease_holders` is that
rule, which the agent applies.  Limits come from
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
#: Classes whose claims share a device's lease with its owner: the host-wide
#: drive monitor recommends for every device whose drives it watches.
CO_HOLDERS = ("monitor",)


def state_dir() -> Path:
    return Path(os.environ.get("UBLKML_AGENT_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class Limits:
    """A class's resource limits and its recommendation policy.

    The policy (rate, burst, confidence floor in permille, longest TTL) is
    what the eBPF checker enforces for each extension of the class
    (:class:`kernel_agent.recocheck_model.ExtPolicy`).
    """

    instances: int
    queues: int
    depth: int
    memory: int   # bytes
    files: int
    rate_per_s: int = 5
    burst: int = 20
    floor_permille: int = 500
    max_ttl_ms: int = 3_600_000


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
    claims: list[str] = field(default_factory=list)   # devices it co-holds (CO_HOLDERS)

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
    owner: int | None = None   # the extension that registered it: it holds the lease


def proc_starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _claim(doc: dict[str, Any], name: str, ext_id: int, mode: str) -> None:
    """Lease ``name`` to ``ext_id`` unless a live extension holds it (then the
    eBPF checker refuses the claimant's recommendations for it, naming the holder)."""
    cur = doc["devices"].get(name)
    if cur is None:
        doc["devices"][name] = asdict(DeviceConfig(name, mode=mode, owner=ext_id))
        return
    holder = doc["extensions"].get(str(cur.get("owner")))
    if holder is None or holder.get("state") != "live":
        cur["owner"] = ext_id


def _names(text: str) -> list[str]:
    """``claims=`` as a sorted list of device names."""
    names = sorted({n.strip() for n in text.split(",") if n.strip()})
    for n in names:
        if "/" in n or not n.isprintable():
            raise RegistryError(f"claims: {n!r} is not a device name (e.g. ublkb3)")
    return names


def lease_holders(devices: dict[str, DeviceConfig], extensions: list[Extension]
                  ) -> dict[str, frozenset[int]]:
    """Every watched device's lease holders: its owner, and the live extensions
    of a :data:`CO_HOLDERS` class that claim it.  A claim on a device that is not
    watched grants nothing (it does once the device is watched)."""
    out = {name: frozenset() if cfg.owner is None else frozenset({cfg.owner})
           for name, cfg in devices.items()}
    for e in extensions:
        if e.state != "live" or e.cls not in CO_HOLDERS:
            continue
        for name in e.claims:
            if name in out:
                out[name] = out[name] | {e.id}
    return out


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
        claim = params.pop("device", "") if cls != "ublk-server" else ""
        if cls in CO_HOLDERS:
            ext.claims = _names(params.pop("claims", ""))
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
            if claim:
                _claim(doc, claim, ext.id, mode)
        return ext

    def remove(self, ext_id: int) -> Extension:
        with self._locked() as doc:
            d = doc["extensions"].pop(str(ext_id), None)
            if d is None:
                raise RegistryError(f"no extension with id {ext_id} (see `ublkml agent list`)")
            for name, dev in list(doc["devices"].items()):
                if dev.get("owner") == ext_id:
                    if d["cls"] == "ublk-server":
                        del doc["devices"][name]   # nobody serves it any more
                    else:
                        dev["owner"] = None        # a claim: the device stays watched
        ext = Extension.from_json(d)
        with contextlib.suppress(OSError):
            os.unlink(ext.ring)
        return ext

    def claim(self, ext_id: int, names: list[str] | tuple[str, ...]) -> None:
        """Set the devices extension ``ext_id`` claims a share of the lease of
        (replacing its claims; the file is rewritten only when they change)."""
        want = _names(",".join(names))
        with self._locked() as doc:
            d = doc["extensions"].get(str(ext_id))
            if d is None:
                raise RegistryError(f"no extension with id {ext_id} (see `ublkml agent list`)")
            if d["cls"] not in CO_HOLDERS:
                raise RegistryError(f"a {d['cls']} cannot share leases (only "
                                    f"{', '.join(CO_HOLDERS)}): register with device=NAME")
            if d.get("claims", []) != want:
                d["claims"] = want

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

    def watch(self, name: str, mode: str = Mode.RECOMMEND.value, slow_us: int = 0,
              owner: int | None = None) -> None:
        """Watch ``name``; ``owner`` leases it to that extension (None: keep the lease)."""
        if mode not in {m.value for m in Mode}:
            raise RegistryError(f"mode {mode!r}: one of {', '.join(m.value for m in Mode)}")
        if slow_us < 0:
            raise RegistryError("slow_us must be >= 0")
        with self._locked() as doc:
            if owner is not None and str(owner) not in doc["extensions"]:
                raise RegistryError(f"no extension with id {owner} to lease {name} to "
                                    "(see `ublkml agent list`)")
            old = doc["devices"].get(name, {})
            doc["devices"][name] = asdict(DeviceConfig(
                name, mode, slow_us, owner if owner is not None else old.get("owner")))

    def unwatch(self, name: str) -> None:
        with self._locked() as doc:
            if doc["devices"].pop(name, None) is None:
                raise RegistryError(f"{name} is not watched")

    def devices(self) -> dict[str, DeviceConfig]:
        with self._locked() as doc:
            return {n: DeviceConfig(**d) for n, d in doc["devices"].items()}
