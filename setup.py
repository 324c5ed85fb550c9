"""Build hooks: the cffi extension (API mode over liburing) and the kernel agent's eBPF objects.

``build_bpf`` compiles every ``kernel_agent/bpf/*.bpf.c`` with ``clang -target bpf``
into a CO-RE object next to its source in the build tree (or in the source tree
with ``--inplace``, which editable installs and ``scripts/setup.sh`` use). It is
a sub-command of ``build``, so ``pip install .``, ``pip wheel .`` and
``python -m build`` run it and the wheel carries ``kernel_agent/bpf/*.bpf.o``.

``vmlinux.h`` (the kernel's types, for CO-RE) is taken from ``kernel_agent/bpf/``
when the source tree has one, else generated from ``/sys/kernel/btf/vmlinux``
with bpftool. A missing clang, bpftool or libbpf-dev fails the build with a
message naming it. ``UBLKML_NO_BPF=1`` builds without eBPF on purpose: the
package then carries a ``NO_BPF`` note instead of the objects, and the agent
reports that as the reason it reads ``/sys/block``.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
from logging import INFO
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.errors import CompileError, ExecError, PlatformError

BPF_SRC = Path("kernel_agent", "bpf")
#: Written instead of the objects by a UBLKML_NO_BPF=1 build; kernel_agent/accounting.py reads it.
NO_BPF_NOTE = "NO_BPF"
BTF = Path("/sys/kernel/btf/vmlinux")
DEBIAN = "Debian/Ubuntu: apt-get install clang libbpf-dev bpftool"
OPT_OUT = ("or set UBLKML_NO_BPF=1 to build without eBPF accounting "
           "(the kernel agent then reads /sys/block)")
# platform.machine() -> the kernel's architecture name that libbpf's bpf_tracing.h expects.
TARGET_ARCH = {"x86_64": "x86", "i686": "x86", "aarch64": "arm64", "arm64": "arm64",
               "armv7l": "arm", "ppc64le": "powerpc", "ppc64": "powerpc", "s390x": "s390",
               "riscv64": "riscv", "loongarch64": "loongarch", "mips64": "mips"}


def _no_bpf() -> bool:
    return os.environ.get("UBLKML_NO_BPF", "").strip().lower() not in ("", "0", "no", "false")


def _tool(name: str) -> str | None:
    # bpftool lives in /usr/sbin on Debian, outside an ordinary user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


class build_bpf(Command):  # named as the command, as setuptools names its own
    description = "compile kernel_agent/bpf/*.bpf.c into CO-RE eBPF objects (clang -target bpf)"
    user_options = [  # noqa: RUF012 (distutils reads these class attributes)
        ("build-lib=", "b", "directory to put the objects in (below kernel_agent/bpf/)"),
        ("build-temp=", "t", "directory for a generated vmlinux.h"),
        ("inplace", "i", "put the objects in the source tree, next to their sources"),
        ("force", "f", "recompile even when the objects are newer than their inputs"),
    ]
    boolean_options = ["inplace", "force"]  # noqa: RUF012

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.build_temp: str | None = None
        self.inplace = False
        self.force: bool | None = None
        self.editable_mode = False  # set by setuptools for editable installs (PEP 660)

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))
        self.set_undefined_options("build", ("build_temp", "build_temp"), ("force", "force"))

    # -- what goes where ------------------------------------------------------------

    def _in_place(self) -> bool:
        return bool(self.inplace or self.editable_mode)

    def _sources(self) -> list[Path]:
        return sorted(BPF_SRC.glob("*.bpf.c"))

    def _headers(self) -> list[Path]:
        return sorted(h for h in BPF_SRC.glob("*.h") if h.name != "vmlinux.h")

    def _outputs(self, directory: Path) -> list[Path]:
        if _no_bpf():
            return [directory / NO_BPF_NOTE]
        return [directory / src.with_suffix(".o").name for src in self._sources()]

    def _built_dir(self) -> Path:
        assert self.build_lib is not None
        return Path(self.build_lib, BPF_SRC)

    def get_source_files(self) -> list[str]:
        """The sources for the sdist (never vmlinux.h: it describes the build host's kernel)."""
        return [str(p) for p in [*self._sources(), *self._headers()]]

    def get_outputs(self) -> list[str]:
        return [str(p) for p in self._outputs(self._built_dir())]

    def get_output_mapping(self) -> dict[str, str]:
        if not self._in_place():
            return {}
        return {str(built): str(here) for built, here in
                zip(self._outputs(self._built_dir()), self._outputs(BPF_SRC), strict=True)}

    # -- the build ------------------------------------------------------------------

    def run(self) -> None:
        out = BPF_SRC if self._in_place() else self._built_dir()
        out.mkdir(parents=True, exist_ok=True)
        note = out / NO_BPF_NOTE
        if _no_bpf():
            for src in self._sources():
                (out / src.with_suffix(".o").name).unlink(missing_ok=True)
            note.write_text("this ublkml was built with UBLKML_NO_BPF=1, without eBPF objects\n")
            self.announce(f"UBLKML_NO_BPF is set: no eBPF objects, {note} says so", INFO)
            return
        note.unlink(missing_ok=True)
        inputs = [p for p in [BPF_SRC / "vmlinux.h", *self._headers()] if p.exists()]
        newest_input = max((p.stat().st_mtime for p in inputs), default=0.0)
        todo = []
        for src, obj in zip(self._sources(), self._outputs(out), strict=True):
            if (self.force or not obj.exists()
                    or max(src.stat().st_mtime, newest_input) > obj.stat().st_mtime):
                todo.append((src, obj))
        if not todo:
            return
        clang = _tool("clang")
        if clang is None:
            raise PlatformError(_cannot(f"clang is not installed ({DEBIAN})"))
        include = self._vmlinux_h().parent
        arch = TARGET_ARCH.get(platform.machine(), platform.machine())
        for src, obj in todo:
            self.announce(f"compiling {src} -> {obj}", INFO)
            tmp = obj.with_name(obj.name + ".tmp")
            cmd = [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}",
                   f"-I{include}", "-Wall", "-c", str(src), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                if "bpf/bpf_helpers.h' file not found" in proc.stderr:
                    raise PlatformError(_cannot(
                        f"libbpf's headers (bpf/bpf_helpers.h) are not installed ({DEBIAN})"))
                raise CompileError(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr}")
            tmp.replace(obj)

    def _vmlinux_h(self) -> Path:
        """The source tree's vmlinux.h, else one generated from this kernel's BTF.

        In place (editable installs, scripts/setup.sh) it is generated into the
        source tree and kept there; otherwise into the build's temporary directory.
        """
        here = BPF_SRC / "vmlinux.h"
        if here.exists() and here.stat().st_size:
            return here
        assert self.build_temp is not None
        dest = here if self._in_place() else Path(self.build_temp, "bpf", "vmlinux.h")
        if dest.exists() and dest.stat().st_size:
            return dest
        if not BTF.exists():
            raise PlatformError(_cannot(
                f"{here} is absent and this kernel has no {BTF} to generate it from "
                "(put one there: bpftool btf dump file <a vmlinux with BTF> format c)"))
        bpftool = _tool("bpftool")
        if bpftool is None:
            raise PlatformError(_cannot(
                f"{here} is absent and bpftool, which generates it from {BTF}, "
                f"is not installed ({DEBIAN})"))
        self.announce(f"generating {dest} from {BTF}", INFO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        with tmp.open("w") as f:
            proc = subprocess.run([bpftool, "btf", "dump", "file", str(BTF), "format", "c"],
                                  stdout=f, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise ExecError(f"{bpftool} btf dump file {BTF} format c failed "
                            f"(exit {proc.returncode}): {proc.stderr.strip()}")
        tmp.replace(dest)
        return dest


def _cannot(why: str) -> str:
    return f"cannot build the kernel agent's eBPF objects ({BPF_SRC}/*.bpf.o): {why}; {OPT_OUT}"


class build_with_bpf(build):
    sub_commands = [*build.sub_commands, ("build_bpf", None)]  # noqa: RUF012


setup(
    cffi_modules=["ublk_driver/_build.py:ffibuilder"],
    cmdclass={"build": build_with_bpf, "build_bpf": build_bpf},
)
