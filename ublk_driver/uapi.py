"""The ublk UAPI in Python: opcodes, flags, and the structures as bytes.

Encoding and decoding are pure Python (``struct``), so they can be property
tested without a kernel; ``tests/ublk_driver/test_uapi.py`` checks these
layouts against the C declarations compiled into the extension.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

# ---- ioctl encoding (asm-generic/ioctl.h) ---------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_WRITE, IOC_READ = 1, 2


def ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)`` as the kernel computes it."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(type_) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def ior(nr: int, size: int) -> int:
    return ioc(IOC_READ, "u", nr, size)


def iowr(nr: int, size: int) -> int:
    return ioc(IOC_READ | IOC_WRITE, "u", nr, size)


# ---- sizes ----------------------------------------------------------------

CTRL_CMD_SIZE = 32
DEV_INFO_SIZE = 64
IO_DESC_SIZE = 24
IO_CMD_SIZE = 16
PARAMS_SIZE = 112  # basic + discard + devt + zoned, as of Linux 6.12
MAX_QUEUE_DEPTH = 4096
MAX_NR_QUEUES = 4096
SECTOR_SHIFT = 9
DEV_ID_AUTO = 0xFFFFFFFF
QUEUE_ID_NONE = 0xFFFF


class Cmd(enum.IntEnum):
    """Control command numbers (the legacy opcode, and the ioctl ``nr``)."""

    GET_QUEUE_AFFINITY = 0x01
    GET_DEV_INFO = 0x02
    ADD_DEV = 0x04
    DEL_DEV = 0x05
    START_DEV = 0x06
    STOP_DEV = 0x07
    SET_PARAMS = 0x08
    GET_PARAMS = 0x09
    START_USER_RECOVERY = 0x10
    END_USER_RECOVERY = 0x11
    GET_DEV_INFO2 = 0x12
    GET_FEATURES = 0x13
    DEL_DEV_ASYNC = 0x14


# Which control commands the kernel encodes with _IOR rather than _IOWR.
_IOR_CMDS = frozenset(
    {Cmd.GET_QUEUE_AFFINITY, Cmd.GET_DEV_INFO, Cmd.GET_PARAMS, Cmd.GET_DEV_INFO2,
     Cmd.GET_FEATURES, Cmd.DEL_DEV_ASYNC}
)


def ctrl_opcode(cmd: Cmd, ioctl_encode: bool) -> int:
    """The ``sqe->cmd_op`` for a control command."""
    if not ioctl_encode:
        return int(cmd)
    return ior(cmd, CTRL_CMD_SIZE) if cmd in _IOR_CMDS else iowr(cmd, CTRL_CMD_SIZE)


class IoCmd(enum.IntEnum):
    FETCH_REQ = 0x20
    COMMIT_AND_FETCH_REQ = 0x21
    NEED_GET_DATA = 0x22


def io_opcode(cmd: IoCmd, ioctl_encode: bool) -> int:
    return iowr(cmd, IO_CMD_SIZE) if ioctl_encode else int(cmd)


class Op(enum.IntEnum):
    """I/O operations (bits 0-7 of ``op_flags``)."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_SAME = 4
    WRITE_ZEROES = 5
    ZONE_OPEN = 10
    ZONE_CLOSE = 11
    ZONE_FINISH = 12
    ZONE_APPEND = 13
    ZONE_RESET_ALL = 14
    ZONE_RESET = 15
    REPORT_ZONES = 18


class IoFlag(enum.IntFlag):
    FAILFAST_DEV = 1 << 8
    FAILFAST_TRANSPORT = 1 << 9
    FAILFAST_DRIVER = 1 << 10
    META = 1 << 11
    FUA = 1 << 13
    NOUNMAP = 1 << 15
    SWAP = 1 << 16


