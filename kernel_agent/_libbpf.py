"""Typed bindings to the system's ``libbpf.so.1`` (ctypes, ABI mode).

The only module of the agent that touches ``ctypes``.  It keeps libbpf's
names (``bpf_object__open_file``, ``bpf_map_lookup_elem``, ...) on thin
classes and turns libbpf's error conventions into :class:`LibbpfError` (an
``OSError`` carrying the errno): since libbpf 1.0, functions returning a
pointer return NULL and set ``errno``; functions returning ``int`` return a
negative errno.

ABI mode is enough here because every function called is exported (no
``static inline`` helpers), and it needs no compiler at run time.  libbpf's
own log (verifier output, CO-RE relocation failures) is captured through
``libbpf_set_print`` and attached to the error that a failed load raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_MAP_TYPE_RINGBUF",
    "BPF_MAP_TYPE_USER_RINGBUF",
    "BPF_NOEXIST",
    "BpfLink",
    "BpfObject",
    "BpfProgram",
    "LibbpfError",
    "RingBuffer",
    "UserRingBuffer",
    "libbpf_available",
    "libbpf_missing",
    "map_create",
    "map_delete_elem",
    "map_get_next_key",
    "map_keys",
    "map_lookup_elem",
    "map_update_elem",
    "num_possible_cpus",
    "obj_get",
    "obj_pin",
]

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class LibbpfError(OSError):
    """A libbpf call failed; ``errno`` is its answer, ``log`` libbpf's own words."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        text = f"{what}: {os.strerror(err)} (errno {err})"
        super().__init__(err, text)
        self.log = log

    def __str__(self) -> str:
        return str(self.strerror)


_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_load_lock = threading.Lock()
_log_lines: list[str] = []

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _print_cb(level: int, fmt: bytes | None, ap: int | None) -> int:
    # va_list is an array type on x86-64, so the callback receives a pointer
    # that vsnprintf accepts as is.
    if _libc is None or fmt is None:
        return 0
    buf = ctypes.create_string_buffer(1 << 17)  # verifier logs come as one message
    _libc.vsnprintf(buf, len(buf), fmt, ctypes.c_void_p(ap))
    _log_lines.append(buf.value.decode(errors="replace"))
    del _log_lines[:-200]  # the tail is what explains a failure
    return 0


_print_ref = _PRINT_FN(_print_cb)  # kept alive for as long as libbpf may call it

