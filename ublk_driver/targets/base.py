"""What every target tells the server, and the plug-in base class.

A *target* is where a device's I/O goes.  The server needs four things from
it: the size, the logical block size, the capabilities (which become the
device's queue limits, so the kernel never sends what the target cannot do)
and an engine: a native C target (null, mem, loop) whose I/O never enters
the interpreter, or Python methods (plug-ins).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, UblkError
from ublk_driver.drives import Drive, DriveLookupError, resolve, resolve_fd

if TYPE_CHECKING:
    from ublk_driver.faults import FaultSpec


@dataclass(frozen=True)
class Capabilities:
    """What a target can do; each maps to a queue limit of the ublk device."""

    read_only: bool = False
    flush: bool = False          # volatile write cache: FLUSH reaches stable storage
    fua: bool = False            # FUA writes are honoured
    discard: bool = False
    write_zeroes: bool = False
    discard_zeroes: bool = False  # discarded ranges read back as zeros
    rotational: bool = False


@dataclass(frozen=True)
class CompletionPath:
    """One completion path of a target and the drives under it.

    ``index`` is the ``path`` of the completion records and per-path summaries
    (``ublk_driver.records``) and of fault injection: the leg of a mirror, 0
    for every other target.
    """

    index: int
    name: str                     # "leg0" for a mirror leg, else the target's name
    backing: str | None           # the file or block device behind it, if any
    drives: tuple[Drive, ...] = ()
    no_drive: str | None = None   # why ``drives`` is empty

    @classmethod
    def resolved(cls, index: int, name: str, backing: str, fd: int = -1) -> CompletionPath:
        """The path whose drives are those under ``backing``, open as ``fd`` when
        ``fd >= 0`` (then the open file counts, even if renamed since)."""
        try:
            r = resolve_fd(fd, backing) if fd >= 0 else resolve(backing)
        except DriveLookupError as e:
            return cls(index, name, backing, (), str(e))
        return cls(index, name, backing, r.drives, r.reason)

    def to_dict(self) -> dict[str, object]:
        """As the admin socket's ``status`` shows it (its ``paths`` list)."""
        return {"index": self.index, "name": self.name, "backing": self.backing,
                "drives": [d.to_dict() for d in self.drives], "no_drive": self.no_drive}


