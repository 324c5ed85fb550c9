"""The UAPI: struct layouts and opcodes agree with the C declarations and the kernel's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ublk_driver import _bindings, uapi

# Sizes and offsets from include/uapi/linux/ublk_cmd.h (Linux 6.12), as
# measured with a C compiler (docs/ublk-uapi.md).
LAYOUT = {
    "struct ublksrv_ctrl_cmd": (32, {"dev_id": 0, "queue_id": 4, "len": 6, "addr": 8,
                                     "data": 16, "dev_path_len": 24}),
    "struct ublksrv_ctrl_dev_info": (64, {"nr_hw_queues": 0, "queue_depth": 2, "state": 4,
                                          "max_io_buf_bytes": 8, "dev_id": 12,
                                          "ublksrv_pid": 16, "flags": 24,
                                          "ublksrv_flags": 32, "owner_uid": 40,
                                          "owner_gid": 44}),
    "struct ublksrv_io_desc": (24, {"op_flags": 0, "nr_sectors": 4, "start_sector": 8,
                                    "addr": 16}),
    "struct ublksrv_io_cmd": (16, {"q_id": 0, "tag": 2, "result": 4, "addr": 8}),
    "struct ublk_param_basic": (32, {"attrs": 0, "logical_bs_shift": 4, "max_sectors": 8,
                                     "chunk_sectors": 12, "dev_sectors": 16,
                                     "virt_boundary_mask": 24}),
    "struct ublk_param_discard": (20, {"discard_granularity": 4, "max_discard_sectors": 8,
                                       "max_write_zeroes_sectors": 12,
                                       "max_discard_segments": 16}),
    "struct ublk_params": (112, {"len": 0, "types": 4, "basic": 8, "discard": 40,
                                 "devt": 60, "zoned": 76}),
    # zoned sits at 76 (all its members are u32); the 4 bytes of padding are at
    # the end (108..112), not before zoned.
}


@pytest.mark.parametrize("ctype", sorted(LAYOUT))
def test_struct_layout_matches_kernel(ctype: str) -> None:
    size, offsets = LAYOUT[ctype]
    assert _bindings.sizeof(ctype) == size
    for name, off in offsets.items():
        assert _bindings.offsetof(ctype, name) == off, name


def test_python_struct_sizes_match_c() -> None:
    assert len(uapi.DevInfo().pack()) == _bindings.sizeof("struct ublksrv_ctrl_dev_info")
    assert len(uapi.Params().pack()) == _bindings.sizeof("struct ublk_params")
    assert len(uapi.IoDesc(0, 0, 0).pack()) == _bindings.sizeof("struct ublksrv_io_desc")
    assert len(uapi.CtrlCmd(0).pack()) == _bindings.sizeof("struct ublksrv_ctrl_cmd")
    assert len(uapi.IoCmdPayload(0, 0, 0, 0).pack()) == _bindings.sizeof(
        "struct ublksrv_io_cmd")


# Values as the kernel header encodes them (checked against a C build).
KNOWN_OPCODES = {
    uapi.Cmd.ADD_DEV: 0xC0207504,
    uapi.Cmd.DEL_DEV: 0xC0207505,
    uapi.Cmd.START_DEV: 0xC0207506,
    uapi.Cmd.STOP_DEV: 0xC0207507,
    uapi.Cmd.SET_PARAMS: 0xC0207508,
    uapi.Cmd.GET_DEV_INFO: 0x80207502,
    uapi.Cmd.GET_PARAMS: 0x80207509,
    uapi.Cmd.GET_FEATURES: 0x80207513,
}


@pytest.mark.parametrize("cmd", list(KNOWN_OPCODES))
def test_ioctl_encoded_control_opcodes(cmd: uapi.Cmd) -> None:
    assert uapi.ctrl_opcode(cmd, True) == KNOWN_OPCODES[cmd]
    assert uapi.ctrl_opcode(cmd, False) == int(cmd)


@pytest.mark.parametrize("cmd", list(uapi.Cmd))
def test_python_opcodes_match_c_macros(cmd: uapi.Cmd) -> None:
    assert uapi.ctrl_opcode(cmd, True) == _bindings.c_constant(f"UBLK_U_CMD_{cmd.name}")
    assert uapi.ctrl_opcode(cmd, False) == _bindings.c_constant(f"UBLK_CMD_{cmd.name}")


@pytest.mark.parametrize("cmd", list(uapi.IoCmd))
def test_io_opcodes(cmd: uapi.IoCmd) -> None:
    assert uapi.io_opcode(cmd, True) == _bindings.c_constant(f"UBLK_U_IO_{cmd.name}")
    assert uapi.io_opcode(cmd, False) == _bindings.c_constant(f"UBLK_IO_{cmd.name}")
    assert uapi.io_opcode(uapi.IoCmd.FETCH_REQ, True) == 0xC0107520


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
u64 = st.integers(0, (1 << 64) - 1)


@given(u32, u32, u64, u64)
def test_io_desc_roundtrip(op_flags: int, nr: int, start: int, addr: int) -> None:
    d = uapi.IoDesc(op_flags, nr, start, addr)
    raw = d.pack()
    assert len(raw) == 24
    back = uapi.IoDesc.unpack(raw)
    assert back == d
    assert back.op == op_flags & 0xFF
    assert back.offset == start << 9
    assert back.length == nr << 9
    assert (uapi.IoFlag.FUA in back.flags) == bool(op_flags & (1 << 13))


@given(st.binary(min_size=24, max_size=24))
def test_io_desc_decodes_any_bytes(raw: bytes) -> None:
    d = uapi.IoDesc.unpack(raw)
    assert d.pack() == raw
    assert d.op_flags == int.from_bytes(raw[0:4], "little")
    assert d.nr_sectors == int.from_bytes(raw[4:8], "little")
    assert d.start_sector == int.from_bytes(raw[8:16], "little")


@given(u16, u16, u16, u32, u32, s32, u64, u64, u32, u32)
def test_dev_info_roundtrip(nq: int, qd: int, state: int, mib: int, dev_id: int, pid: int,
                            flags: int, sflags: int, uid: int, gid: int) -> None:
    info = uapi.DevInfo(nq, qd, state, mib, dev_id, pid, flags, sflags, uid, gid)
    raw = info.pack()
    assert len(raw) == 64
    assert uapi.DevInfo.unpack(raw) == info
    assert int.from_bytes(raw[12:16], "little") == dev_id
    assert int.from_bytes(raw[24:32], "little") == flags


@given(u32, u8, u8, u8, u8, u32, u32, u64, u64, u32, u32, u32, u32, u16)
def test_params_roundtrip(attrs: int, lbs: int, pbs: int, opt: int, mn: int, maxs: int,
                          chunk: int, sectors: int, vbm: int, da: int, dg: int, mds: int,
                          mwz: int, seg: int) -> None:
    p = uapi.Params(
        types=int(uapi.ParamType.BASIC | uapi.ParamType.DISCARD),
        basic=uapi.ParamBasic(attrs, lbs, pbs, opt, mn, maxs, chunk, sectors, vbm),
        discard=uapi.ParamDiscard(da, dg, mds, mwz, seg),
    )
    raw = p.pack()
    assert len(raw) == 112
    assert int.from_bytes(raw[0:4], "little") == 112
    assert int.from_bytes(raw[24:32], "little") == sectors  # basic.dev_sectors @ 8+16
    assert uapi.Params.unpack(raw) == p


@given(u32, u16, u16, u64, u64)
def test_ctrl_cmd_roundtrip(dev_id: int, q: int, ln: int, addr: int, data0: int) -> None:
    c = uapi.CtrlCmd(dev_id, q, ln, addr, data0)
    assert uapi.CtrlCmd.unpack(c.pack()) == c


@given(u64)
def test_feature_names_cover_every_bit(flags: int) -> None:
    names = uapi.feature_names(flags)
    assert len(names) == bin(flags).count("1")
