"""The ublkml test bed: a real Linux 6.12 kernel with the ublk driver, under qemu.

Why: the developers' machines and CI run a kernel without ``CONFIG_BLK_DEV_UBLK``
and cannot load modules, so ``/dev/ublk-control`` never exists there.  The test
bed boots Debian's stock 6.12 kernel under qemu's software emulation (TCG: slow,
but real), with the host's whole file system shared into the guest, so that the
project's checkout and virtualenv run unchanged against a real ublk driver.

How (see ``docs/testbed.md`` for the full story and measured figures):

* :func:`provision` downloads the newest ``linux-image-6.12.*+deb*-amd64-unsigned``
  package with apt, unpacks it, runs ``depmod`` and builds a small busybox
  initramfs.  The result is cached under
  ``${UBLKML_CACHE:-${XDG_CACHE_HOME:-~/.cache}/ublkml}/testbed/<kernel-version>/``
  and a second call does nothing.
* :func:`run` boots that kernel and runs one command in it.  The guest's root is
  the host's root (read-only virtio-9p) under a tmpfs overlay: the guest may write
  anywhere, but only a directory passed as ``share`` is written through to the
  host.  The exit code comes back through a per-run control share, never from the
  console.

Conventions: every failure of the test bed itself (missing host tool, failed
download, guest that could not boot, timeout) raises :class:`TestbedError`, whose
message says what to do.  The guest command's own failure is not an error: it is
the ``returncode`` of the :class:`VmResult`.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "EMULATED_DRIVES",
    "QMP_PORT_NAME",
    "DriveSpec",
    "TestbedError",
    "TestbedImage",
    "TestbedTimeout",
    "VmResult",
    "cache_dir",
    "find_image",
    "in_vm",
    "info",
    "native_ublk_available",
    "provision",
    "run",
]

#: The kernel series the test bed boots: Debian 12's 6.12 (its config has
#: ``CONFIG_BLK_DEV_UBLK=m``, 9p and overlayfs as modules, BTF).
KERNEL_SERIES = "6.12"

#: Plain amd64 flavour only: ``-cloud-`` lacks 9p, ``-rt-`` is PREEMPT_RT.
_PACKAGE_RE = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb(\d+)-amd64)-unsigned$")

#: Modules that stage 1 needs before it can mount anything; their dependencies
#: (netfs, 9pnet) are found in ``modules.dep``.
_INITRAMFS_MODULES = ("9p", "9pnet_virtio", "overlay")

#: Bump when the layout of a cached image changes: older images are then rebuilt.
_IMAGE_FORMAT = 1

_QEMU = "qemu-system-x86_64"
_GUEST_CTL = "/run/ublkml"
# tsc=reliable: no clocksource watchdog on the TSC. Under TCG on a loaded host
# the watchdog can judge the TSC unstable; the kernel then flips the
# sched_clock_stable static key, i.e. patches live kernel text with int3, and
# multi-threaded TCG once let the other vCPU trap on that int3 ("Oops: int3" in
# sched_clock_cpu, a kernel panic seen in CI's test bed). The guest's
# clock is the host's TSC either way.
_KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 tsc=reliable ublkml.testbed=1"
_CMDLINE_MARKER = "ublkml.testbed=1"
_HERE = Path(__file__).resolve().parent
_INIT_SCRIPT = _HERE / "guest-init.sh"
_STAGE2_SCRIPT = _HERE / "guest-stage2.sh"

#: Where the guest finds the emulator's manifest (the control share).
GUEST_EMULATOR_MANIFEST = f"{_GUEST_CTL}/emulator.json"
#: Name of the virtio-serial port that carries qemu's QMP monitor into the guest.
QMP_PORT_NAME = "org.ublkml.qmp"
_MIB = 1 << 20

#: Which Debian package provides each host tool, for error messages.
_TOOL_PACKAGES = {
    _QEMU: "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}

#: Lines the kernel prints while powering off even with ``quiet``; dropped from
#: the console output so that it ends with the command's own output.
_POWER_OFF_NOISE = re.compile(
    r"^\[\s*\d+\.\d+\] (sysrq: Power Off|reboot: Power down|ACPI: PM: .*)\s*$"
)


class TestbedError(RuntimeError):
    """The test bed itself failed: a host tool is missing, provisioning failed,
    or the guest did not boot or did not report an exit code.

    ``str(err)`` is one line saying what went wrong and what to do; ``output``
    holds the guest console output seen so far (may be empty).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, message: str, *, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class TestbedTimeout(TestbedError, TimeoutError):
    """The guest command did not finish in time; qemu has been killed."""

    __test__ = False

    def __init__(self, message: str, *, output: str = "", timeout: float = 0.0) -> None:
        super().__init__(message, output=output)
        self.timeout = timeout


