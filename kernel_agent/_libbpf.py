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

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BpfLink",
    "BpfObject",
    "BpfProgram",
    "LibbpfError",
    "RingBuffer",
    "libbpf_available",
    "map_delete_elem",
    "map_get_next_key",
    "map_keys",
    "map_lookup_elem",
    "map_update_elem",
    "num_possible_cpus",
    "obj_get",
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
