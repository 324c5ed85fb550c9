"""Serving a Python :class:`~ublk_driver.targets.base.Target` plug-in.

The C engine hands requests over in batches; :class:`PluginBackend` answers
each with the plug-in's method.  The capabilities are inferred from the
methods the plug-in class overrides (trio's trick), so the kernel never sends
an operation the plug-in cannot serve.

Plug-in methods may hang.  With a timeout (the default, 30 s) the queue's
ring thread never runs plug-in code: worker threads do (the relay, see
``csrc/target_relay.c``).  A call that is slow (20 ms, or a quarter of the timeout
if less) no longer holds up new requests: a spare worker takes them.  A call
that has not returned within the timeout fails its I/O with ETIMEDOUT, and
the requests batched behind it go to a spare.
:meth:`PluginBackend.relay_note` logs which method hung.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, PluginError
from ublk_driver.drives import Drive, DriveLookupError, resolve
from ublk_driver.targets.base import (
    Backend,
    Capabilities,
    CompletionPath,
    ShortReadError,
    Target,
)
from ublk_driver.uapi import IoFlag, Op

#: seconds a plug-in call may take before its I/O fails (``--plugin-timeout``)
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 86400.0
#: worker threads a queue may start beyond its first two, each to stand in for
#: a call that is slow or hung; when every worker is stuck, requests wait and
#: fail with ETIMEDOUT after the timeout
MAX_STUCK = 8


def check_timeout(timeout: float) -> float:
    """A plug-in timeout in seconds: 0 (none) or from 1 ms to a day."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"plug-in timeout must be a number of seconds, got {timeout!r}")
    t = float(timeout)
    if t != t or not (t == 0 or 0.001 <= t <= MAX_TIMEOUT):
        raise ConfigError(f"plug-in timeout must be 0 (none) or 0.001..{MAX_TIMEOUT:g} s, "
                          f"got {timeout!r}")
    return t


def _overrides(obj: Target, name: str) -> bool:
    impl = getattr(type(obj), name, None)
    return impl is not None and impl is not getattr(Target, name)


def check_fork_safe(backend: Backend) -> None:
    """Refuse queue processes for a target whose state a fork would copy."""
    if not isinstance(backend, PluginBackend):
        raise ConfigError(f"queue processes are for Python plug-in targets: target "
                          f"{backend.name} runs in C, its queue threads already run in "
                          "parallel (drop --queue-processes)")
    if not backend.plugin.fork_safe:
        raise ConfigError(f"plug-in {backend.spec} is not fork_safe: each queue process would "
                          "get its own copy of its state, and writes through one queue would "
                          "be unseen by the others; keep the state in shared memory or files "
                          "and set fork_safe = True in the class, or drop --queue-processes")


