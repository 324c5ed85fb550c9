"""Native targets (mem, loop, null) against a reference model.

The engine runs here as a *harness* queue: the one fake is the kernel's ublk
driver, whose descriptors are written by ``inject`` instead of the kernel;
the target code, the io_uring and (for loop) the backing file are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.ublk_driver.targets.model import Model, operations, payload
from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, TargetError
from ublk_driver.queue import default_ring_flags
from ublk_driver.targets import LoopTarget, MemTarget, NullTarget
from ublk_driver.targets.base import Backend
from ublk_driver.uapi import IoFlag, Op

SIZE = 1 << 20
BUF = 128 << 10
DEPTH = 4


def run_ops(backend: Backend, ops: list[tuple[int, int, int, int]]) -> None:
    ct = backend.attach()
    q = _bindings.Queue(ct, -1, 0, DEPTH, BUF, True, default_ring_flags())
    batch = _bindings.EventBatch(DEPTH)
    model = Model(backend.size, backend.capabilities.discard_zeroes)
    try:
        for op, off, length, seed in ops:
            if op in (Op.READ, Op.WRITE):
                length = min(length, BUF)
            buf = q.buffer(0)
            flags = 0
            if op == Op.WRITE:
                data = payload(seed, off, length)
                buf[:length] = data
                model.apply(op, off, data)
                flags = IoFlag.FUA if seed & 1 else 0
            q.inject(0, op | flags, off // 512, length // 512 if op != Op.FLUSH else 0)
            res = q.harvest(batch)
            assert len(res) == 1 and res[0][0] == 0
            result = res[0][1]
            if op in (Op.READ, Op.WRITE):
                assert result == length, (Op(op).name, off, length, result)
            else:
                assert result == 0, (Op(op).name, result)
            if op == Op.READ:
                model.check(off, bytes(buf[:length]))
            elif op in (Op.DISCARD, Op.WRITE_ZEROES):
                model.zero(off, length, is_discard=op == Op.DISCARD)
        # Finally read everything back.
        for off in range(0, backend.size, BUF):
            q.inject(1, Op.READ, off // 512, BUF // 512)
            assert q.harvest(batch) == [(1, BUF)]
            model.check(off, bytes(q.buffer(1)[:BUF]))
    finally:
        q.free()
        ct.free()


@settings(max_examples=60, deadline=None)
@given(operations(SIZE, BUF * 2))
def test_mem_target_matches_model(ops: list[tuple[int, int, int, int]]) -> None:
    backend = MemTarget(SIZE)
    run_ops(backend, ops)


@pytest.fixture
def backing_file(tmp_path: Path) -> Path:
    p = tmp_path / "backing.img"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations(SIZE, BUF * 2))
def test_loop_target_matches_model(backing_file: Path,
                                   ops: list[tuple[int, int, int, int]]) -> None:
    with open(backing_file, "r+b") as f:
        f.truncate(0)
        f.truncate(SIZE)
    backend = LoopTarget(str(backing_file))
    try:
        run_ops(backend, ops)
    finally:
        backend.close()


def test_loop_target_reaches_the_file(backing_file: Path) -> None:
    backend = LoopTarget(str(backing_file))
    ct = backend.attach()
    q = _bindings.Queue(ct, -1, 0, 2, BUF, True, default_ring_flags())
    batch = _bindings.EventBatch(2)
    try:
        q.buffer(0)[:4096] = b"\xab" * 4096
        q.inject(0, Op.WRITE | IoFlag.FUA, 8, 8)
        assert q.harvest(batch) == [(0, 4096)]
    finally:
        q.free()
        ct.free()
        backend.close()
    assert backing_file.read_bytes()[4096:8192] == b"\xab" * 4096


def test_null_target_completes_everything() -> None:
    backend = NullTarget(SIZE)
    ct = backend.attach()
    q = _bindings.Queue(ct, -1, 0, 2, BUF, True, default_ring_flags())
    batch = _bindings.EventBatch(2)
    try:
        for op, n in ((Op.READ, 8), (Op.WRITE, 16), (Op.FLUSH, 0), (Op.DISCARD, 8)):
            q.inject(0, op, 0, n)
            want = n * 512 if op in (Op.READ, Op.WRITE) else 0
            assert q.harvest(batch) == [(0, want)]
        stats = q.stats()
        assert stats.ops[Op.READ] == 1 and stats.ops[Op.WRITE] == 1
        assert stats.bytes[Op.WRITE] == 16 * 512
    finally:
        q.free()
        ct.free()


def test_io_beyond_the_end_fails_with_eio() -> None:
    backend = MemTarget(SIZE)
    ct = backend.attach()
    q = _bindings.Queue(ct, -1, 0, 2, BUF, True, default_ring_flags())
    batch = _bindings.EventBatch(2)
    try:
        q.inject(0, Op.READ, SIZE // 512 - 4, 8)
        assert q.harvest(batch) == [(0, -5)]
    finally:
        q.free()
        ct.free()


def test_loop_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"backing file .*: No such file"):
        LoopTarget(str(tmp_path / "absent.img"))


def test_loop_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "locked.img"
    p.write_bytes(bytes(4096))
    p.chmod(0)
    if os.geteuid() == 0:
        # root ignores file modes; a directory is unopenable for everyone.
        p = tmp_path
    with pytest.raises(TargetError):
        LoopTarget(str(p))


def test_loop_size_larger_than_file(backing_file: Path) -> None:
    with pytest.raises(ConfigError, match="larger than the backing file"):
        LoopTarget(str(backing_file), size=SIZE * 2)


def test_sizes_must_be_block_multiples() -> None:
    with pytest.raises(ConfigError, match="not a multiple of the block size"):
        MemTarget(1000)
    with pytest.raises(ConfigError, match="positive"):
        NullTarget(0)
