"""Coverage-guided fuzz targets (atheris, libFuzzer) for the parsers of hostile input.

Run one: ``python -m tests.fuzz.atheris_targets TARGET [libFuzzer flags]``, e.g.
``-runs=100000`` or ``-max_total_time=600`` for a long session.  Each target
accepts only the documented error for bad input; anything else (another
exception, a crash) is a finding: libFuzzer stops, writes ``crash-*`` with the
input and exits non-zero.  tests/fuzz/test_atheris.py runs every target for a
short, fixed number of runs in CI; the hypothesis tests next to each module
stay the main tests.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import zlib
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from kernel_agent.ring import (
        RECORD_SIZE,
        SUB_CRC_OFFSET,
        MalformedRecord,
        decode_completion,
        decode_submission,
        encode_submission,
    )
    from ublk_driver.admin.protocol import BadRequest, parse_request
    from ublk_driver.core.errors import ConfigError
    from ublk_driver.core.sizes import parse_size
    from ublk_driver.faults import FaultSpec


def _with_crc(data: bytes, crc_offset: int) -> bytes:
    """Pad/cut to a record and fix its checksum, so that the fuzzer gets past
    the CRC and into the field checks (a random record never has a good one)."""
    raw = (data + bytes(RECORD_SIZE))[:RECORD_SIZE]
    crc = zlib.crc32(raw[:crc_offset] + b"\0\0\0\0" + raw[crc_offset + 4:])
    return raw[:crc_offset] + struct.pack("<I", crc) + raw[crc_offset + 4:]


def ring_record(data: bytes) -> None:
    """The agent's submission ring: a record decodes, or is MalformedRecord."""
    raw = _with_crc(data, SUB_CRC_OFFSET) if data[:1] != b"\xff" else data
    try:
        rec = decode_submission(raw)
    except MalformedRecord:
        return
    # What decodes is what an honest extension could have sent.
    assert decode_submission(encode_submission(rec)) == rec
    with contextlib.suppress(MalformedRecord):
        decode_completion(raw)


def ctl_request(data: bytes) -> None:
    """A control-channel line: (op, fields) or BadRequest; a fault spec in it
    becomes a FaultSpec or a ConfigError."""
    try:
        op, fields = parse_request(data)
    except BadRequest:
        return
    if op == "fault_set":
        with contextlib.suppress(ConfigError):
            FaultSpec.from_dict(fields["spec"])


def fault_text(data: bytes) -> None:
    """`--fault SPEC` and `ublkml fault set SPEC`: FaultSpec or ConfigError."""
    text = data.decode("utf-8", "replace")
    try:
        spec = FaultSpec.parse(text)
    except ConfigError:
        return
    assert FaultSpec.parse(str(spec)) == spec  # what parses prints back the same


def size_text(data: bytes) -> None:
    """`--size`, `--max-io`: an int >= 0 or ValueError."""
    try:
        n = parse_size(data.decode("utf-8", "replace"))
    except ValueError:
        return
    assert isinstance(n, int) and n >= 0


TARGETS: dict[str, Callable[[bytes], None]] = {
    "ring_record": ring_record,
    "ctl_request": ctl_request,
    "fault_text": fault_text,
    "size_text": size_text,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.atheris_targets {{{','.join(TARGETS)}}} "
                 "[libFuzzer flags]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