_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "bpf_object__open_file": (_P, [ctypes.c_char_p, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__find_program_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_object__find_map_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_link__destroy": (ctypes.c_int, [_P]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "bpf_program__fd": (ctypes.c_int, [_P]),
    "bpf_map__pin": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "bpf_map__unpin": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "bpf_map__value_size": (ctypes.c_uint32, [_P]),
    "bpf_map__key_size": (ctypes.c_uint32, [_P]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _P, _P, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, _P]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "bpf_obj_get": (ctypes.c_int, [ctypes.c_char_p]),
    "ring_buffer__new": (_P, [ctypes.c_int, _SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (ctypes.c_int, [_P, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [_P]),
    "ring_buffer__epoll_fd": (ctypes.c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "libbpf_set_print": (_P, [_PRINT_FN]),
}
# Declared when the library has them, and looked up on use (_need): the user
# ring buffer came with libbpf 1.1, and the accounting must not depend on it.
_OPTIONAL: dict[str, tuple[object, list[object]]] = {
    "user_ring_buffer__new": (_P, [ctypes.c_int, _P]),
    "user_ring_buffer__reserve": (_P, [_P, ctypes.c_uint32]),
    "user_ring_buffer__submit": (None, [_P, _P]),
    "user_ring_buffer__free": (None, [_P]),
    "bpf_prog_test_run_opts": (ctypes.c_int, [ctypes.c_int, _P]),
    "bpf_map_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_uint32, _P]),
    "bpf_obj_pin": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
}


def _libbpf() -> ctypes.CDLL:
    """Open libbpf.so.1 once and declare the signatures used."""
    global _lib, _libc
    with _load_lock:
        if _lib is not None:
            return _lib
        name = "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            found = ctypes.util.find_library("bpf")
            if not found:
                raise LibbpfError(_errno.ENOENT, "libbpf.so.1 not found (Debian: apt-get "
                                  "install libbpf1)") from None
            lib = ctypes.CDLL(found, use_errno=True)
        for fname, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, fname)
            fn.restype = restype
            fn.argtypes = argtypes
        for fname, (restype, argtypes) in _OPTIONAL.items():
            if hasattr(lib, fname):
                fn = getattr(lib, fname)
                fn.restype = restype
                fn.argtypes = argtypes
        _libc = ctypes.CDLL(None)
        _libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                    ctypes.c_void_p]
        lib.libbpf_set_print(_print_ref)
        _lib = lib
        return lib


def libbpf_available() -> bool:
    """Whether libbpf.so.1 can be opened (not whether BPF can be used)."""
    try:
        _libbpf()
    except OSError:
        return False
    return True


def libbpf_missing(name: str) -> str | None:
    """None if libbpf exports the optional function ``name``, else why not."""
    try:
        _need(name)
    except LibbpfError as e:
        return str(e)
    return None


def _need(name: str) -> Callable[..., Any]:
    """An optional libbpf function, or LibbpfError(ENOSYS) naming the version it needs."""
    lib = _libbpf()
    if name not in _OPTIONAL or not hasattr(lib, name):
        raise LibbpfError(_errno.ENOSYS, f"this libbpf has no {name} (it needs libbpf >= 1.1)")
    fn: Callable[..., Any] = getattr(lib, name)
    return fn


def _take_log() -> str:
    text = "".join(_log_lines)
    _log_lines.clear()
    return text


def _check_int(ret: int, what: str) -> int:
    if ret < 0:
        raise LibbpfError(-ret, what, _take_log())
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or _errno.EINVAL
        raise LibbpfError(err, what, _take_log())
    return ptr


def num_possible_cpus() -> int:
    """CPUs a per-CPU map holds a value for (possible, not online)."""
    return _check_int(_libbpf().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def obj_get(path: str) -> int:
    """``bpf_obj_get``: a new fd for a pinned object (close it yourself)."""
    return _check_int(_libbpf().bpf_obj_get(path.encode()), f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    """``bpf_obj_pin``: pin a map or program fd at ``path`` in bpffs."""
    _check_int(_need("bpf_obj_pin")(fd, path.encode()), f"bpf_obj_pin({path})")


#: enum bpf_map_type values used by map_create.
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_USER_RINGBUF = 31


def map_create(map_type: int, name: str, key_size: int, value_size: int,
               max_entries: int) -> int:
    """``bpf_map_create`` with default options: a new map's fd (close it yourself)."""
    return _check_int(_need("bpf_map_create")(map_type, name.encode(), key_size, value_size,
                                              max_entries, None),
                      f"bpf_map_create({name})")


def _buf(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, len(data))


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check_int(_libbpf().bpf_map_update_elem(fd, _buf(key), _buf(value), flags),
               "bpf_map_update_elem")


def map_lookup_elem(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value for ``key``, or None when there is none."""
    out = ctypes.create_string_buffer(value_size)
    ret = _libbpf().bpf_map_lookup_elem(fd, _buf(key), out)
    if ret == -_errno.ENOENT:
        return None
    _check_int(ret, "bpf_map_lookup_elem")
    return out.raw


def map_delete_elem(fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there."""
    ret = _libbpf().bpf_map_delete_elem(fd, _buf(key))
    if ret == -_errno.ENOENT:
        return False
    _check_int(ret, "bpf_map_delete_elem")
    return True


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(key_size)
    ret = _libbpf().bpf_map_get_next_key(fd, None if key is None else _buf(key), out)
    if ret == -_errno.ENOENT:
        return None
    _check_int(ret, "bpf_map_get_next_key")
    return out.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    key = map_get_next_key(fd, None, key_size)
    while key is not None:
        yield key
        key = map_get_next_key(fd, key, key_size)


class _TestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` (libbpf 1.1 layout; ``sz`` tells libbpf which)."""

    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", _P), ("data_out", _P),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", _P), ("ctx_out", _P),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class BpfLink:
    """An attachment; detached by :meth:`destroy` (or when the process exits)."""

    def __init__(self, ptr: int) -> None:
        self._ptr: int | None = ptr

    def destroy(self) -> None:
        if self._ptr is not None:
            _libbpf().bpf_link__destroy(self._ptr)
            self._ptr = None


class BpfProgram:
    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return _check_int(_libbpf().bpf_program__fd(self._ptr), f"bpf_program__fd({self.name})")

    def test_run(self, ctx: bytearray) -> int:
        """Run the loaded program once (``bpf_prog_test_run_opts``); its return value.

        For a ``SEC("syscall")`` program the kernel copies ``ctx`` in and,
        after the run, back out: ``ctx`` is updated in place.
        """
        buf = ctypes.create_string_buffer(bytes(ctx), len(ctx))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.addressof(buf),
                            ctx_size_in=len(ctx))
        _check_int(_need("bpf_prog_test_run_opts")(self.fd, ctypes.byref(opts)),
                   f"bpf_prog_test_run_opts({self.name})")
        ctx[:] = buf.raw
        return ctypes.c_int32(opts.retval).value

    def set_autoload(self, autoload: bool) -> None:
        _check_int(_libbpf().bpf_program__set_autoload(self._ptr, autoload),
                   f"bpf_program__set_autoload({self.name})")

    def attach(self) -> BpfLink:
        return BpfLink(_check_ptr(_libbpf().bpf_program__attach(self._ptr),
                                  f"bpf_program__attach({self.name})"))

    def fdinfo(self) -> dict[str, str]:
        """The kernel's /proc fdinfo of the loaded program (run_cnt, recursion_misses, ...)."""
        fd = _check_int(_libbpf().bpf_program__fd(self._ptr), f"bpf_program__fd({self.name})")
        out: dict[str, str] = {}
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    out[key.strip()] = value.strip()
        return out


class BpfMap:
    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return _check_int(_libbpf().bpf_map__fd(self._ptr), f"bpf_map__fd({self.name})")

    @property
    def key_size(self) -> int:
        return int(_libbpf().bpf_map__key_size(self._ptr))

    @property
    def value_size(self) -> int:
        return int(_libbpf().bpf_map__value_size(self._ptr))

    def pin(self, path: str) -> None:
        _check_int(_libbpf().bpf_map__pin(self._ptr, path.encode()),
                   f"bpf_map__pin({self.name}, {path})")

    def unpin(self, path: str) -> None:
        _check_int(_libbpf().bpf_map__unpin(self._ptr, path.encode()),
                   f"bpf_map__unpin({self.name}, {path})")


class BpfObject:
    """``struct bpf_object``: open a compiled ``.bpf.o``, pick programs, load."""

    def __init__(self, path: str) -> None:
        lib = _libbpf()
        _take_log()
        self._ptr: int | None = _check_ptr(lib.bpf_object__open_file(path.encode(), None),
                                           f"bpf_object__open_file({path})")
        self.path = path

    def _live(self) -> int:
        if self._ptr is None:
            raise LibbpfError(_errno.EBADF, "bpf object already closed")
        return self._ptr

    def program(self, name: str) -> BpfProgram:
        ptr = _libbpf().bpf_object__find_program_by_name(self._live(), name.encode())
        return BpfProgram(_check_ptr(ptr, f"no program {name} in {self.path}"), name)

    def map(self, name: str) -> BpfMap:
        ptr = _libbpf().bpf_object__find_map_by_name(self._live(), name.encode())
        return BpfMap(_check_ptr(ptr, f"no map {name} in {self.path}"), name)

    def load(self) -> None:
        """Relocate (CO-RE), verify and load every autoload program and map."""
        _take_log()
        _check_int(_libbpf().bpf_object__load(self._live()), f"bpf_object__load({self.path})")

    def close(self) -> None:
        if self._ptr is not None:
            _libbpf().bpf_object__close(self._ptr)
            self._ptr = None


class RingBuffer:
    """``struct ring_buffer`` over one BPF_MAP_TYPE_RINGBUF map fd.

    ``callback(data)`` gets each record's bytes; an exception in it is kept
    and re-raised by :meth:`poll` (it cannot cross the C frame).
    """

    def __init__(self, map_fd: int, callback: Callable[[bytes], None]) -> None:
        self._callback = callback
        self._error: BaseException | None = None

        def sample(_ctx: int | None, data: int | None, size: int) -> int:
            try:
                self._callback(ctypes.string_at(data or 0, size))
            except BaseException as e:  # reported by poll()
                self._error = e
                return -_errno.ECANCELED
            return 0

        self._sample = _SAMPLE_FN(sample)  # kept alive with the ring
        self._ptr: int | None = _check_ptr(
            _libbpf().ring_buffer__new(map_fd, self._sample, None, None), "ring_buffer__new")

    def epoll_fd(self) -> int:
        assert self._ptr is not None
        return int(_libbpf().ring_buffer__epoll_fd(self._ptr))

    def consume(self) -> int:
        """Consume every record ready now, without waiting; returns the count."""
        assert self._ptr is not None
        ret = int(_libbpf().ring_buffer__consume(self._ptr))
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return _check_int(ret, "ring_buffer__consume")

    def poll(self, timeout_ms: int) -> int:
        """Consume what is ready (waiting up to ``timeout_ms``); returns the count."""
        assert self._ptr is not None
        ret = int(_libbpf().ring_buffer__poll(self._ptr, timeout_ms))
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if ret == -_errno.EINTR:
            return 0
        return _check_int(ret, "ring_buffer__poll")

    def free(self) -> None:
        if self._ptr is not None:
            _libbpf().ring_buffer__free(self._ptr)
            self._ptr = None


class UserRingBuffer:
    """``struct user_ring_buffer``: the producer side of a BPF_MAP_TYPE_USER_RINGBUF.

    One producer per ring (libbpf does not serialise producers); the kernel
    side drains it with ``bpf_user_ringbuf_drain``.
    """

    def __init__(self, map_fd: int) -> None:
        self._new = _need("user_ring_buffer__new")
        self._ptr: int | None = _check_ptr(self._new(map_fd, None), "user_ring_buffer__new")

    def submit(self, data: bytes) -> None:
        """Copy ``data`` into one sample and publish it; ENOSPC when the ring is full."""
        assert self._ptr is not None
        sample = _check_ptr(_need("user_ring_buffer__reserve")(self._ptr, len(data)),
                            "user_ring_buffer__reserve")
        ctypes.memmove(sample, data, len(data))
        _need("user_ring_buffer__submit")(self._ptr, sample)

    def free(self) -> None:
        if self._ptr is not None:
            _need("user_ring_buffer__free")(self._ptr)
            self._ptr = None
