"""The recommendation channel: two single-producer single-consumer rings in a file.

An extension (an ML predictor, a ublk server) *submits* recommendations; the
agent validates them and answers each with one or more *completions* (its
decision, then, for applied changes, the outcome of the effect check).  Both
rings live in one memory-mapped file per extension, created by the agent at
registration (``ublkml agent add``) under ``<state dir>/rings/<id>.ring``.

A BPF arena would let eBPF programs read the rings too, but it needs clang 19
and a libbpf newer than Debian 12's 1.1 (docs/ebpf.md), and nothing
kernel-side consumes recommendations; a shared file has the same layout
discipline and works everywhere.

File layout (little endian; every index on its own 64-byte cache line)::

    0    char[8]  magic "UBKMLRC\\0"
    8    u32      version (1)
    12   u32      header size (320)
    16   u32      submission slots       20  u32  submission record size (256)
    24   u32      completion slots       28  u32  completion record size (256)
    32   u32      extension id            36..63 reserved (0)
    64   u64      submission head   (consumer: the agent)
    128  u64      submission tail   (producer: the extension)
    192  u64      completion head   (consumer: the extension)
    256  u64      completion tail   (producer: the agent)
    320  submission slots, then completion slots

Indices count records forever (they never wrap in practice); a record lives
in slot ``index % slots``; a ring is full when ``tail - head == slots``.  The
producer writes the record, then publishes it with one aligned 8-byte store
of ``tail``; the consumer reads records up to ``tail``, then stores ``head``.
On x86-64 (the project's only target) stores are not reordered with other
stores, and an aligned 8-byte store through a ``memoryview`` of the mapping
is a single instruction, so no further fences are needed.

Submission record (256 bytes)::

    0   u32 seq          4   u32 ext_id       8   u64 created_ns (CLOCK_REALTIME)
    16  u32 ttl_ms       20  u32 reserved     24  f64 confidence
    32  char[32] device  64  char[32] action  96  char[64] value (text)
    160 char[64] model   224 u32 crc32 (of the record with this field zeroed)
    228 28 bytes reserved (0)

Completion record (256 bytes)::

    0   u32 seq          4   u32 ext_id       8   u64 ts_ns (CLOCK_REALTIME)
    16  u32 status       20  u32 crc32        24  char[32] device
    56  char[32] action  88  char[32] old     120 char[32] new
    152 char[104] reason

Strings are UTF-8, NUL-padded; anything after the first NUL must be NUL.  A
record that fails any check is *malformed*: the agent answers it with a
REJECTED completion naming the problem and carries on.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
import time
import zlib
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

from kernel_agent.errors import RingError

MAGIC = b"UBKMLRC\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIIII28x")
HEADER_SIZE = 320
OFF_SUB_HEAD, OFF_SUB_TAIL, OFF_COMP_HEAD, OFF_COMP_TAIL = 64, 128, 192, 256
RECORD_SIZE = 256
DEFAULT_SLOTS = 64
MAX_INDEX = (1 << 64) - 1

SUB = struct.Struct("<IIQIId32s32s64s64sI28x")
COMP = struct.Struct("<IIQII32s32s32s32s104s")
SUB_CRC_OFFSET = 224
COMP_CRC_OFFSET = 20
assert SUB.size == RECORD_SIZE and COMP.size == RECORD_SIZE and HEADER.size == 64


#: The agent's wake-up FIFO, in its state dir: a submitter writes a byte to it
#: after publishing a record, so the agent answers at once instead of at its
#: next tick (nothing in a ring or a user ring buffer wakes a poller on the
#: consumer side).
WAKE_NAME = "wake"


class Waker:
    """The submitter's end of the wake-up FIFO; every failure is silent (the
    agent's tick still finds the record, only later)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = -1

    def poke(self) -> None:
        if self._fd < 0:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return  # no FIFO, or no agent holding it open (ENXIO)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)  # never write into anything else found there
                return
            self._fd = fd
        try:
            os.write(self._fd, b"\0")
        except BlockingIOError:
            pass  # full: the agent has wake-ups pending already
        except OSError:
            self.close()  # the agent went away (EPIPE): reopen next time

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MalformedRecord(ValueError):
    """A ring entry that cannot be trusted; the message is the reason given back."""


class Status(IntEnum):
    """What the agent decided (completion ``status``)."""

    APPLIED = 1       # enforce mode: changed; an effect check follows
    RECOMMENDED = 2   # recommend mode: valid, logged for an operator, not applied
    OBSERVED = 3      # observe mode: logged only
    REJECTED = 4      # invalid: see the reason
    KEPT = 5          # the effect check found no regression
    ROLLED_BACK = 6   # the effect check measured a regression: old value restored
    FAILED = 7        # valid, but applying it failed (the reason says why)