@dataclass(frozen=True)
class TestbedImage:
    """A provisioned kernel: everything :func:`run` needs, in one cache directory."""

    __test__ = False

    kernel_version: str
    """Kernel release, as ``uname -r`` prints it in the guest (``6.12.117+deb12-amd64``)."""
    package: str
    """The Debian package it came from."""
    path: Path
    """Its cache directory."""

    @property
    def vmlinuz(self) -> Path:
        """The kernel image qemu boots."""
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        """The gzip-compressed initramfs (busybox, stage 1, five modules)."""
        return self.path / "initrd.gz"

    @property
    def modules_dir(self) -> Path:
        """Shared read-only with the guest and mounted on its ``/lib/modules``."""
        return self.path / "modules"

    @property
    def config(self) -> Path:
        """The kernel's build configuration (``/boot/config-*``)."""
        return self.path / "config"

    def to_dict(self) -> dict[str, str]:
        """A JSON-friendly summary (used by ``ublkml vm provision --json``)."""
        return {
            "kernel_version": self.kernel_version,
            "package": self.package,
            "path": str(self.path),
            "vmlinuz": str(self.vmlinuz),
            "initrd": str(self.initrd),
            "modules_dir": str(self.modules_dir),
        }


@dataclass(frozen=True)
class DriveSpec:
    """One drive qemu emulates for the guest (see :data:`EMULATED_DRIVES`)."""

    id: str
    """qemu's device id; its QOM path is ``/machine/peripheral/<id>``."""
    kind: str
    """``"nvme"`` (an NVMe controller with one namespace) or ``"ata"`` (a SATA
    disk on an AHCI controller)."""
    serial: str
    """The serial number the guest sees (sysfs, smartctl); at most 20 characters."""
    size_bytes: int
    """Size of the sparse raw backing file, hence of the guest's disk."""

    @property
    def qom_path(self) -> str:
        """Where QMP's ``qom-get``/``qom-set`` find the device."""
        return f"/machine/peripheral/{self.id}"

    def to_dict(self) -> dict[str, object]:
        """The drive's entry in the manifest the guest reads."""
        return {"id": self.id, "kind": self.kind, "serial": self.serial,
                "size_bytes": self.size_bytes, "qom_path": self.qom_path}


#: The drives every boot gets: two NVMe controllers (one namespace each;
#: qemu's NVMe SMART/health log can be turned critical at run time) and one
#: SATA disk, so that ATA SMART exists too.  Backed by sparse files in a
#: per-run host directory, created empty for each boot and removed after it.
EMULATED_DRIVES: tuple[DriveSpec, ...] = (
    DriveSpec("nvme0", "nvme", "UBLKML-NVME0", 512 * _MIB),
    DriveSpec("nvme1", "nvme", "UBLKML-NVME1", 512 * _MIB),
    DriveSpec("sata0", "ata", "UBLKML-SATA0", 256 * _MIB),
)


@dataclass(frozen=True)
class VmResult:
    """What one :func:`run` gave back."""

    returncode: int
    """Exit code of the guest command (read from the control share)."""
    output: str
    """Guest console output: the command's stdout and stderr, interleaved."""
    boot_seconds: float
    """Host wall time from starting qemu until the command started in the guest."""
    total_seconds: float
    """Host wall time from starting qemu until it exited."""
    share_dir: str | None = None
    """The host directory that was writable from the guest (the ``share`` argument)."""
    kernel_log: str = ""
    """The guest's ``dmesg`` after the command."""


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"ublkml testbed: {message}", file=sys.stderr, flush=True)


def _missing_tools_error(missing: Sequence[str]) -> TestbedError:
    packages = sorted({_TOOL_PACKAGES.get(t, t) for t in missing})
    return TestbedError(
        f"the test bed needs {', '.join(missing)}, not found on PATH: "
        f"install with `sudo apt-get install {' '.join(packages)}` (Debian/Ubuntu host)"
    )


def _require_tools(*names: str) -> dict[str, str]:
    """Absolute paths of host tools; raises one error naming all missing ones."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise _missing_tools_error(missing)
    return found


def require_qemu() -> str:
    """Path of qemu-system-x86_64; :class:`TestbedError` saying what to install if absent."""
    return _require_tools(_QEMU)[_QEMU]


def _is_static_elf(path: str) -> bool:
    """True if ``path`` is a 64-bit little-endian ELF without a program
    interpreter (so it can run in an initramfs that has no libc)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
                return False
            (phoff,) = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: dynamically linked
            return False
    return True


def _version_key(kernel_version: str) -> tuple[int, ...]:
    """Sort key for ``6.12.117+deb12-amd64``: numeric, so that .117 > .99."""
    return tuple(int(n) for n in re.findall(r"\d+", kernel_version))


