"""A reference model of a block device, and random operation sequences for it.

The model is a bytearray plus a set of sectors whose content is undefined
(discarded on a target that does not promise zeros).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from ublk_driver.uapi import Op

SECTOR = 512


@dataclass
class Model:
    size: int
    discard_zeroes: bool
    data: bytearray = field(init=False)
    undefined: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)

    def apply(self, op: int, offset: int, payload: bytes) -> None:
        n = len(payload)
        if op == Op.WRITE:
            self.data[offset:offset + n] = payload
            self.undefined -= set(range(offset // SECTOR, (offset + n) // SECTOR))

    def zero(self, offset: int, length: int, *, is_discard: bool) -> None:
        sectors = set(range(offset // SECTOR, (offset + length) // SECTOR))
        self.data[offset:offset + length] = bytes(length)
        if is_discard and not self.discard_zeroes:
            self.undefined |= sectors
        else:
            self.undefined -= sectors

    def check(self, offset: int, got: bytes) -> None:
        for i in range(0, len(got), SECTOR):
            sector = (offset + i) // SECTOR
            if sector in self.undefined:
                continue
            want = self.data[offset + i:offset + i + SECTOR]
            assert got[i:i + SECTOR] == want, f"sector {sector} differs"


@st.composite
def operations(draw: st.DrawFn, size: int, max_len: int) -> list[tuple[int, int, int, int]]:
    """(op, offset, length, seed) tuples, sector-aligned, inside the device."""
    ops = []
    n = draw(st.integers(1, 25))
    sectors = size // SECTOR
    for _ in range(n):
        op = draw(st.sampled_from([Op.READ, Op.WRITE, Op.WRITE, Op.FLUSH, Op.DISCARD,
                                   Op.WRITE_ZEROES]))
        length_s = draw(st.integers(1, max(1, min(max_len // SECTOR, sectors))))
        start = draw(st.integers(0, sectors - length_s))
        ops.append((int(op), start * SECTOR, length_s * SECTOR, draw(st.integers(0, 255))))
    return ops


def payload(seed: int, offset: int, length: int) -> bytes:
    """Distinct, position-dependent content so misplaced writes show."""
    base = bytes((seed + offset // SECTOR + i) & 0xFF for i in range(256))
    return (base * (length // 256 + 1))[:length]