class Feature(enum.IntFlag):
    """Device flags / features (``GET_FEATURES``, ``dev_info.flags``)."""

    SUPPORT_ZERO_COPY = 1 << 0
    URING_CMD_COMP_IN_TASK = 1 << 1
    NEED_GET_DATA = 1 << 2
    USER_RECOVERY = 1 << 3
    USER_RECOVERY_REISSUE = 1 << 4
    UNPRIVILEGED_DEV = 1 << 5
    CMD_IOCTL_ENCODE = 1 << 6
    USER_COPY = 1 << 7
    ZONED = 1 << 8
    USER_RECOVERY_FAIL_IO = 1 << 9
    UPDATE_SIZE = 1 << 10
    AUTO_BUF_REG = 1 << 11
    QUIESCE = 1 << 12
    PER_IO_DAEMON = 1 << 13


def feature_names(flags: int) -> list[str]:
    """Names of the known bits in ``flags``, then ``BIT_n`` for unknown ones."""
    names = [f.name for f in Feature if f.name and flags & f]
    known = 0
    for f in Feature:
        known |= int(f)  # plain ints: ~ of an IntFlag only spans its own members
    names += [f"BIT_{i}" for i in range(64) if flags & ~known & (1 << i)]
    return names


class DevState(enum.IntEnum):
    DEAD = 0
    LIVE = 1
    QUIESCED = 2
    FAIL_IO = 3


class ParamType(enum.IntFlag):
    BASIC = 1 << 0
    DISCARD = 1 << 1
    DEVT = 1 << 2
    ZONED = 1 << 3


class Attr(enum.IntFlag):
    READ_ONLY = 1 << 0
    ROTATIONAL = 1 << 1
    VOLATILE_CACHE = 1 << 2
    FUA = 1 << 3


# ---- structures -----------------------------------------------------------

_DEV_INFO = struct.Struct("<HHHHIIiIQQIIQQ")
_IO_DESC = struct.Struct("<IIQQ")
_IO_CMD = struct.Struct("<HHiQ")
_CTRL_CMD = struct.Struct("<IHHQQHHI")
_PARAMS_HEAD = struct.Struct("<II")
_BASIC = struct.Struct("<IBBBBIIQQ")
_DISCARD = struct.Struct("<IIIIHH")
_DEVT = struct.Struct("<IIII")
_ZONED = struct.Struct("<III20s")
_OFF_BASIC, _OFF_DISCARD, _OFF_DEVT, _OFF_ZONED = 8, 40, 60, 76


@dataclass(frozen=True)
class IoDesc:
    """One request as the driver describes it in the mmapped array."""

    op_flags: int
    nr_sectors: int
    start_sector: int
    addr: int = 0

    @property
    def op(self) -> int:
        return self.op_flags & 0xFF

    @property
    def flags(self) -> IoFlag:
        return IoFlag(self.op_flags & ~0xFF & 0x1FF00)

    @property
    def offset(self) -> int:
        return self.start_sector << SECTOR_SHIFT

    @property
    def length(self) -> int:
        return self.nr_sectors << SECTOR_SHIFT

    @classmethod
    def unpack(cls, data: bytes) -> IoDesc:
        return cls(*_IO_DESC.unpack(data))

    def pack(self) -> bytes:
        return _IO_DESC.pack(self.op_flags, self.nr_sectors, self.start_sector, self.addr)


@dataclass(frozen=True)
class IoCmdPayload:
    q_id: int
    tag: int
    result: int
    addr: int

    @classmethod
    def unpack(cls, data: bytes) -> IoCmdPayload:
        return cls(*_IO_CMD.unpack(data))

    def pack(self) -> bytes:
        return _IO_CMD.pack(self.q_id, self.tag, self.result, self.addr)


@dataclass(frozen=True)
class CtrlCmd:
    dev_id: int
    queue_id: int = QUEUE_ID_NONE
    len: int = 0
    addr: int = 0
    data0: int = 0
    dev_path_len: int = 0

    def pack(self) -> bytes:
        return _CTRL_CMD.pack(self.dev_id, self.queue_id, self.len, self.addr, self.data0,
                              self.dev_path_len, 0, 0)

    @classmethod
    def unpack(cls, data: bytes) -> CtrlCmd:
        d, q, ln, a, d0, dpl, _pad, _res = _CTRL_CMD.unpack(data)
        return cls(d, q, ln, a, d0, dpl)