def _run_tool(argv: Sequence[str], *, what: str, cwd: Path | None = None) -> str:
    """Run a host tool, return its stdout, turn failure into a TestbedError."""
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise TestbedError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
        raise TestbedError(f"{what} failed (exit {proc.returncode}): {lines[-1]}")
    return proc.stdout


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the test bed cache:
    ``${UBLKML_CACHE:-${XDG_CACHE_HOME:-~/.cache}/ublkml}/testbed``.

    Each provisioned kernel gets a subdirectory named after its version.
    """
    base = os.environ.get("UBLKML_CACHE")
    if base:
        root = Path(base).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec says a relative value is invalid and must be ignored.
        cache = Path(xdg) if os.path.isabs(xdg) else Path("~/.cache").expanduser()
        root = cache / "ublkml"
    return root / "testbed"


def _read_image(path: Path) -> tuple[TestbedImage, dict[str, Any]] | None:
    """The image in ``path`` if it is complete and of the current format."""
    try:
        meta = json.loads((path / "testbed.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _IMAGE_FORMAT:
        return None
    image = TestbedImage(
        kernel_version=str(meta["kernel_version"]), package=str(meta["package"]), path=path
    )
    if not (image.vmlinuz.is_file() and image.initrd.is_file() and image.modules_dir.is_dir()):
        return None
    return image, meta


def find_image(kernel_version: str | None = None) -> TestbedImage | None:
    """The newest provisioned image in the cache (or the one for
    ``kernel_version``), without provisioning anything; ``None`` if there is none."""
    root = cache_dir()
    if kernel_version is not None:
        found = _read_image(root / kernel_version)
        return found[0] if found else None
    try:
        candidates = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return None
    images = [found[0] for p in candidates if (found := _read_image(p)) is not None]
    if not images:
        return None
    return max(images, key=lambda im: _version_key(im.kernel_version))


@contextlib.contextmanager
def _cache_lock(root: Path, quiet: bool) -> Iterator[None]:
    """Serialise provisioning: concurrent test runs must not build the same image."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("waiting for another process that is provisioning the test bed ...", quiet)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------


def _newest_package(names: Iterable[str]) -> str | None:
    """The newest plain-amd64 6.12 image package among ``names`` (numeric order)."""
    best: tuple[tuple[int, int], str] | None = None
    for name in names:
        m = _PACKAGE_RE.match(name)
        if m is None:
            continue
        key = (int(m.group(2)), int(m.group(3)))
        if best is None or key > best[0]:
            best = (key, name)
    return best[1] if best else None


def _apt_search() -> list[str]:
    pattern = r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$"
    out = _run_tool(["apt-cache", "search", "--names-only", pattern], what="apt-cache search")
    return [line.split(" ", 1)[0] for line in out.splitlines() if line.strip()]


def newest_kernel_package(*, update: bool = True, quiet: bool = False) -> str:
    """Name of the newest ``linux-image-6.12.*+deb*-amd64-unsigned`` apt knows.

    Runs ``apt-get update`` (as root) only when the package lists have none.
    """
    package = _newest_package(_apt_search())
    if package is None and update:
        if os.geteuid() != 0:
            raise TestbedError(
                "apt knows no linux-image-6.12.*-amd64-unsigned package: "
                "run `sudo apt-get update` (Debian 12 sources needed), then retry"
            )
        _say("no 6.12 kernel package in the apt lists; running apt-get update ...", quiet)
        _run_tool(["apt-get", "update", "-q"], what="apt-get update")
        package = _newest_package(_apt_search())
    if package is None:
        raise TestbedError(
            "apt knows no linux-image-6.12.*+deb*-amd64-unsigned package: "
            "the test bed needs Debian 12 (bookworm) package sources in /etc/apt"
        )
    return package