class PluginBackend(Backend):
    """A plug-in object served through the engine's event queues."""

    name = "python"

    def __init__(self, plugin: Target, spec: str = "",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """``timeout``: seconds a plug-in call may take before its I/O fails
        with ETIMEDOUT (0: no timeout; calls then run on the queue's own
        thread, and a hung call stalls that queue)."""
        self.timeout = check_timeout(timeout)
        if not isinstance(plugin, Target):
            raise PluginError(f"{type(plugin).__name__} is not a ublk_driver.Target subclass")
        super().__init__()
        if not (_overrides(plugin, "read") or _overrides(plugin, "read_into")):
            raise PluginError(f"plug-in {type(plugin).__name__} defines neither read() "
                              "nor read_into()")
        self.plugin = plugin
        self.spec = spec or f"{type(plugin).__module__}:{type(plugin).__qualname__}"
        try:
            size = int(plugin.size())
        except Exception as e:
            raise PluginError(f"plug-in {self.spec}: size() failed: {e}") from None
        if size <= 0 or size % 512:
            raise ConfigError(f"plug-in {self.spec}: size() returned {size}, which is not a "
                              "positive multiple of the block size (512 bytes)")
        self._size = size
        caps = Capabilities(
            read_only=not _overrides(plugin, "write"),
            flush=_overrides(plugin, "flush"),
            fua=_overrides(plugin, "flush") and _overrides(plugin, "write"),
            discard=_overrides(plugin, "discard"),
            write_zeroes=_overrides(plugin, "write_zeroes"),
            discard_zeroes=bool(plugin.discard_zeroes),
            rotational=bool(plugin.rotational),
        )
        self._caps = caps
        self._errors_logged = 0
        self._log_lock = threading.Lock()
        self.io_errors = 0
        self._read_name = "read_into" if _overrides(plugin, "read_into") else "read"

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def attach(self) -> _bindings.CTarget:
        return _bindings.CTarget(_bindings.TGT_EVENTS, self._size)

    def describe(self) -> dict[str, object]:
        return {"target": self.name, "size": self.size, "plugin": self.spec,
                "plugin_timeout": self.timeout}

    def completion_paths(self) -> list[CompletionPath]:
        """Path 0 (every plug-in I/O completes on it), with the drives the
        plug-in declares (:meth:`Target.drives`; none by default)."""
        try:
            declared = list(self.plugin.drives())
        except Exception as e:
            return [CompletionPath(0, self.name, None, (),
                                   f"plug-in {self.spec}: drives() raised {e!r}")]
        drives: dict[Drive, None] = {}
        reasons: list[str] = []
        for item in declared:
            if isinstance(item, Drive):
                drives[item] = None
            elif isinstance(item, str):
                try:
                    r = resolve(item)
                except DriveLookupError as e:
                    reasons.append(str(e))
                    continue
                drives.update(dict.fromkeys(r.drives))
                if r.reason:
                    reasons.append(r.reason)
            else:
                reasons.append(f"plug-in {self.spec}: drives() returned {item!r}, neither "
                               "a path nor a ublk_driver.drives.Drive")
        if drives:
            found = tuple(sorted(drives, key=lambda d: (d.major, d.minor)))
            return [CompletionPath(0, self.name, None, found, None)]
        why = "; ".join(reasons) or (f"plug-in {self.spec} declares no drives (its class "
                                     "may define drives())")
        return [CompletionPath(0, self.name, None, (), why)]

    def method_of(self, op: int, op_flags: int = 0) -> str:
        """The plug-in method(s) that serve ``op``, for messages."""
        if op == Op.READ:
            return f"{self._read_name}()"
        if op == Op.WRITE:
            return "write() or flush() (a FUA write)" if op_flags & IoFlag.FUA else "write()"
        names: dict[int, str] = {Op.FLUSH: "flush()", Op.DISCARD: "discard()",
                                 Op.WRITE_ZEROES: "write_zeroes()"}
        return names.get(op, f"op {op}")

    def relay_note(self, q_id: int, note: _bindings.RelayNote) -> None:
        """Log what a relay worker of queue ``q_id`` was told (hangs are rare:
        not rate-limited)."""
        if note.new_timeouts:
            try:
                what = f"{Op(note.op).name} at {note.offset}+{note.length}"
            except ValueError:
                what = f"op {note.op} at {note.offset}+{note.length}"
            more = (f"; {note.new_timeouts - 1} more I/O(s) timed out since the last report"
                    if note.new_timeouts > 1 else "")
            print(f"ublkml: plug-in {self.spec}: {self.method_of(note.op, note.op_flags)} "
                  f"did not return within {self.timeout:g} s ({what}, queue {q_id}, "
                  f"running {note.stuck_s:.1f} s): the I/O failed with ETIMEDOUT{more}; "
                  f"{note.stuck} call(s) still stuck, {note.timeouts} timed out in all",
                  file=sys.stderr, flush=True)
        if note.came_back:
            print(f"ublkml: plug-in {self.spec}: a call given up after the timeout returned "
                  f"{note.late_s:.1f} s after it was handed out (queue {q_id}); its I/O had "
                  "already failed, its result was dropped", file=sys.stderr, flush=True)

    def close(self) -> None:
        try:
            self.plugin.close()
        except Exception as e:
            self._log(f"close() raised {e!r}")

    def _log(self, msg: str) -> None:
        # Rate-limited: a plug-in that fails every I/O must not flood the log.
        with self._log_lock:
            self._errors_logged += 1
            n = self._errors_logged
        if n <= 20 or n % 1000 == 0:
            print(f"ublkml: plug-in {self.spec}: {msg}", file=sys.stderr, flush=True)

    def handler(self) -> _bindings.EventHandler:
        """The per-request function the queue threads call."""
        p = self.plugin
        read_into = p.read_into
        write, flush = p.write, p.flush
        discard, write_zeroes = p.discard, p.write_zeroes
        READ, WRITE, FLUSH = Op.READ, Op.WRITE, Op.FLUSH
        DISCARD, WRITE_ZEROES, FUA = Op.DISCARD, Op.WRITE_ZEROES, IoFlag.FUA
        CANCELLED, RELAY_CANCELLED = _bindings.OP_CANCELLED, _bindings.RELAY_CANCELLED

        def handle(tag: int, op: int, op_flags: int, offset: int, length: int,
                   buf: memoryview) -> int:
            try:
                if op == READ:
                    read_into(offset, buf[:length])
                    return length
                if op == WRITE:
                    write(offset, buf[:length])
                    if op_flags & FUA:
                        flush()
                    return length
                if op == FLUSH:
                    flush()
                    return 0
                if op == DISCARD:
                    discard(offset, length)
                    return 0
                if op == WRITE_ZEROES:
                    write_zeroes(offset, length)
                    return 0
                if op == CANCELLED:  # taken back from this (stuck) worker
                    return RELAY_CANCELLED
                return -errno.EOPNOTSUPP
            except ShortReadError as e:
                self._log(f"{Op(op).name} at {offset}+{length}: {e}")
                res = -errno.EIO
            except OSError as e:
                self._log(f"{Op(op).name} at {offset}+{length}: {e}")
                res = -(e.errno or errno.EIO)
            except NotImplementedError:
                res = -errno.EOPNOTSUPP
            except Exception as e:
                self._log(f"{Op(op).name} at {offset}+{length} raised {e!r}")
                res = -errno.EIO
            self.io_errors += 1
            return res

        return handle


def load_plugin(spec: str, args: Mapping[str, str] | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> PluginBackend:
    """Load ``module:Class`` or ``path/to/file.py:Class`` and instantiate it.

    ``args`` become keyword arguments of the class (strings; convert them in
    ``__init__``); ``timeout`` is the per-call timeout of :class:`PluginBackend`.
    """
    timeout = check_timeout(timeout)
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise PluginError(f"--plugin wants MODULE:CLASS or FILE.py:CLASS, got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            if not os.path.isfile(module_name):
                raise PluginError(f"plug-in file {module_name} does not exist")
            mod_spec = importlib.util.spec_from_file_location(
                f"ublkml_plugin_{abs(hash(module_name))}", module_name)
            if mod_spec is None or mod_spec.loader is None:
                raise PluginError(f"cannot load plug-in file {module_name}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"cannot import plug-in module {module_name}: {e}") from None
    cls: Any = getattr(module, class_name, None)
    if cls is None:
        raise PluginError(f"plug-in module {module_name} has no class {class_name}")
    if not (inspect.isclass(cls) and issubclass(cls, Target)):
        raise PluginError(f"{spec} is not a subclass of ublk_driver.Target")
    factory: Callable[..., Target] = cls
    try:
        obj = factory(**dict(args or {}))
    except TypeError as e:
        raise PluginError(f"cannot create {spec}: {e}") from None
    except Exception as e:
        raise PluginError(f"{spec}.__init__ raised {e!r}") from None
    return PluginBackend(obj, spec, timeout)

