"""The recommendation checks in eBPF: load, pin, configure, submit, run, read verdicts.

:class:`RecoCheck` loads ``bpf/recocheck.bpf.o`` (built with the package by
setup.py's ``build_bpf``) and pins its maps under
``/sys/fs/bpf/ublkml/<instance>/`` next to the accounting's: ``rc_ext``
(extension ids and policies by slot), ``rc_state`` (token buckets and
sequence counters), ``rc_actions`` (the allow-list with integer bounds),
``rc_modes`` and ``rc_leases`` (by device ``dev_t``; a lease is a set of
holders, kept in the kernel as a mask of extension slots), and the two
ARRAY_OF_MAPS ``rc_subq`` / ``rc_compq`` holding every extension's own
queues.  :meth:`RecoCheck.add_extension` creates an extension's submission
queue (USER_RINGBUF) and completion queue (RINGBUF) and pins them as
``rc_sub_<ext id>`` / ``rc_comp_<ext id>``, so the extension's process can
open its queue with ``bpf_obj_get``.

:meth:`RecoCheck.run` runs the ``SEC("syscall")`` program ``rc_check``
(``bpf_prog_test_run_opts``) for one extension: it drains the submission
queue and answers each record in the completion queue.  What it decides and
why is specified by :mod:`kernel_agent.recocheck_model`, which a property
test holds the kernel to.

Not root, a kernel without user ring buffers (before 6.1), a libbpf before
1.1 or a missing object: :class:`~kernel_agent.errors.BpfUnavailableError`
says which, and that the Python validator (:mod:`kernel_agent.validator`) is
the fall-back.  The agent (:mod:`kernel_agent.agent`) loads it at start and
runs it on every extension's queue; :func:`reason_text` words its verdicts
as the validator words the same refusals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel_agent import _libbpf
from kernel_agent.accounting import (
    BPF_DIR,
    bpf_load_unavailable_reason,
    ensure_bpffs,
    pin_dir,
)
from kernel_agent.errors import AgentError, BpfUnavailableError
from kernel_agent.recocheck_model import (
    ACTION,
    ACTION_IDS,
    ARGS,
    EXT,
    MAX_ACTIONS,
    MAX_EXT,
    MODE_IDS,
    PERMILLE_ONE,
    SCHEDULERS,
    STATE,
    SUB,
    U32,
    U64,
    Bounds,
    BucketState,
    ExtPolicy,
    Reason,
    Submission,
    Verdict,
    default_bounds,
)
from kernel_agent.ring import Recommendation, Status
from kernel_agent.validator import Mode

__all__ = [
    "FALLBACK",
    "OBJECT_PATH",
    "ExtensionQueues",
    "RecoCheck",
    "RunResult",
    "reason_text",
    "recocheck_unavailable_reason",
]

OBJECT_PATH = BPF_DIR / "recocheck.bpf.o"
FALLBACK = "recommendations are validated in Python (kernel_agent.validator) instead"
MAPS = ("rc_subq", "rc_compq", "rc_ext", "rc_state", "rc_actions", "rc_modes", "rc_leases")
#: Default size of each queue: 1170 submissions of 48 bytes, 682 verdicts of 88
#: (each sample carries an 8-byte header and is 8-byte aligned).
QUEUE_BYTES = 64 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def recocheck_unavailable_reason(object_path: Path = OBJECT_PATH) -> str | None:
    """Why the eBPF checker cannot be used here, or None if it may (the load decides)."""
    return (bpf_load_unavailable_reason(object_path, "CAP_BPF")
            or _libbpf.libbpf_missing("user_ring_buffer__new"))


def held_by(holders: Sequence[int]) -> str:
    """``leased to extension 3`` / ``extensions 3 and 7`` / ``no extension``."""
    if not holders:
        return "leased to no extension"
    if len(holders) == 1:
        return f"leased to extension {holders[0]}"
    ids = [str(h) for h in holders]
    return f"leased to extensions {', '.join(ids[:-1])} and {ids[-1]}"


def reason_text(v: Verdict, rec: Recommendation, policy: ExtPolicy,
                bounds: Mapping[int, Bounds] | None = None,
                holders: Sequence[int] = ()) -> str:
    """A refusal (or OBSERVED) in the words the Python validator uses for it.

    ``rec`` is the verdict's record with names put back (device, action,
    value text); ``policy`` and ``bounds`` are what the checker was given;
    ``holders`` the extension ids of the verdict's lease mask
    (:meth:`RecoCheck.holders`).
    """
    r = v.reason
    if r is Reason.RATE:
        return (f"rate limit: more than {policy.rate_per_s}/s (burst {policy.burst}) "
                f"from extension {v.owner}")
    if r is Reason.MALFORMED:
        return f"malformed: a record of other than {SUB.size} bytes"
    if r is Reason.EXT:
        return f"extension id {v.rec.ext_id} in the queue of extension {v.owner}"
    if r is Reason.TTL:
        return f"ttl_ms {v.rec.ttl_ms} not in (0, {policy.max_ttl_ms}]"
    if r is Reason.EXPIRED:
        return "expired before the kernel checked it"
    if r is Reason.CONF_HIGH:
        return f"confidence {rec.confidence:g} above 1"
    if r is Reason.CONF_LOW:
        return (f"confidence {rec.confidence:.3f} below the floor "
                f"{policy.floor_permille / PERMILLE_ONE:g}")
    if r is Reason.DEVICE:
        return f"unknown device {rec.device!r} (not watched by the agent)"
    if r is Reason.OWNER:
        return f"owner: {rec.device} is {held_by(holders)}, not to extension {v.owner}"
    if r is Reason.OBSERVE:
        return f"{rec.device} is in observe mode"
    if r is Reason.ACTION:
        return f"action {rec.action!r} is not allowed (allowed: {', '.join(sorted(ACTION_IDS))})"
    if r is Reason.BOUNDS:
        if rec.action == "scheduler":
            return f"scheduler={rec.value!r} is not one of {sorted(SCHEDULERS)}"
        b = (bounds if bounds is not None else default_bounds()).get(v.rec.action)
        where = f" [{b.lo}, {b.hi}]" if b is not None else ""
        return f"{rec.action}={rec.value} out of bounds{where}"
    return f"{Status(v.status).name.lower()} by the kernel ({r.name})"


def _unavailable(why: str) -> BpfUnavailableError:
    return BpfUnavailableError(f"the eBPF recommendation checker is unavailable: {why}; "
                               f"{FALLBACK}")


@dataclass(frozen=True)
class ExtensionQueues:
    """Where an extension's queues are pinned (open them with ``bpf_obj_get``)."""

    ext_id: int
    slot: int
    submission: str
    completion: str