def _package_size(package: str) -> int | None:
    try:
        out = _run_tool(
            ["apt-cache", "show", "--no-all-versions", package], what="apt-cache show"
        )
    except TestbedError:
        return None
    m = re.search(r"^Size:\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else None


def _module_name(filename: str) -> str:
    """``9pnet_virtio.ko.xz`` -> ``9pnet_virtio`` (the kernel treats - and _ alike)."""
    return filename.split(".ko", 1)[0].replace("-", "_")


def _module_load_order(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``wanted`` modules and their dependencies, dependencies first, from
    ``modules.dep``; modules built into the kernel are left out."""
    deps: dict[str, tuple[Path, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        target, _, rest = line.partition(":")
        name = _module_name(os.path.basename(target))
        deps[name] = (moddir / target, [_module_name(os.path.basename(d)) for d in rest.split()])
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        builtin = {
            _module_name(os.path.basename(line))
            for line in (moddir / "modules.builtin").read_text().split()
        }
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            raise TestbedError(f"kernel module {name} not found in {moddir}/modules.dep")
        path, requires = deps[name]
        for dep in requires:
            visit(dep)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod in stage 1 wants plain .ko."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise TestbedError(f"unsupported module compression: {path.name}")


class _Cpio:
    """Writer of a "newc" cpio archive, the format the kernel unpacks as initramfs.

    Written here rather than with cpio(1) so that device nodes (/dev/console,
    which the kernel opens for PID 1 before anything is mounted) need no root,
    and so that the archive is byte-for-byte reproducible (mtime 0, uid 0).
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self._out.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _build_initramfs(moddir: Path, busybox: str, dest: Path) -> list[str]:
    """Write ``dest`` (gzip newc cpio); returns the module load order."""
    modules = _module_load_order(moddir, _INITRAMFS_MODULES)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "run", "mnt", "mnt/root", "mnt/rw", "newroot",
              "modules"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    cpio.file("init", _INIT_SCRIPT.read_bytes(), 0o755)
    for name, path in modules:
        cpio.file(f"modules/{name}.ko", _read_module(path))
    cpio.file("modules/order", "".join(f"{name}\n" for name, _ in modules).encode())
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    tmp.replace(dest)
    return [name for name, _ in modules]


def _static_busybox() -> str:
    busybox = _require_tools("busybox")["busybox"]
    if not _is_static_elf(busybox):
        raise TestbedError(
            f"{busybox} is dynamically linked, so it cannot run in the initramfs: "
            "install `busybox-static` (`sudo apt-get install busybox-static`)"
        )
    return busybox


def _write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    tmp = path / "testbed.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(path / "testbed.json")


def _refresh_initramfs(image: TestbedImage, meta: dict[str, Any], quiet: bool) -> None:
    """Rebuild only the initramfs when guest-init.sh changed since provisioning."""
    if meta.get("init_sha256") == _sha256(_INIT_SCRIPT):
        return
    _say("guest-init.sh changed; rebuilding the initramfs", quiet)
    moddir = image.modules_dir / image.kernel_version
    meta["initramfs_modules"] = _build_initramfs(moddir, _static_busybox(), image.initrd)
    meta["init_sha256"] = _sha256(_INIT_SCRIPT)
    _write_meta(image.path, meta)


def _build_image(package: str, root: Path, quiet: bool) -> TestbedImage:
    m = _PACKAGE_RE.match(package)
    assert m is not None, package
    version = m.group(1)
    tools = _require_tools("apt-get", "dpkg-deb", "depmod")
    busybox = _static_busybox()
    started = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=root))
    try:
        build.chmod(0o755)  # mkdtemp makes it private; the image is not secret
        size = _package_size(package)
        size_text = f" ({size / 1e6:.0f} MB)" if size else ""
        _say(f"downloading kernel package {package}{size_text} ...", quiet)
        t0 = time.monotonic()
        _run_tool([tools["apt-get"], "download", "-q", package], what="apt-get download",
                  cwd=build)
        debs = list(build.glob("*.deb"))
        if len(debs) != 1:
            raise TestbedError(f"apt-get download {package} left no .deb in {build}")
        _say(f"downloaded in {time.monotonic() - t0:.1f} s; unpacking ...", quiet)
        tree = build / "pkg"
        _run_tool([tools["dpkg-deb"], "-x", str(debs[0]), str(tree)], what="dpkg-deb -x")
        debs[0].unlink()  # 100 MB we no longer need
        for prefix in (tree, tree / "usr"):
            if (prefix / "lib" / "modules" / version).is_dir():
                base = prefix
                break
        else:
            raise TestbedError(f"{package} has no lib/modules/{version}")
        _run_tool([tools["depmod"], "-b", str(base), version], what="depmod")
        (base / "lib" / "modules").rename(build / "modules")
        (tree / "boot" / f"vmlinuz-{version}").rename(build / "vmlinuz")
        with contextlib.suppress(OSError):
            (tree / "boot" / f"config-{version}").rename(build / "config")
        shutil.rmtree(tree)
        _say("building the initramfs ...", quiet)
        loaded = _build_initramfs(build / "modules" / version, busybox, build / "initrd.gz")
        meta = {
            "format": _IMAGE_FORMAT,
            "kernel_version": version,
            "package": package,
            "init_sha256": _sha256(_INIT_SCRIPT),
            "initramfs_modules": loaded,
            "provisioned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "provision_seconds": round(time.monotonic() - started, 1),
        }
        _write_meta(build, meta)
        final = root / version
        if final.exists():  # force=True, or a stale incomplete directory
            old = Path(tempfile.mkdtemp(prefix=f".old-{version}-", dir=root))
            final.rename(old / "x")
            shutil.rmtree(old, ignore_errors=True)
        build.rename(final)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _say(f"test bed ready in {time.monotonic() - started:.1f} s: {final}", quiet)
    return TestbedImage(kernel_version=version, package=package, path=final)