@dataclass(frozen=True)
class DevInfo:
    """``struct ublksrv_ctrl_dev_info``."""

    nr_hw_queues: int = 1
    queue_depth: int = 128
    state: int = 0
    max_io_buf_bytes: int = 512 * 1024
    dev_id: int = DEV_ID_AUTO
    ublksrv_pid: int = 0
    flags: int = 0
    ublksrv_flags: int = 0
    owner_uid: int = 0
    owner_gid: int = 0

    def pack(self) -> bytes:
        return _DEV_INFO.pack(
            self.nr_hw_queues, self.queue_depth, self.state, 0, self.max_io_buf_bytes,
            self.dev_id, self.ublksrv_pid, 0, self.flags, self.ublksrv_flags,
            self.owner_uid, self.owner_gid, 0, 0,
        )

    @classmethod
    def unpack(cls, data: bytes) -> DevInfo:
        (nq, qd, st, _p0, mib, dev_id, pid, _p1, flags, sflags, uid, gid, _r1, _r2) = (
            _DEV_INFO.unpack(data[:DEV_INFO_SIZE])
        )
        return cls(nq, qd, st, mib, dev_id, pid, flags, sflags, uid, gid)

    @property
    def state_name(self) -> str:
        try:
            return DevState(self.state).name
        except ValueError:
            return f"STATE_{self.state}"


@dataclass(frozen=True)
class ParamBasic:
    attrs: int = 0
    logical_bs_shift: int = 9
    physical_bs_shift: int = 12
    io_opt_shift: int = 12
    io_min_shift: int = 9
    max_sectors: int = 1024
    chunk_sectors: int = 0
    dev_sectors: int = 0
    virt_boundary_mask: int = 0


@dataclass(frozen=True)
class ParamDiscard:
    discard_alignment: int = 0
    discard_granularity: int = 4096
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0
    max_discard_segments: int = 1


@dataclass(frozen=True)
class ParamDevt:
    char_major: int = 0
    char_minor: int = 0
    disk_major: int = 0
    disk_minor: int = 0


@dataclass(frozen=True)
class Params:
    """``struct ublk_params``; ``types`` says which parts the kernel reads."""

    types: int = ParamType.BASIC
    basic: ParamBasic = field(default_factory=ParamBasic)
    discard: ParamDiscard = field(default_factory=ParamDiscard)
    devt: ParamDevt = field(default_factory=ParamDevt)

    def pack(self) -> bytes:
        b, d, t = self.basic, self.discard, self.devt
        out = bytearray(PARAMS_SIZE)
        _PARAMS_HEAD.pack_into(out, 0, PARAMS_SIZE, self.types)
        _BASIC.pack_into(out, _OFF_BASIC, b.attrs, b.logical_bs_shift, b.physical_bs_shift,
                         b.io_opt_shift, b.io_min_shift, b.max_sectors, b.chunk_sectors,
                         b.dev_sectors, b.virt_boundary_mask)
        _DISCARD.pack_into(out, _OFF_DISCARD, d.discard_alignment, d.discard_granularity,
                           d.max_discard_sectors, d.max_write_zeroes_sectors,
                           d.max_discard_segments, 0)
        _DEVT.pack_into(out, _OFF_DEVT, t.char_major, t.char_minor, t.disk_major, t.disk_minor)
        return bytes(out)

    @classmethod
    def unpack(cls, data: bytes) -> Params:
        _len, types = _PARAMS_HEAD.unpack_from(data, 0)
        basic = ParamBasic(*_BASIC.unpack_from(data, _OFF_BASIC))
        da, dg, mds, mwz, mseg, _r = _DISCARD.unpack_from(data, _OFF_DISCARD)
        devt = ParamDevt(*_DEVT.unpack_from(data, _OFF_DEVT))
        return cls(types, basic, ParamDiscard(da, dg, mds, mwz, mseg), devt)

    @property
    def size_bytes(self) -> int:
        return self.basic.dev_sectors << SECTOR_SHIFT

    @property
    def logical_block_size(self) -> int:
        return 1 << self.basic.logical_bs_shift
