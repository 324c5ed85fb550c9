"""The reference model of the eBPF recommendation checker: its specification.

``bpf/recocheck.bpf.c`` must give, for every record, exactly the verdict
:meth:`RecoCheckModel.check` gives when fed the same record and the same
clock reading (the program writes its ``bpf_ktime_get_ns()`` into each
verdict, so the model is evaluated at that instant).  The property test in
``tests/kernel_agent/test_recocheck.py`` runs both on generated records and
compares every field.  Pure Python, integers only, the same fixed-point
arithmetic as the program:

* confidence is an integer in permille (1000 = certain); the floor too;
* the token bucket counts *nano-tokens* (:data:`TOKEN` = 1e9 per token), is
  refilled by ``elapsed_ns * rate_per_s`` and capped at ``burst * TOKEN``;
  it starts full at an extension's first record;
* times are CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns()`` in user
  space, ``bpf_ktime_get_ns()`` in the kernel); a record expires when
  ``now > created_ns`` and ``now - created_ns > ttl_ms * 1e6``.

The checks run in the order of :class:`Reason` (that of
:mod:`kernel_agent.validator`, with the device lease checked before the
device's mode); the first that fails decides.  Every record costs a token,
a malformed one too, so a record over the rate is answered RATE even when
it is also malformed.

Record layouts (little endian; mirrored in the C file, whose BTF a test
compares with these sizes)::

    submission (48 bytes)            verdict (88 bytes)
    0  u32 seq                       0  u64 kseq     (1, 2, ... per extension)
    4  u32 ext_id                    8  u64 now_ns   (the clock the checks used)
    8  u64 created_ns                16 u32 status   (kernel_agent.ring.Status)
    16 u32 ttl_ms                    20 u32 reason   (Reason)
    20 u32 confidence (permille)     24 u32 owner    (the queue owner's id)
    24 u32 dev (MAJOR << 20 | MINOR) 28 u32 tokens   (whole tokens left)
    28 u32 action (ACTION_IDS)       32 u64 holders  (the lease: a mask of slots)
    32 s64 value                     40 the submission as checked
    40 u32 model                        (all zero when malformed)
    44 u32 reserved

A device's lease (``rc_leases``) is a *set* of holders: bit ``i`` of its
mask is the extension in slot ``i`` (a device is leased to its server or leg
policy and to the host-wide drive monitor at once).  The OWNER check passes
when the bit of the queue the record came through is set; the verdict
reports the whole mask, which user space turns back into extension ids
(:meth:`kernel_agent.recocheck.RecoCheck.holders`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from kernel_agent.ring import Status
from kernel_agent.validator import Mode

#: One token, in the bucket's unit (nano-tokens).
TOKEN = 1_000_000_000
NS_PER_MS = 1_000_000
PERMILLE_ONE = 1000
#: Extension slots, action ids and devices of one loaded checker (RC_MAX_*);
#: a lease is a 64-bit mask of slots.
MAX_EXT = 64
MAX_ACTIONS = 16
MAX_DEVS = 1024

SUB = struct.Struct("<IIQIIIIqII")     # struct rc_rec
VERDICT = struct.Struct("<QQIIIIQ")    # struct rc_verdict, without its rc_rec
EXT = struct.Struct("<IIIIII")         # struct rc_ext
STATE = struct.Struct("<QQQIIQ")       # struct rc_state
ACTION = struct.Struct("<IIqq")        # struct rc_action
ARGS = struct.Struct("<IIII")          # struct rc_args
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

#: The program's device modes (RC_MODE_*), by the validator's names.
MODE_IDS: dict[Mode, int] = {Mode.OBSERVE: 1, Mode.RECOMMEND: 2, Mode.ENFORCE: 3}

#: Action ids in records and ``rc_actions``; 0 is never allowed.  The names
#: and bounds are those of :func:`kernel_agent.actions.default_actions`.
ACTION_IDS: dict[str, int] = {
    "read_ahead_kb": 1, "nr_requests": 2, "wbt_lat_usec": 3, "scheduler": 4,
    "throttle_read_bps": 5, "throttle_write_bps": 6, "throttle_read_iops": 7,
    "throttle_write_iops": 8, "demote_leg": 9, "promote_leg": 10,
}
#: ``scheduler`` values: an index into this tuple (the kernel has no strings).
#: Whether the device offers the scheduler is still for user space to check.
SCHEDULERS = ("none", "mq-deadline", "kyber", "bfq")


class Reason(IntEnum):
    """Why a verdict is what it is, in the order the checks run (enum rc_reason)."""

    OK = 0
    RATE = 1          # no token left in the extension's bucket
    MALFORMED = 2     # the sample is not exactly SUB.size bytes
    EXT = 3           # the record's ext_id is not the queue owner's
    TTL = 4           # ttl_ms is 0 or above the extension's max_ttl_ms
    EXPIRED = 5       # created_ns + ttl_ms is in the past
    CONF_HIGH = 6     # confidence above 1000 permille
    CONF_LOW = 7      # confidence below the extension's floor
    DEVICE = 8        # the device is not watched (no mode)
    OWNER = 9         # the device is not leased to this extension
    OBSERVE = 10      # the device is in observe mode (status OBSERVED)
    ACTION = 11       # the action is not allowed
    BOUNDS = 12       # the value is outside the action's bounds


@dataclass(frozen=True)
class Submission:
    """One record an extension submits (struct rc_rec)."""

    ext_id: int
    dev: int
    action: int
    value: int
    confidence: int      # permille
    ttl_ms: int
    created_ns: int      # CLOCK_MONOTONIC
    seq: int = 0
    model: int = 0
    reserved: int = 0

    def pack(self) -> bytes:
        return SUB.pack(self.seq, self.ext_id, self.created_ns, self.ttl_ms, self.confidence,
                        self.dev, self.action, self.value, self.model, self.reserved)

    @classmethod
    def unpack(cls, raw: bytes) -> Submission:
        seq, ext_id, created, ttl, conf, dev, action, value, model, res = SUB.unpack(raw)
        return cls(ext_id, dev, action, value, conf, ttl, created, seq, model, res)


EMPTY = Submission(0, 0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Verdict:
    """The checker's answer to one submission (struct rc_verdict)."""

    kseq: int
    now_ns: int
    status: Status
    reason: Reason
    owner: int
    tokens: int
    holders: int          # the device's lease: bit i = slot i (0 before check 9)
    rec: Submission

    def pack(self) -> bytes:
        return VERDICT.pack(self.kseq, self.now_ns, self.status, self.reason, self.owner,
                            self.tokens, self.holders) + self.rec.pack()

    @classmethod
    def unpack(cls, raw: bytes) -> Verdict:
        """Decode a verdict; ValueError for a size or status/reason it cannot be."""
        if len(raw) != VERDICT.size + SUB.size:
            raise ValueError(f"a verdict is {VERDICT.size + SUB.size} bytes, not {len(raw)}")
        kseq, now, status, reason, owner, tokens, holders = VERDICT.unpack_from(raw)
        return cls(kseq, now, Status(status), Reason(reason), owner, tokens, holders,
                   Submission.unpack(raw[VERDICT.size:]))