def provision(force: bool = False, *, quiet: bool = False) -> TestbedImage:
    """Make sure a test-bed kernel is in the cache and return it.

    Idempotent: when an image is already cached (the newest one is used, or the
    one named by ``$UBLKML_TESTBED_KERNEL``), it is returned at once without
    asking apt anything.  Otherwise, or with ``force=True``, the newest
    ``linux-image-6.12.*+deb*-amd64-unsigned`` is downloaded and the image
    (re)built: kernel, modules with ``depmod`` run, initramfs.  Progress goes to
    stderr unless ``quiet``.  Raises :class:`TestbedError` with what to install
    when a host tool is missing.
    """
    root = cache_dir()
    pinned = os.environ.get("UBLKML_TESTBED_KERNEL") or None
    if not force:
        image = find_image(pinned)
        if image is not None:
            found = _read_image(image.path)
            assert found is not None
            if found[1].get("init_sha256") != _sha256(_INIT_SCRIPT):
                with _cache_lock(root, quiet):
                    _refresh_initramfs(image, found[1], quiet)
            return image
    _require_tools("apt-cache", "apt-get", "dpkg-deb", "depmod", "busybox")
    with _cache_lock(root, quiet):
        if not force:
            # Someone else may have provisioned while we waited for the lock.
            image = find_image(pinned)
            if image is not None:
                return image
        if pinned:
            package = f"linux-image-{pinned}-unsigned"
            if _PACKAGE_RE.match(package) is None:
                raise TestbedError(
                    f"UBLKML_TESTBED_KERNEL={pinned!r} is not a 6.12 amd64 kernel version "
                    "(example: 6.12.117+deb12-amd64)"
                )
        else:
            package = newest_kernel_package(quiet=quiet)
        return _build_image(package, root, quiet)


# --------------------------------------------------------------------------
# Running a command in the guest
# --------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Host variables passed through to the guest when set (besides PATH and HOME).
_PASS_THROUGH = ("PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE")


def shell_command(argv: Sequence[str]) -> str:
    """The ``/bin/sh -c`` string that runs ``argv`` exactly (each word quoted)."""
    if not argv:
        raise ValueError("empty command")
    return shlex.join(argv)


