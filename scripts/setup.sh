#!/usr/bin/env bash
# One-time (and idempotent) set-up of a Debian/Ubuntu machine for ublkml:
# system packages, the virtualenv with the compiled extension, and - where
# the running kernel has no ublk driver - the qemu test bed's kernel image.
# Every step checks first and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[setup] $*" >&2; }

APT_PACKAGES=(
  build-essential python3-venv python3-dev   # venv and the cffi extension
  liburing-dev                                # io_uring (the extension links it)
  fio e2fsprogs util-linux                    # tests, demo and benchmarks
  qemu-system-x86 busybox-static cpio kmod xz-utils   # the test bed
  smartmontools dmsetup                       # the test bed's emulated drives (SMART, dm-delay)
  nbdkit nbdkit-plugin-python nbd-client qemu-utils   # the benchmarks' peer baseline
  clang libbpf-dev bpftool                    # the kernel agent's eBPF objects (built below)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv ($($PYTHON --version))"
  "$PYTHON" -m venv .venv
fi

# Reinstall (and so recompile the extension) only when its inputs changed.
stamp=.venv/.ublkml-install-stamp
inputs=$(cat pyproject.toml setup.py ublk_driver/_build.py ublk_driver/csrc/* | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ] || \
   ! .venv/bin/python -c "import ublk_driver._ublkml_cffi" 2>/dev/null; then
  say "installing ublkml into .venv (builds the cffi extension)"
  .venv/bin/pip install -q --upgrade pip >&2
  .venv/bin/pip install -q -e '.[dev]' >&2
  echo "$inputs" > "$stamp"
fi

if [ -e /dev/ublk-control ]; then
  say "this kernel has the ublk driver: tests run natively"
else
  say "no /dev/ublk-control: provisioning the qemu test bed (cached after the first time)"
  .venv/bin/ublkml vm provision >&2
fi

# ---- kernel agent: eBPF objects (compiled here, never at run time) ----------
# setup.py's build_bpf, the same step that `pip install`/`pip wheel`/`python -m
# build` run: clang -target bpf against a vmlinux.h generated from this
# kernel's BTF (CO-RE: the objects then load on other kernels with BTF too,
# e.g. the test bed's 6.12). --inplace puts them next to their sources; it
# recompiles only what is older than its inputs. (The editable install above
# runs it too, but only when the install's own inputs change.)
if ! .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
  .venv/bin/pip install -q 'setuptools>=77' >&2   # pyproject's licence expression needs it
fi
.venv/bin/python setup.py build_bpf --inplace >&2
say "ready"