@dataclass(frozen=True)
class ExtPolicy:
    """An extension's limits (struct rc_ext without the id)."""

    rate_per_s: int = 5
    burst: int = 20
    floor_permille: int = 500
    max_ttl_ms: int = 3_600_000

    def pack(self, ext_id: int) -> bytes:
        return EXT.pack(ext_id, self.rate_per_s, self.burst, self.floor_permille,
                        self.max_ttl_ms, 0)


@dataclass(frozen=True)
class Bounds:
    """An allowed action's inclusive value range (struct rc_action)."""

    lo: int
    hi: int

    def pack(self) -> bytes:
        return ACTION.pack(1, 0, self.lo, self.hi)


def default_bounds() -> dict[int, Bounds]:
    """The bounds of :func:`kernel_agent.actions.default_actions`, by action id."""
    b = {"read_ahead_kb": Bounds(0, 16384), "nr_requests": Bounds(4, 4096),
         "wbt_lat_usec": Bounds(0, 1_000_000), "scheduler": Bounds(0, len(SCHEDULERS) - 1),
         "throttle_read_bps": Bounds(0, 1 << 40), "throttle_write_bps": Bounds(0, 1 << 40),
         "throttle_read_iops": Bounds(0, 10_000_000),
         "throttle_write_iops": Bounds(0, 10_000_000),
         "demote_leg": Bounds(0, 15), "promote_leg": Bounds(0, 15)}
    return {ACTION_IDS[name]: bounds for name, bounds in b.items()}