def guest_environment(
    env: Mapping[str, str] | None = None,
    *,
    host_env: Mapping[str, str] | None = None,
    executable: str | None = None,
) -> dict[str, str]:
    """The environment the guest command gets.

    PATH is the host's PATH with the directory of ``executable`` (default:
    ``sys.executable``, i.e. the active virtualenv's ``bin``) first, plus the
    sbin directories; HOME, PYTHONPATH and the locale variables come from the
    host when set; TERM is ``dumb`` (the console is captured, not a terminal);
    ``UBLKML_IN_VM=1``.  ``env`` is applied last and may override any of them.
    """
    host = os.environ if host_env is None else host_env
    exe = sys.executable if executable is None else executable
    path: list[str] = []
    for entry in [os.path.dirname(exe), *host.get("PATH", "").split(os.pathsep),
                  "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]:
        if entry and entry not in path:
            path.append(entry)
    result = {"PATH": os.pathsep.join(path), "HOME": host.get("HOME", "/root"), "TERM": "dumb"}
    for name in _PASS_THROUGH:
        if name in host:
            result[name] = host[name]
    result["UBLKML_IN_VM"] = "1"
    if env:
        result.update(env)
    for name in result:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name: {name!r}")
    return result


def guest_job_script(argv: Sequence[str], *, cwd: str, env: Mapping[str, str]) -> str:
    """The ``job.sh`` that stage 2 runs: cd, export, exec ``/bin/sh -c``."""
    q = shlex.quote
    lines = [
        "# generated by ublk_driver.testbed for one run",
        "umask 022",
        f"cd -- {q(cwd)} || {{ echo {q('cannot cd to ' + cwd + ' in the guest')}"
        f" > {_GUEST_CTL}/error; exit 125; }}",
    ]
    lines += [f"export {name}={q(value)}" for name, value in env.items()]
    lines.append(f"exec /bin/sh -c {q(shell_command(argv))}")
    return "\n".join(lines) + "\n"


def _qemu_path_arg(path: str | Path) -> str:
    """qemu's option parser splits on commas; a literal comma is written twice."""
    return str(path).replace(",", ",,")


def qemu_command(
    image: TestbedImage,
    *,
    ctl_dir: str,
    share_dir: str | None = None,
    memory_mb: int = 4096,
    cpus: int = 2,
    qemu: str = _QEMU,
    security_model: str = "passthrough",
    emulator_dir: str | None = None,
    drives: Sequence[DriveSpec] = EMULATED_DRIVES,
) -> list[str]:
    """The qemu command line for one run (see docs/testbed.md for each choice).

    With ``emulator_dir`` (filled by :func:`prepare_emulator`), the guest also
    gets ``drives`` and the QMP port (:func:`emulator_arguments`).
    """
    p = _qemu_path_arg

    def share(fs_id: str, tag: str, path: str | Path, *, readonly: bool) -> list[str]:
        fsdev = f"local,id={fs_id},path={p(path)},security_model={security_model},multidevs=remap"
        if readonly:
            fsdev += ",readonly=on"
        return ["-fsdev", fsdev, "-device", f"virtio-9p-pci,fsdev={fs_id},mount_tag={tag}"]

    argv = [
        qemu,
        # KVM hangs with stock kernels on these hosts (para-virtual KVM): TCG.
        "-accel", "tcg,thread=multi",
        # The default CPU model lacks SSE4/AVX, which numpy/onnxruntime need.
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", str(memory_mb),
        # No NIC, VGA, floppy, monitor: less to probe at boot, nothing to leak.
        "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image.vmlinuz),
        "-initrd", str(image.initrd),
        "-append", f"{_KERNEL_CMDLINE} {os.environ.get('UBLKML_TESTBED_CMDLINE', '')}".strip(),
    ]
    argv += share("hostroot", "hostroot", "/", readonly=True)
    argv += share("modules", "modules", image.modules_dir, readonly=True)
    argv += share("ctl", "ctl", ctl_dir, readonly=False)
    if share_dir is not None:
        argv += share("share", "share", share_dir, readonly=False)
    if emulator_dir is not None:
        argv += emulator_arguments(emulator_dir, drives)
    return argv


def _qmp_socket(emulator_dir: str | Path) -> str:
    return os.path.join(emulator_dir, "qmp.sock")


def emulator_arguments(emulator_dir: str, drives: Sequence[DriveSpec]) -> list[str]:
    """qemu options for the emulated drives and for the guest's QMP port.

    Each drive is a raw file ``<emulator_dir>/<id>.img``: an NVMe controller
    (``-device nvme``, one namespace) or an ``ide-hd`` on one AHCI controller.
    ``cache=unsafe``: the files are scratch, and host fsyncs would only slow
    down the other users of the machine; ``discard=unmap`` keeps them sparse.

    QMP reaches the guest without any host-side relay: qemu's QMP monitor
    listens on ``qmp.sock`` and a second chardev, qemu's own client of that
    socket (created after the listener, so its synchronous connect succeeds),
    is the back end of the virtio-serial port ``org.ublkml.qmp``.  A guest
    process that opens ``/dev/vportNpM`` talks to the monitor directly.
    """
    p = _qemu_path_arg
    argv: list[str] = []
    ata = [d for d in drives if d.kind == "ata"]
    if len(ata) > 6:
        raise ValueError("one AHCI controller has 6 ports")
    if ata:
        argv += ["-device", "ahci,id=ahci0"]
    for d in drives:
        image = os.path.join(emulator_dir, f"{d.id}.img")
        argv += ["-drive", f"file={p(image)},if=none,id={d.id}-disk,format=raw,"
                 "cache=unsafe,discard=unmap"]
        if d.kind == "nvme":
            argv += ["-device", f"nvme,id={d.id},serial={d.serial},drive={d.id}-disk"]
        elif d.kind == "ata":
            argv += ["-device", f"ide-hd,id={d.id},bus=ahci0.{ata.index(d)},"
                     f"drive={d.id}-disk,serial={d.serial}"]
        else:
            raise ValueError(f"unknown drive kind {d.kind!r} (nvme or ata)")
    sock = p(_qmp_socket(emulator_dir))
    argv += [
        "-chardev", f"socket,id=qmp-monitor,path={sock},server=on,wait=off",
        "-mon", "chardev=qmp-monitor,mode=control",
        "-chardev", f"socket,id=qmp-guest,path={sock}",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=qmp-guest,name={QMP_PORT_NAME}",
    ]
    return argv


def prepare_emulator(
    ctl: Path, drives_dir: Path, drives: Sequence[DriveSpec] = EMULATED_DRIVES
) -> None:
    """Create the drives' sparse backing files in ``drives_dir`` (where qemu's
    QMP socket goes too) and write what the guest reads into the control
    directory ``ctl``: the manifest (``emulator.json``, in the guest
    :data:`GUEST_EMULATOR_MANIFEST`) and the drivers to load (``emulator.modules``).

    ``drives_dir`` is not shared with the guest: its disks' backing files and
    the monitor's socket are none of its business.
    """
    # The kernel's limit for a Unix socket path (sun_path) is 108 bytes.
    if len(os.fsencode(_qmp_socket(drives_dir))) >= 108:
        raise TestbedError(
            f"the run's directory {drives_dir} is too long a path for qemu's QMP socket: "
            "set TMPDIR to a shorter directory (e.g. /tmp)"
        )
    for d in drives:
        with open(drives_dir / f"{d.id}.img", "wb") as f:
            f.truncate(d.size_bytes)
    (ctl / "emulator.json").write_text(emulator_manifest(drives))
    (ctl / "emulator.modules").write_text("".join(f"{line}\n" for line in guest_modules(drives)))


def guest_modules(drives: Sequence[DriveSpec]) -> list[str]:
    """The ``modprobe`` command lines stage 2 runs for ``drives``' drivers.

    sd_mod before ahci, so the disks get block devices as soon as they are
    found; ahci probes only the ports in use (each empty port costs a link
    probe, and AHCI has six).
    """
    lines: list[str] = []
    if any(d.kind == "nvme" for d in drives):
        lines.append("nvme")
    ata = sum(d.kind == "ata" for d in drives)
    if ata:
        lines += ["sd_mod", f"ahci mask_port_map={(1 << ata) - 1:#x}"]
    return lines


def emulator_manifest(drives: Sequence[DriveSpec]) -> str:
    """The JSON the guest reads to find the drives and the QMP port
    (:func:`ublk_driver.testbed.emulator.parse_manifest` reads it back)."""
    manifest = {"qmp_port": QMP_PORT_NAME, "drives": [d.to_dict() for d in drives]}
    return json.dumps(manifest, indent=2) + "\n"


def _set_parent_death_signal() -> None:
    """In the qemu child: die with the Python process that started it, so a
    killed test run leaves no qemu behind (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)


class _Console:
    """Collects the guest console output, normalises line ends (the serial line
    sends CRLF), drops the kernel's power-off messages and forwards the rest."""

    def __init__(self, sink: TextIO | None) -> None:
        self._sink = sink
        self._pending = ""
        self._parts: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _emit(self, text: str) -> None:
        if not text:
            return
        self._parts.append(text)
        if self._sink is not None:
            with contextlib.suppress(OSError, ValueError):
                self._sink.write(text)
                self._sink.flush()

    def feed(self, data: bytes) -> None:
        self._pending += self._decoder.decode(data)
        self._pending = self._pending.replace("\r\n", "\n")
        *lines, self._pending = self._pending.split("\n")
        self._emit("".join(line + "\n" for line in lines if not _POWER_OFF_NOISE.match(line)))

    def idle(self) -> None:
        """No data for a while: show a partial line (a prompt, a progress dot)
        unless it may be the start of a kernel message or of a CRLF."""
        text = self._pending
        if text and not text.startswith("[") and not text.endswith("\r"):
            self._emit(text)
            self._pending = ""

    def close(self) -> str:
        self._pending += self._decoder.decode(b"", final=True)
        rest = self._pending.replace("\r\n", "\n")
        if rest and not _POWER_OFF_NOISE.match(rest):
            self._emit(rest)
        self._pending = ""
        return "".join(self._parts)

    def text(self) -> str:
        return "".join(self._parts) + self._pending


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
    memory_mb: int = 4096,
    cpus: int = 2,
    stream: bool | TextIO = True,
    share: str | None = None,
    emulated_drives: bool = True,
) -> VmResult:
    """Boot the test bed and run ``argv`` in it; return when the guest is off.

    ``argv`` runs through ``/bin/sh -c`` (each word quoted), as root, in ``cwd``
    (default: the current directory; the same absolute path exists in the guest
    because the host's root is shared), with :func:`guest_environment` ``(env)``.
    ``/dev/ublk-control`` exists (stage 2 ran ``modprobe ublk_drv``), bpffs is
    on ``/sys/fs/bpf`` and tracefs on ``/sys/kernel/tracing``.

    The guest may write anywhere, but its writes stay in a tmpfs overlay, except
    in ``share``: a host directory mounted writable at the same absolute path in
    the guest.  ``stream`` sends the console live to ``sys.stdout`` (True), to
    a given text file, or nowhere (False); it is always in ``VmResult.output``.

    The guest has the :data:`EMULATED_DRIVES` (``emulated_drives=False``
    leaves them out) and their QMP port: see :mod:`ublk_driver.testbed.emulator`.

    Provisions the image first if needed.  Raises :class:`TestbedError` if the
    test bed fails and :class:`TestbedTimeout` (qemu killed) after ``timeout``
    seconds.  Several runs may go on at once: each has its own control directory.
    """
    command = list(argv)
    if not command:
        raise ValueError("run() needs a command")
    qemu = require_qemu()  # checked first: no point provisioning without it
    image = provision()
    workdir = os.path.abspath(cwd if cwd is not None else os.getcwd())
    if not os.path.isdir(workdir):
        raise TestbedError(f"working directory {workdir} does not exist on the host "
                           "(the guest sees the host's file system)")
    share_dir = None
    if share is not None:
        share_dir = os.path.realpath(share)
        if not os.path.isdir(share_dir):
            raise TestbedError(f"share directory {share} does not exist")
    job = guest_job_script(command, cwd=workdir, env=guest_environment(env))
    sink: TextIO | None
    if stream is True:
        sink = sys.stdout
    elif stream is False:
        sink = None
    else:
        sink = stream

    with (tempfile.TemporaryDirectory(prefix="ublkml-vm-") as ctl_name,
          contextlib.ExitStack() as cleanup):
        ctl = Path(ctl_name)
        shutil.copyfile(_STAGE2_SCRIPT, ctl / "stage2.sh")
        (ctl / "job.sh").write_text(job)
        if share_dir is not None:
            (ctl / "share").write_text(share_dir + "\n")
        emulator_dir = None
        if emulated_drives:
            # Removed with the run: the drives start empty and healthy each boot.
            emulator_dir = cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="ublkml-drives-"))
            prepare_emulator(ctl, Path(emulator_dir))
        cmd = qemu_command(
            image, ctl_dir=ctl_name, share_dir=share_dir, memory_mb=memory_mb, cpus=cpus,
            qemu=qemu, emulator_dir=emulator_dir,
            # Without root, qemu cannot give files the guest's owners: "none"
            # makes it ignore that instead of failing the write.
            security_model="passthrough" if os.geteuid() == 0 else "none",
        )
        return _run_qemu(cmd, ctl, timeout=timeout, sink=sink, share_dir=share_dir)