@dataclass(frozen=True)
class Recommendation:
    """A proposed change to one device, from one extension."""

    device: str
    action: str
    value: str
    confidence: float
    model: str
    ttl_ms: int
    ext_id: int
    seq: int = 0
    created_ns: int = 0

    def expired(self, now_ns: int) -> bool:
        return now_ns > self.created_ns + self.ttl_ms * 1_000_000


@dataclass(frozen=True)
class Completion:
    """The agent's answer to one recommendation (or to a malformed slot)."""

    seq: int
    ext_id: int
    status: Status
    device: str = ""
    action: str = ""
    old: str = ""
    new: str = ""
    reason: str = ""
    ts_ns: int = 0


def _fit(text: str, size: int) -> bytes:
    """UTF-8, cut at a character boundary to fit ``size`` bytes."""
    raw = text.encode()
    if len(raw) <= size:
        return raw
    return raw[:size].decode(errors="ignore").encode()


def _text(raw: bytes, field: str) -> str:
    end = raw.find(b"\0")
    body, pad = (raw, b"") if end < 0 else (raw[:end], raw[end:])
    if pad.strip(b"\0"):
        raise MalformedRecord(f"{field}: bytes after the terminating NUL")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise MalformedRecord(f"{field}: not UTF-8") from None
    if not text.isprintable():
        raise MalformedRecord(f"{field}: control characters")
    return text


def _crc(record: bytes, crc_offset: int) -> int:
    return zlib.crc32(record[:crc_offset] + b"\0\0\0\0" + record[crc_offset + 4:])


def encode_submission(rec: Recommendation) -> bytes:
    """The 256-byte record (strings too long are cut, never an error)."""
    raw = SUB.pack(rec.seq & 0xFFFFFFFF, rec.ext_id & 0xFFFFFFFF,
                   rec.created_ns & 0xFFFFFFFFFFFFFFFF, rec.ttl_ms & 0xFFFFFFFF, 0,
                   rec.confidence, _fit(rec.device, 32), _fit(rec.action, 32),
                   _fit(rec.value, 64), _fit(rec.model, 64), 0)
    return raw[:SUB_CRC_OFFSET] + struct.pack("<I", _crc(raw, SUB_CRC_OFFSET)) + \
        raw[SUB_CRC_OFFSET + 4:]


def decode_submission(raw: bytes) -> Recommendation:
    """Parse and check one record; :class:`MalformedRecord` says what is wrong."""
    if len(raw) != RECORD_SIZE:
        raise MalformedRecord(f"record of {len(raw)} bytes, expected {RECORD_SIZE}")
    seq, ext_id, created, ttl, reserved, conf, dev, act, val, model, crc = SUB.unpack(raw)
    if crc != _crc(raw, SUB_CRC_OFFSET):
        raise MalformedRecord("bad checksum (torn or corrupted record)")
    if reserved or raw[SUB_CRC_OFFSET + 4:].strip(b"\0"):
        raise MalformedRecord("reserved bytes are not zero")
    if not math.isfinite(conf):
        raise MalformedRecord("confidence is not a finite number")
    return Recommendation(device=_text(dev, "device"), action=_text(act, "action"),
                          value=_text(val, "value"), confidence=conf,
                          model=_text(model, "model"), ttl_ms=ttl, ext_id=ext_id, seq=seq,
                          created_ns=created)


def encode_completion(c: Completion) -> bytes:
    raw = COMP.pack(c.seq & 0xFFFFFFFF, c.ext_id & 0xFFFFFFFF, c.ts_ns, int(c.status), 0,
                    _fit(c.device, 32), _fit(c.action, 32), _fit(c.old, 32), _fit(c.new, 32),
                    _fit(c.reason, 104))
    return raw[:COMP_CRC_OFFSET] + struct.pack("<I", _crc(raw, COMP_CRC_OFFSET)) + \
        raw[COMP_CRC_OFFSET + 4:]


def decode_completion(raw: bytes) -> Completion:
    if len(raw) != RECORD_SIZE:
        raise MalformedRecord(f"record of {len(raw)} bytes, expected {RECORD_SIZE}")
    seq, ext_id, ts, status, crc, dev, act, old, new, reason = COMP.unpack(raw)
    if crc != _crc(raw, COMP_CRC_OFFSET):
        raise MalformedRecord("bad checksum (torn or corrupted record)")
    try:
        st = Status(status)
    except ValueError:
        raise MalformedRecord(f"unknown status {status}") from None
    return Completion(seq=seq, ext_id=ext_id, status=st, device=_text(dev, "device"),
                      action=_text(act, "action"), old=_text(old, "old"),
                      new=_text(new, "new"), reason=_text(reason, "reason"), ts_ns=ts)