@dataclass(frozen=True)
class RunResult:
    """One run of ``rc_check``: records answered, and whether the completion
    queue's room stopped it (consume the verdicts and run again)."""

    checked: int
    full: bool


class _Slot:
    """One extension's queues, as this process holds them."""

    def __init__(self, ext_id: int, slot: int, sub_fd: int, comp_fd: int,
                 paths: tuple[str, str]) -> None:
        self.ext_id = ext_id
        self.slot = slot
        self.sub_fd = sub_fd
        self.comp_fd = comp_fd
        self.paths = paths
        self.pending: list[bytes] = []
        self.producer = _libbpf.UserRingBuffer(sub_fd)
        try:
            self.consumer = _libbpf.RingBuffer(comp_fd, self.pending.append)
        except BaseException:
            self.producer.free()
            raise

    def close(self) -> None:
        self.producer.free()
        self.consumer.free()
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(self.sub_fd)
        os.close(self.comp_fd)


def _u32(name: str, value: int) -> int:
    if not 0 <= value < 1 << 32:
        raise AgentError(f"{name} {value} does not fit in 32 bits")
    return value


class RecoCheck:
    """The loaded and pinned checker of one agent instance."""

    def __init__(self, instance: str = "default", object_path: Path = OBJECT_PATH,
                 queue_bytes: int = QUEUE_BYTES) -> None:
        reason = recocheck_unavailable_reason(object_path)
        if reason:
            raise _unavailable(reason)
        if queue_bytes < _PAGE or queue_bytes & (queue_bytes - 1):
            raise AgentError(f"queue_bytes {queue_bytes} must be a power of two of at least "
                             f"one page ({_PAGE})")
        self.pin_dir = pin_dir(instance)
        self.queue_bytes = queue_bytes
        self._slots: dict[int, _Slot] = {}
        self._leases: dict[int, frozenset[int]] = {}   # dev -> holders' extension ids
        self._pinned: list[tuple[_libbpf.BpfMap, str]] = []
        ensure_bpffs()
        self._obj = _libbpf.BpfObject(str(object_path))
        try:
            self._obj.load()
        except _libbpf.LibbpfError as e:
            self._obj.close()
            log = e.log.strip()[-1500:]
            raise _unavailable(f"{e} (user ring buffers need Linux 6.1)"
                               + (f"\n{log}" if log else "")) from None
        try:
            self._pin()
            self._prog = self._obj.program("rc_check")
            self._fd = {name: self._obj.map(name).fd for name in MAPS}
            self.set_actions(default_bounds())
        except BaseException:
            self.close()
            raise

    def _pin(self) -> None:
        os.makedirs(self.pin_dir, exist_ok=True)
        for name in MAPS:
            path = f"{self.pin_dir}/{name}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale pin of a checker that died
            m = self._obj.map(name)
            m.pin(path)
            self._pinned.append((m, path))

    # -- configuration ---------------------------------------------------------

    def set_actions(self, bounds: Mapping[int, Bounds]) -> None:
        """Replace the allow-list: action id -> inclusive bounds; other ids are refused."""
        for action in bounds:
            if not 0 < action < MAX_ACTIONS:
                raise AgentError(f"action id {action} not in 1..{MAX_ACTIONS - 1}")
        for action in range(MAX_ACTIONS):
            b = bounds.get(action)
            value = b.pack() if b is not None else bytes(ACTION.size)  # allowed = 0
            _libbpf.map_update_elem(self._fd["rc_actions"], U32.pack(action), value)

    def set_mode(self, dev: int, mode: Mode | None) -> None:
        """Watch ``dev`` in ``mode`` (None: not watched, every record for it refused)."""
        key = U32.pack(_u32("dev", dev))
        if mode is None:
            _libbpf.map_delete_elem(self._fd["rc_modes"], key)
        else:
            _libbpf.map_update_elem(self._fd["rc_modes"], key, U32.pack(MODE_IDS[mode]))

    def set_lease(self, dev: int, holders: Collection[int]) -> None:
        """Lease ``dev`` to the extensions ``holders`` (ids; empty: to nobody).

        An id without a slot yet (not added, or removed) is kept and enters the
        kernel's mask when :meth:`add_extension` gives it one.
        """
        key = U32.pack(_u32("dev", dev))
        want = frozenset(_u32("ext id", h) for h in holders)
        if want:
            self._leases[dev] = want
        else:
            self._leases.pop(dev, None)
        self._write_lease(dev, key)

    def _write_lease(self, dev: int, key: bytes | None = None) -> None:
        key = key if key is not None else U32.pack(dev)
        mask = self.lease_mask(self._leases.get(dev, frozenset()))
        if mask:
            _libbpf.map_update_elem(self._fd["rc_leases"], key, U64.pack(mask))
        else:
            _libbpf.map_delete_elem(self._fd["rc_leases"], key)

    def _rewrite_leases_of(self, ext_id: int) -> None:
        for dev, holders in self._leases.items():
            if ext_id in holders:
                self._write_lease(dev)

    def lease_mask(self, holders: Collection[int]) -> int:
        """The kernel's mask for these holders: the bits of those that have a slot."""
        mask = 0
        for h in holders:
            s = self._slots.get(h)
            if s is not None:
                mask |= 1 << s.slot
        return mask

    def lease(self, dev: int) -> int:
        """The mask the kernel holds for ``dev`` (0: leased to nobody)."""
        raw = _libbpf.map_lookup_elem(self._fd["rc_leases"], U32.pack(_u32("dev", dev)),
                                      U64.size)
        return 0 if raw is None else int(U64.unpack(raw)[0])

    def holders(self, mask: int) -> list[int]:
        """The extension ids of a verdict's lease mask, in slot order."""
        by_slot = {s.slot: s.ext_id for s in self._slots.values()}
        return [by_slot[i] for i in range(MAX_EXT) if mask >> i & 1 and i in by_slot]

    def add_extension(self, ext_id: int, policy: ExtPolicy | None = None) -> ExtensionQueues:
        """Give extension ``ext_id`` a slot, its two queues and ``policy``."""
        if _u32("ext id", ext_id) == 0:
            raise AgentError("extension id 0 is reserved (it marks a free slot)")
        if ext_id in self._slots:
            raise AgentError(f"extension {ext_id} already has its queues")
        used = {s.slot for s in self._slots.values()}
        free = [i for i in range(MAX_EXT) if i not in used]
        if not free:
            raise AgentError(f"all {MAX_EXT} extension slots of the checker are in use")
        slot = free[0]
        sub_fd = _libbpf.map_create(_libbpf.BPF_MAP_TYPE_USER_RINGBUF, f"rc_sub_{slot}", 0, 0,
                                    self.queue_bytes)
        try:
            comp_fd = _libbpf.map_create(_libbpf.BPF_MAP_TYPE_RINGBUF, f"rc_comp_{slot}", 0, 0,
                                         self.queue_bytes)
        except BaseException:
            os.close(sub_fd)
            raise
        paths = (f"{self.pin_dir}/rc_sub_{ext_id}", f"{self.pin_dir}/rc_comp_{ext_id}")
        try:
            s = _Slot(ext_id, slot, sub_fd, comp_fd, paths)
        except BaseException:
            os.close(sub_fd)
            os.close(comp_fd)
            raise
        self._slots[ext_id] = s
        try:
            key = U32.pack(slot)
            _libbpf.map_update_elem(self._fd["rc_state"], key, BucketState().pack())
            _libbpf.map_update_elem(self._fd["rc_subq"], key, U32.pack(sub_fd))
            _libbpf.map_update_elem(self._fd["rc_compq"], key, U32.pack(comp_fd))
            _libbpf.map_update_elem(self._fd["rc_ext"], key,
                                    (policy or ExtPolicy()).pack(ext_id))
            for fd, path in ((sub_fd, paths[0]), (comp_fd, paths[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                _libbpf.obj_pin(fd, path)
            self._rewrite_leases_of(ext_id)   # its leases given before it had a slot
        except BaseException:
            self.remove_extension(ext_id)
            raise
        return self.queues(ext_id)

    def queues(self, ext_id: int) -> ExtensionQueues:
        """The extension's slot and the pins of its queues."""
        s = self._slot(ext_id)
        return ExtensionQueues(ext_id, s.slot, *s.paths)

    def set_policy(self, ext_id: int, policy: ExtPolicy) -> None:
        key = U32.pack(self._slot(ext_id).slot)
        _libbpf.map_update_elem(self._fd["rc_ext"], key, policy.pack(ext_id))

    def reset(self, ext_id: int) -> None:
        """Refill the extension's bucket at its next record and restart its sequence at 1."""
        key = U32.pack(self._slot(ext_id).slot)
        _libbpf.map_update_elem(self._fd["rc_state"], key, BucketState().pack())

    def state(self, ext_id: int) -> BucketState:
        raw = _libbpf.map_lookup_elem(self._fd["rc_state"], U32.pack(self._slot(ext_id).slot),
                                      STATE.size)
        assert raw is not None  # an array map has every key
        return BucketState.unpack(raw)

    def remove_extension(self, ext_id: int) -> None:
        """Free the extension's slot; its queues go when the last holder closes them."""
        s = self._slots.pop(ext_id, None)
        if s is None:
            return
        # Its bit leaves every lease before the slot can go to another extension.
        with contextlib.suppress(OSError):
            self._rewrite_leases_of(ext_id)
        key = U32.pack(s.slot)
        with contextlib.suppress(OSError):
            _libbpf.map_update_elem(self._fd["rc_ext"], key, bytes(EXT.size))
        for name in ("rc_subq", "rc_compq"):
            with contextlib.suppress(OSError):
                _libbpf.map_delete_elem(self._fd[name], key)
        s.close()

    def _slot(self, ext_id: int) -> _Slot:
        s = self._slots.get(ext_id)
        if s is None:
            raise AgentError(f"extension {ext_id} has no queues in the checker "
                             "(add_extension first)")
        return s

    # -- records -----------------------------------------------------------------

    def submit(self, ext_id: int, rec: Submission | bytes) -> None:
        """Put one record (or, for tests, any bytes) on the extension's submission queue."""
        data = rec.pack() if isinstance(rec, Submission) else rec
        try:
            self._slot(ext_id).producer.submit(data)
        except _libbpf.LibbpfError as e:
            raise AgentError(f"submission queue of extension {ext_id} refused a "
                             f"{len(data)}-byte record: {e}") from None

    def run(self, ext_id: int, max_records: int = 0) -> RunResult:
        """Run ``rc_check`` once on the extension's queue (0: as many as fit)."""
        ctx = bytearray(ARGS.pack(self._slot(ext_id).slot, max_records, 0, 0))
        ret = self._prog.test_run(ctx)
        if ret < 0:
            raise _libbpf.LibbpfError(-ret, f"rc_check on the queue of extension {ext_id}")
        _, _, checked, full = ARGS.unpack(ctx)
        return RunResult(checked, bool(full))

    def verdicts(self, ext_id: int) -> list[Verdict]:
        """Every verdict waiting in the extension's completion queue, oldest first."""
        s = self._slot(ext_id)
        s.consumer.consume()
        raws, s.pending[:] = list(s.pending), []
        return [Verdict.unpack(raw) for raw in raws]

    def check(self, ext_id: int) -> list[Verdict]:
        """Run until the submission queue is empty; every verdict, oldest first."""
        out: list[Verdict] = []
        while True:
            result = self.run(ext_id)
            out += self.verdicts(ext_id)
            if not result.full:
                return out

    # -- life cycle ----------------------------------------------------------------

    def close(self) -> None:
        """Drop every extension's queues, unpin, unload."""
        for ext_id in list(self._slots):
            self.remove_extension(ext_id)
        for m, path in self._pinned:
            with contextlib.suppress(OSError):
                m.unpin(path)
        self._pinned.clear()
        with contextlib.suppress(OSError):
            os.rmdir(self.pin_dir)  # shared with the accounting's pins: only if empty
        if self._obj is not None:
            self._obj.close()

    def __enter__(self) -> RecoCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