def _run_qemu(
    cmd: list[str], ctl: Path, *, timeout: float, sink: TextIO | None, share_dir: str | None
) -> VmResult:
    console = _Console(sink)
    started = time.monotonic()
    deadline = started + timeout
    booted: float | None = None
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_set_parent_death_signal,
        )
    except OSError as exc:
        raise TestbedError(f"cannot start {cmd[0]}: {exc}") from exc
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestbedTimeout(
                    f"the guest command did not finish within {timeout:g} s; qemu was killed",
                    output=console.text(), timeout=timeout,
                )
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.1))
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    break  # qemu closed its stdout: it is exiting
                console.feed(data)
            else:
                console.idle()
            if booted is None and (ctl / "started").exists():
                booted = time.monotonic()
        try:
            proc.wait(max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            raise TestbedTimeout(
                f"qemu did not exit within {timeout:g} s; it was killed",
                output=console.text(), timeout=timeout,
            ) from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    finished = time.monotonic()
    output = console.close()
    error = ctl / "error"
    if error.exists():
        raise TestbedError(
            f"test bed failure in the guest: {error.read_text().strip()}", output=output
        )
    try:
        returncode = int((ctl / "rc").read_text().strip())
    except (OSError, ValueError):
        last = _tail(output, 1) or "(no console output)"
        raise TestbedError(
            f"the guest stopped without reporting an exit code (qemu exit status "
            f"{proc.returncode}); last console line: {last}",
            output=output,
        ) from None
    kernel_log = ""
    with contextlib.suppress(OSError):
        kernel_log = (ctl / "kernel.log").read_text(errors="replace")
    return VmResult(
        returncode=returncode,
        output=output,
        boot_seconds=round((booted if booted is not None else finished) - started, 2),
        total_seconds=round(finished - started, 2),
        share_dir=share_dir,
        kernel_log=kernel_log,
    )


# --------------------------------------------------------------------------
# Where are we?
# --------------------------------------------------------------------------


def native_ublk_available() -> bool:
    """True if this kernel has a usable ublk driver: ``/dev/ublk-control``
    exists and opens read-write (so ublk tests can run without the test bed)."""
    try:
        fd = os.open("/dev/ublk-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def in_vm() -> bool:
    """True inside the test-bed guest (``UBLKML_IN_VM=1``, or the marker on the
    guest kernel's command line, which survives a scrubbed environment)."""
    if os.environ.get("UBLKML_IN_VM") == "1":
        return True
    try:
        with open("/proc/cmdline") as f:
            return _CMDLINE_MARKER in f.read().split()
    except OSError:
        return False


# --------------------------------------------------------------------------
# The test bed's state
# --------------------------------------------------------------------------


def info() -> dict[str, Any]:
    """The test bed's state for ``ublkml vm info``: kernel version, cache path,
    whether it is provisioned; asks no network."""
    image = find_image(os.environ.get("UBLKML_TESTBED_KERNEL") or None)
    state: dict[str, Any] = {
        "provisioned": image is not None,
        "cache_dir": str(cache_dir()),
        "kernel_version": image.kernel_version if image else None,
        "package": image.package if image else None,
        "path": str(image.path) if image else None,
        "qemu": shutil.which(_QEMU),
        "native_ublk": native_ublk_available(),
        "in_vm": in_vm(),
    }
    if image is None and shutil.which("apt-cache"):
        # What `provision` would fetch; from the local apt lists, no network.
        with contextlib.suppress(TestbedError):
            package = _newest_package(_apt_search())
            if package:
                state["package"] = package
                m = _PACKAGE_RE.match(package)
                state["kernel_version"] = m.group(1) if m else None
    return state