class Channel:
    """One extension's ring file, mapped; either side uses the methods of its role.

    Extension side: :meth:`submit`, :meth:`completions`.
    Agent side: :meth:`take_submissions`, :meth:`complete`.
    """

    def __init__(self, path: str | os.PathLike[str], fd: int, size: int) -> None:
        self.path = Path(path)
        # Rings live in <state dir>/rings/: the agent's FIFO is in <state dir>.
        self._waker = Waker(self.path.parent.parent / WAKE_NAME)
        # The fd stays open: the size is re-checked before the mapping is touched
        # (see _check_size), because the other side may truncate the file.
        self._fd = fd
        self._size = size
        try:
            if size < HEADER_SIZE or size % 8:  # the index view needs whole u64s
                raise RingError(f"{path}: {size} bytes is not the size of a ring file "
                                f"(header {HEADER_SIZE} + 256-byte slots); recreate it with "
                                "`ublkml agent add`")
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._idx = memoryview(self._map).cast("Q")  # aligned 8-byte loads and stores
        try:
            self._check_header(path, size)
        except BaseException:
            self.close()
            raise
        self._seq = self._load(OFF_SUB_TAIL)

    def _check_header(self, path: str | os.PathLike[str], size: int) -> None:
        magic, version, hsize, nsub, sub_rs, ncomp, comp_rs, ext_id = HEADER.unpack_from(
            self._map, 0)
        if magic != MAGIC:
            raise RingError(f"{path}: not a recommendation ring (bad magic)")
        if version != VERSION:
            raise RingError(f"{path}: ring version {version}, this agent speaks {VERSION}")
        if (hsize != HEADER_SIZE or sub_rs != RECORD_SIZE or comp_rs != RECORD_SIZE
                or not nsub or not ncomp
                or size != HEADER_SIZE + (nsub + ncomp) * RECORD_SIZE):
            raise RingError(f"{path}: inconsistent ring header")
        self.sub_slots, self.comp_slots, self.ext_id = nsub, ncomp, ext_id
        self.malformed = 0  # completions that failed their checks (extension side)

    def _check_size(self) -> None:
        """Refuse to touch the mapping of a file that shrank since it was mapped.

        A page of a MAP_SHARED mapping beyond the end of the file raises SIGBUS,
        which kills the process: an extension that truncates its ring file must
        not take the agent down.  (The check narrows the window to the few
        microseconds between fstat and the access; it cannot close it.)
        """
        try:
            size = os.fstat(self._fd).st_size
        except OSError as e:
            raise RingError(f"{self.path}: cannot stat the ring: {e.strerror}") from None
        if size < self._size:
            raise RingError(f"{self.path}: the ring file was truncated to {size} bytes "
                            f"(mapped {self._size}); it is no longer used")

    @classmethod
    def create(cls, path: str | os.PathLike[str], ext_id: int, slots: int = DEFAULT_SLOTS,
               mode: int = 0o600) -> Channel:
        """A new, empty ring file (replacing any old one atomically)."""
        size = HEADER_SIZE + 2 * slots * RECORD_SIZE
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, HEADER.pack(MAGIC, VERSION, HEADER_SIZE, slots, RECORD_SIZE, slots,
                                      RECORD_SIZE, ext_id), 0)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return cls(path, fd, size)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Channel:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise RingError(f"cannot open the ring {path}: {e.strerror}") from None
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            os.close(fd)
            raise RingError(f"{path}: truncated ring file ({size} bytes)")
        return cls(path, fd, size)

    def _load(self, off: int) -> int:
        return int(self._idx[off // 8])

    def _store(self, off: int, value: int) -> None:
        self._idx[off // 8] = value

    def _slot(self, base: int, index: int, slots: int) -> int:
        return base + (index % slots) * RECORD_SIZE

    # -- extension side ---------------------------------------------------------

    def submit(self, rec: Recommendation) -> Recommendation | None:
        """Queue ``rec`` (seq, ext_id and created_ns filled in); None when full."""
        head, tail = self._load(OFF_SUB_HEAD), self._load(OFF_SUB_TAIL)
        if tail - head >= self.sub_slots:
            return None
        rec = replace(rec, seq=self.next_seq(), ext_id=self.ext_id,
                      created_ns=rec.created_ns or time.time_ns())
        self.submit_raw(encode_submission(rec))
        self._waker.poke()
        return rec

    def next_seq(self) -> int:
        """The next sequence number of this extension's submissions (shared with
        the eBPF queue, :class:`kernel_agent.rcqueue.KernelQueue`, whose answers
        come back on this ring too)."""
        self._seq = max(self._seq, self._load(OFF_SUB_TAIL)) + 1
        return self._seq & 0xFFFFFFFF

    def submit_raw(self, record: bytes) -> bool:
        """Queue raw bytes (tests use this to send malformed records)."""
        head, tail = self._load(OFF_SUB_HEAD), self._load(OFF_SUB_TAIL)
        if tail >= MAX_INDEX and head == tail:
            # An empty ring at the u64 limit (only garbage puts it there): restart
            # at 0, tail first, so that the agent sees tail < head and follows.
            self._store(OFF_SUB_TAIL, 0)
            self._store(OFF_SUB_HEAD, 0)
            head = tail = 0
        if tail < head or tail - head >= self.sub_slots or tail >= MAX_INDEX:
            return False
        off = self._slot(HEADER_SIZE, tail, self.sub_slots)
        self._map[off:off + RECORD_SIZE] = record[:RECORD_SIZE].ljust(RECORD_SIZE, b"\0")
        self._store(OFF_SUB_TAIL, tail + 1)  # publish
        return True

    def completions(self) -> list[Completion]:
        """Every completion the agent posted since the last call.

        Corrupt indices (tail behind the head or more than a ring ahead) are
        resynchronised, as the agent does for submissions, instead of reading
        the same slots billions of times.
        """
        out: list[Completion] = []
        comp_base = HEADER_SIZE + self.sub_slots * RECORD_SIZE
        head, tail = self._load(OFF_COMP_HEAD), self._load(OFF_COMP_TAIL)
        if tail < head or tail - head > self.comp_slots:
            self._store(OFF_COMP_HEAD, tail)
            return out
        while head < tail:
            off = self._slot(comp_base, head, self.comp_slots)
            try:
                out.append(decode_completion(bytes(self._map[off:off + RECORD_SIZE])))
            except MalformedRecord:
                self.malformed += 1  # counted, not raised: one bad slot must not
                # stop the reader (or `agent recommend --wait`) from seeing the rest
            head += 1
        self._store(OFF_COMP_HEAD, head)
        return out

    # -- agent side ---------------------------------------------------------------

    def take_submissions(self, limit: int) -> tuple[list[bytes], str | None]:
        """Up to ``limit`` raw records, and a problem with the indices if any.

        Indices come from the other process and are not trusted: a tail behind
        the head or too far ahead is reported, and the ring is resynchronised
        (everything pending dropped) instead of reading garbage.
        """
        self._check_size()
        head, tail = self._load(OFF_SUB_HEAD), self._load(OFF_SUB_TAIL)
        if tail < head or tail - head > self.sub_slots:
            self._store(OFF_SUB_HEAD, tail)
            return [], f"corrupt submission indices (head {head}, tail {tail}): resynchronised"
        out: list[bytes] = []
        while head < tail and len(out) < limit:
            off = self._slot(HEADER_SIZE, head, self.sub_slots)
            out.append(bytes(self._map[off:off + RECORD_SIZE]))
            head += 1
        self._store(OFF_SUB_HEAD, head)
        return out, None

    def pending(self) -> int:
        return max(0, self._load(OFF_SUB_TAIL) - self._load(OFF_SUB_HEAD))

    def complete(self, c: Completion) -> bool:
        """Post a completion; False (dropped) when the extension does not read them.

        Raises :class:`RingError` when the file shrank under the mapping.
        """
        self._check_size()
        comp_base = HEADER_SIZE + self.sub_slots * RECORD_SIZE
        head, tail = self._load(OFF_COMP_HEAD), self._load(OFF_COMP_TAIL)
        if tail < head or tail - head > self.comp_slots or tail >= MAX_INDEX:
            # Corrupt indices (the extension wrote them, or garbage did): restart
            # the completion ring empty, as take_submissions does for its ring;
            # otherwise a tail at 2^64 - 1 would silence this ring for good.
            head = tail = 0
            self._store(OFF_COMP_HEAD, 0)
            self._store(OFF_COMP_TAIL, 0)
        if tail - head >= self.comp_slots:
            return False  # full: the extension does not read its completions
        off = self._slot(comp_base, tail, self.comp_slots)
        self._map[off:off + RECORD_SIZE] = encode_completion(c)
        self._store(OFF_COMP_TAIL, tail + 1)
        return True

    def close(self) -> None:
        if self._fd < 0:
            return
        self._waker.close()
        self._idx.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1