@dataclass
class BucketState:
    """An extension's mutable state (struct rc_state)."""

    tokens: int = 0     # nano-tokens
    stamp_ns: int = 0
    kseq: int = 0
    primed: bool = False
    lost: int = 0

    def pack(self) -> bytes:
        return STATE.pack(self.tokens, self.stamp_ns, self.kseq, int(self.primed), 0, self.lost)

    @classmethod
    def unpack(cls, raw: bytes) -> BucketState:
        tokens, stamp, kseq, primed, _, lost = STATE.unpack(raw)
        return cls(tokens, stamp, kseq, bool(primed), lost)

    def refill(self, policy: ExtPolicy, now: int) -> None:
        """``min(burst, tokens + elapsed * rate)`` in nano-tokens; full at first use."""
        cap = policy.burst * TOKEN
        if not self.primed:
            self.primed, self.tokens, self.stamp_ns = True, cap, now
            return
        self.tokens = min(self.tokens, cap)
        if now <= self.stamp_ns:
            return
        self.tokens = min(cap, self.tokens + (now - self.stamp_ns) * policy.rate_per_s)
        self.stamp_ns = now


@dataclass
class RecoCheckModel:
    """The checker's maps and per-extension state, and the checks themselves.

    ``owners`` maps a slot to its extension id and policy (``rc_ext``),
    ``modes`` a device to its mode (``rc_modes``), ``leases`` a device to its
    holders as a mask of slots (``rc_leases``: bit ``i`` is slot ``i``),
    ``actions`` an action id to its bounds (``rc_actions``).
    """

    owners: dict[int, tuple[int, ExtPolicy]] = field(default_factory=dict)
    modes: dict[int, Mode] = field(default_factory=dict)
    leases: dict[int, int] = field(default_factory=dict)
    actions: dict[int, Bounds] = field(default_factory=default_bounds)
    states: dict[int, BucketState] = field(default_factory=dict)

    def check(self, slot: int, sample: bytes, now_ns: int) -> Verdict:
        """The verdict on one sample drained from ``slot``'s queue at ``now_ns``."""
        owner, policy = self.owners[slot]
        st = self.states.setdefault(slot, BucketState())
        whole = len(sample) == SUB.size
        rec = Submission.unpack(sample) if whole else EMPTY
        status, reason, holders = self._decide(slot, owner, policy, st, rec, whole, now_ns)
        st.kseq += 1
        return Verdict(st.kseq, now_ns, status, reason, owner, st.tokens // TOKEN, holders,
                       rec)

    def _decide(self, slot: int, owner: int, policy: ExtPolicy, st: BucketState,
                rec: Submission, whole: bool, now: int) -> tuple[Status, Reason, int]:
        def reject(reason: Reason, holders: int = 0) -> tuple[Status, Reason, int]:
            return Status.REJECTED, reason, holders

        st.refill(policy, now)
        if st.tokens < TOKEN:
            return reject(Reason.RATE)
        st.tokens -= TOKEN
        if not whole:
            return reject(Reason.MALFORMED)
        if rec.ext_id != owner:
            return reject(Reason.EXT)
        if rec.ttl_ms == 0 or rec.ttl_ms > policy.max_ttl_ms:
            return reject(Reason.TTL)
        if now > rec.created_ns and now - rec.created_ns > rec.ttl_ms * NS_PER_MS:
            return reject(Reason.EXPIRED)
        if rec.confidence > PERMILLE_ONE:
            return reject(Reason.CONF_HIGH)
        if rec.confidence < policy.floor_permille:
            return reject(Reason.CONF_LOW)
        mode = self.modes.get(rec.dev)
        if mode is None:
            return reject(Reason.DEVICE)
        holders = self.leases.get(rec.dev, 0)
        if not holders >> slot & 1:
            return reject(Reason.OWNER, holders)
        if mode is Mode.OBSERVE:
            return Status.OBSERVED, Reason.OBSERVE, holders
        bounds = self.actions.get(rec.action)
        if bounds is None:
            return reject(Reason.ACTION, holders)
        if not bounds.lo <= rec.value <= bounds.hi:
            return reject(Reason.BOUNDS, holders)
        if mode is Mode.RECOMMEND:
            return Status.RECOMMENDED, Reason.OK, holders
        return Status.APPLIED, Reason.OK, holders

    def reset(self, slot: int) -> None:
        """Forget ``slot``'s bucket and sequence (as the loader zeroes ``rc_state``)."""
        self.states.pop(slot, None)


__all__ = [
    "ACTION",
    "ACTION_IDS",
    "ARGS",
    "EMPTY",
    "EXT",
    "MAX_ACTIONS",
    "MAX_DEVS",
    "MAX_EXT",
    "MODE_IDS",
    "NS_PER_MS",
    "PERMILLE_ONE",
    "SCHEDULERS",
    "STATE",
    "SUB",
    "TOKEN",
    "U32",
    "U64",
    "VERDICT",
    "Bounds",
    "BucketState",
    "ExtPolicy",
    "Reason",
    "RecoCheckModel",
    "Submission",
    "Verdict",
    "default_bounds",
]
