"""The native targets: their I/O is served by the C engine, never by Python."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, TargetError
from ublk_driver.targets.base import Backend, Capabilities, CompletionPath


def _check_size(size: int, block_size: int) -> int:
    if size <= 0:
        raise ConfigError(f"device size must be positive, got {size}")
    if size % block_size:
        raise ConfigError(
            f"device size {size} is not a multiple of the block size ({block_size} bytes)"
        )
    return size


class NullTarget(Backend):
    """Completes every I/O at once and stores nothing (reads return junk)."""

    name = "null"
    paths = 1

    def __init__(self, size: int = 250 << 30) -> None:
        super().__init__()
        self._size = _check_size(size, 512)

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(flush=True, fua=True, discard=True, write_zeroes=True)

    def attach(self) -> _bindings.CTarget:
        return self._attached(_bindings.CTarget(_bindings.TGT_NULL, self._size))

    def completion_paths(self) -> list[CompletionPath]:
        return [CompletionPath(0, self.name, None, (),
                               "the null target stores nothing: its I/O reaches no drive")]


class MemTarget(Backend):
    """A RAM disk: anonymous memory, zero until written, gone when stopped."""

    name = "mem"
    paths = 1

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = _check_size(size, 512)

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(flush=True, fua=True, discard=True, write_zeroes=True,
                            discard_zeroes=True)

    def attach(self) -> _bindings.CTarget:
        try:
            return self._attached(_bindings.CTarget(_bindings.TGT_MEM, self._size))
        except OSError as e:
            raise TargetError(e.errno or errno.ENOMEM,
                              f"cannot reserve {self._size} bytes of memory: {e.strerror}"
                              ) from None

    def completion_paths(self) -> list[CompletionPath]:
        return [CompletionPath(0, self.name, None, (),
                               "the mem target keeps its data in the server's memory")]


@dataclass(frozen=True)
class Backing:
    """An opened backing file or block device (loop target, mirror leg)."""

    fd: int
    is_bdev: bool
    direct: bool        # O_DIRECT (False where the file system refused it)
    block_size: int     # the O_DIRECT alignment, at least 512
    size: int           # of the file or device, bytes
    dev_ino: tuple[int, int]  # to refuse the same backing twice


def open_backing(path: str, direct: bool, read_only: bool = False) -> Backing:
    """Open ``path`` for a native target: O_DIRECT where possible, else buffered."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        st = os.stat(path)
    except OSError as e:
        raise TargetError(e.errno or errno.ENOENT,
                          f"backing file {path}: {e.strerror}") from None
    is_bdev = stat.S_ISBLK(st.st_mode)
    if not (is_bdev or stat.S_ISREG(st.st_mode)):
        raise TargetError(errno.EINVAL,
                          f"backing file {path} is neither a regular file nor a block device")
    fd = -1
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise TargetError(e.errno or errno.EIO,
                                  f"backing file {path}: {e.strerror}") from None
    opened_direct = fd >= 0
    if fd < 0:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise TargetError(e.errno or errno.EIO,
                              f"backing file {path}: {e.strerror}") from None
    try:
        block = _bindings.dio_alignment(fd, is_bdev) if opened_direct else 512
        size = os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    return Backing(fd, is_bdev, opened_direct, max(512, block), size,
                   (st.st_rdev, 0) if is_bdev else (st.st_dev, st.st_ino))


class LoopTarget(Backend):
    """A file or block device, read and written with O_DIRECT through io_uring.

    Where the file system refuses O_DIRECT the target falls back to buffered
    I/O and says so in ``describe()``; FLUSH and FUA still reach stable
    storage (fdatasync, RWF_DSYNC).
    """

    name = "loop"
    paths = 1

    def __init__(self, path: str, size: int | None = None, direct: bool = True,
                 read_only: bool = False) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        b = open_backing(path, direct, read_only)
        self._fd = b.fd
        self.is_bdev = b.is_bdev
        self.direct = b.direct
        self._block_size = b.block_size
        try:
            if size is None:
                size = b.size - b.size % self._block_size
            elif size > b.size:
                raise ConfigError(f"--size {size} is larger than the backing file {path} "
                                  f"({b.size} bytes)")
            self._size = _check_size(size, self._block_size)
        except BaseException:
            os.close(b.fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=self.read_only, flush=True, fua=True,
                            discard=not self.read_only, write_zeroes=not self.read_only,
                            discard_zeroes=not self.is_bdev)

    def attach(self) -> _bindings.CTarget:
        return self._attached(_bindings.CTarget(_bindings.TGT_LOOP, self._size, fd=self._fd,
                                                is_bdev=self.is_bdev))

    def describe(self) -> dict[str, object]:
        return {"target": self.name, "size": self.size, "backing": self.path,
                "direct_io": self.direct}

    def completion_paths(self) -> list[CompletionPath]:
        """Path 0: the backing file, or block device, and the drives under it."""
        return [CompletionPath.resolved(0, self.name, self.path, self._fd)]

    def close(self) -> None:
        if self._fd >= 0:
            try:
                if not self.read_only:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