class Backend(abc.ABC):
    """The server's view of a target (native or plug-in)."""

    #: short name shown by ``ublkml list``
    name: str = "?"

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Device size in bytes (a multiple of ``block_size``)."""

    @property
    def block_size(self) -> int:
        """Logical block size in bytes (512 unless the backing store needs more)."""
        return 512

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def attach(self) -> _bindings.CTarget:
        """Create the C target object the queues will share."""

    def bind(self, dev_id: int, recovering: bool) -> None:  # noqa: B027 (optional hook)
        """The server calls this once the device id is known, before :meth:`attach`.

        ``recovering``: a new server takes over a device whose server died
        (``ublkml recover``); a target with state of its own picks it up here.
        """

    def state_files(self) -> list[str]:
        """Files the target keeps for a recovering server; the server removes
        them once the device is deleted."""
        return []

    def describe(self) -> dict[str, object]:
        """A JSON-able description for ``ublkml list``."""
        return {"target": self.name, "size": self.size}

    def completion_paths(self) -> list[CompletionPath]:
        """Each completion path with its backing file and drives (sysfs is read
        on every call: the server keeps the answer).  Never raises: a path whose
        drives cannot be found says why in ``no_drive``.

        The default: one path, 0, with no backing and no drive.
        """
        return [CompletionPath(0, self.name, None, (),
                               f"target {self.name} has no backing file or device")]

    # ---- fault injection (native targets) -------------------------------------

    #: completion paths that faults can be set on (mirror: one per leg)
    paths: int = 0

    def __init__(self) -> None:
        self._ctarget: _bindings.CTarget | None = None
        self._faults: dict[int, FaultSpec] = {}
        self._faults_lock = threading.Lock()

    def _attached(self, ct: _bindings.CTarget) -> _bindings.CTarget:
        """Native targets pass their new C target through here: faults set
        before the device started are applied, later ones go straight to it."""
        with self._faults_lock:
            self._ctarget = ct
            for path, spec in sorted(self._faults.items()):
                ct.set_fault(path, spec.to_c())
        return ct

    def set_fault(self, path: int, spec: FaultSpec | None) -> None:
        """Inject ``spec`` into completion path ``path`` (None removes it).

        Before the device starts the fault is kept and applied at start (its
        schedule's clock starts then); afterwards it takes effect at once.
        """
        if self.paths == 0:
            raise ConfigError(f"target {self.name} has no fault injection: faults need a "
                              "native target (null, mem, loop, mirror)")
        if not 0 <= path < self.paths:
            raise ConfigError(f"fault path {path} does not exist: target {self.name} has "
                              f"{self.paths} path(s), 0..{self.paths - 1}")
        with self._faults_lock:
            if self._ctarget is not None:
                try:
                    self._ctarget.set_fault(path, None if spec is None else spec.to_c())
                except ValueError as e:   # the device has stopped
                    raise UblkError(f"cannot set a fault: {e}") from None
            if spec is None:
                self._faults.pop(path, None)
            else:
                self._faults[path] = spec

    def faults(self) -> dict[int, FaultSpec]:
        """The faults in force, by path."""
        with self._faults_lock:
            return dict(self._faults)

    def close(self) -> None:  # noqa: B027 - optional hook, most targets hold nothing
        """Release resources; flush what must reach stable storage."""


class Target:
    """Base class of Python plug-in targets, in the spirit of nbdkit's plug-ins.

    Override :meth:`size` and :meth:`read`; everything else is optional and
    the device only advertises what you define:

    - :meth:`write` — without it the device is read-only;
    - :meth:`flush` — makes the device a write-back cache device; FUA writes
      are then honoured as a write followed by ``flush()``;
    - :meth:`discard`, :meth:`write_zeroes`.

    ``read_into`` (fill a buffer in place) may replace ``read`` for speed.

    Errors: raise :class:`ublk_driver.IoError` (or any ``OSError``) with an
    errno to fail that one I/O with it; any other exception fails it with
    EIO.  Returning fewer bytes than asked fails the I/O with EIO.  The device
    and the server keep running either way.

    The plug-in methods of one queue run on that queue's thread; with several
    queues, methods may run on several threads (one at a time under the GIL),
    or, with ``fork_safe`` and ``--queue-processes``, in several processes.
    """

    #: the plug-in's state survives a fork: it lives in shared memory
    #: (``mmap.mmap(-1, n)``), files or another process, not in ordinary
    #: Python objects.  Only then may the server run each queue in its own
    #: process (``--queue-processes``), each with a copy of this object,
    #: so that queues run in parallel instead of taking turns on the GIL.
    fork_safe: bool = False
    #: discarded ranges read back as zeros
    discard_zeroes: bool = False
    rotational: bool = False

    def size(self) -> int:
        raise NotImplementedError("a plug-in target must define size()")

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        raise NotImplementedError("a plug-in target must define read() or read_into()")

    def read_into(self, offset: int, buf: memoryview) -> None:
        data = self.read(offset, len(buf))
        if len(data) != len(buf):
            raise ShortReadError(len(data), len(buf))
        buf[:] = data

    def write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def drives(self) -> Sequence[str | Drive]:
        """Where this plug-in's I/O lands, for ``ublkml status``: paths (files,
        directories or block devices, resolved like a loop target's backing
        file: :mod:`ublk_driver.drives`) or :class:`~ublk_driver.drives.Drive`
        objects.  The default is none; the server asks once, after start."""
        return ()

    def close(self) -> None:
        """Called once when the device goes away."""


class ShortReadError(Exception):
    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"read returned {got} bytes, {wanted} were asked for")
