"""An extension's side of the eBPF checker: its pinned submission queue.

When the agent runs the eBPF checker (``agent.json``: ``"checker": "ebpf"``),
it gives every registered extension a submission queue (a
``BPF_MAP_TYPE_USER_RINGBUF``) pinned as ``<pin dir>/rc_sub_<id>``
(:meth:`kernel_agent.recocheck.RecoCheck.add_extension`).  :class:`KernelQueue`
opens it with ``bpf_obj_get`` and writes 48-byte records
(:class:`kernel_agent.recocheck_model.Submission`): action names become ids,
the confidence permille, ``created_ns`` CLOCK_MONOTONIC, the device its
``dev_t``.  The kernel's program ``rc_check`` judges them; the agent reads the
verdicts, does what the kernel cannot (whether the device offers a
scheduler, applying, the effect check) and answers on the extension's
completion ring, the same ring file the Python path uses: the extension
reads its verdicts, with the kernel's reason, from :meth:`completions`.

Which path an extension uses is decided in one place,
:func:`kernel_agent.link.open_submitter`.
"""

from __future__ import annotations

import math
import os
import re
import time
import zlib
from dataclasses import replace
from pathlib import Path

from kernel_agent import _libbpf
from kernel_agent.accounting import resolve_device
from kernel_agent.errors import AgentError, UnknownDeviceError
from kernel_agent.recocheck_model import ACTION_IDS, PERMILLE_ONE, SCHEDULERS, Submission
from kernel_agent.ring import WAKE_NAME, Channel, Completion, Recommendation, Waker

__all__ = ["UNENCODABLE", "KernelQueue", "encode", "model_id"]

U32_MAX = (1 << 32) - 1
#: The value sent for a text the record cannot carry (not an integer, a
#: scheduler the kernel has no index for): no action allows it, so the kernel
#: refuses it as out of bounds.
UNENCODABLE = -(1 << 63)


_INTEGER = re.compile(r"-?[0-9]{1,18}")  # fits an s64, as the record's value


def model_id(model: str) -> int:
    """A model's name as the record's ``u32 model`` (CRC-32: the record has no strings)."""
    return zlib.crc32(model.encode())


def _permille(confidence: float) -> int:
    if math.isnan(confidence) or confidence * PERMILLE_ONE >= U32_MAX:
        return U32_MAX  # refused as above 1, as the validator refuses NaN
    return round(confidence * PERMILLE_ONE) if confidence > 0 else 0


def _value(action: str, text: str) -> int:
    v = text.strip()
    if action == "scheduler":
        return SCHEDULERS.index(v) if v in SCHEDULERS else UNENCODABLE
    if not _INTEGER.fullmatch(v):
        return UNENCODABLE
    return int(v)


def encode(rec: Recommendation, dev: int, created_ns: int) -> Submission:
    """``rec`` as the kernel reads it (an unknown action becomes id 0: never allowed)."""
    return Submission(ext_id=rec.ext_id & U32_MAX, dev=dev & U32_MAX,
                      action=ACTION_IDS.get(rec.action, 0), value=_value(rec.action, rec.value),
                      confidence=_permille(rec.confidence),
                      ttl_ms=max(0, min(U32_MAX, rec.ttl_ms)),
                      created_ns=created_ns & ((1 << 64) - 1), seq=rec.seq & U32_MAX,
                      model=model_id(rec.model))


class KernelQueue:
    """Submit through the pinned ``rc_sub_<id>``; answers come on ``ring``.

    Same methods as :class:`kernel_agent.ring.Channel`'s extension side, so a
    caller does not care which path it was given.
    """

    def __init__(self, ring: Channel, pin: str | os.PathLike[str]) -> None:
        self.ring = ring
        self.ext_id = ring.ext_id
        self.pin = str(pin)
        self._fd = _libbpf.obj_get(self.pin)
        try:
            self._producer = _libbpf.UserRingBuffer(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._waker = Waker(Path(ring.path).parent.parent / WAKE_NAME)
        self._devs: dict[str, int] = {}

    def _dev(self, name: str) -> int:
        dev = self._devs.get(name)
        if dev is None:
            try:
                dev = resolve_device(name).dev
            except UnknownDeviceError:
                dev = 0  # no such device: the kernel refuses it as not watched
            else:
                self._devs[name] = dev
        return dev

    def submit(self, rec: Recommendation) -> Recommendation | None:
        """Queue ``rec`` (seq and ext_id filled in); None when the queue is full."""
        created = time.monotonic_ns()
        rec = replace(rec, seq=self.ring.next_seq(), ext_id=self.ext_id,
                      created_ns=rec.created_ns or time.time_ns())
        try:
            self._producer.submit(encode(rec, self._dev(rec.device), created).pack())
        except _libbpf.LibbpfError as e:
            if e.errno == 28:  # ENOSPC: the agent is not draining
                return None
            raise AgentError(f"the eBPF submission queue {self.pin} refused a record: {e}"
                             ) from None
        self._waker.poke()
        return rec

    def completions(self) -> list[Completion]:
        return self.ring.completions()

    def release(self) -> None:
        """Let go of the queue, keeping :attr:`ring` open (the path is changing)."""
        self._waker.close()
        if self._fd >= 0:
            self._producer.free()
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self.release()
        self.ring.close()
