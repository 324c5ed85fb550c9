#!/usr/bin/env bash
# Build the ublkml wheel as a user would and check it from a fresh virtualenv.
#
#   scripts/check_wheel.sh              build, install, check here
#   scripts/check_wheel.sh --testbed    ... and run `ublkml add` and the eBPF agent
#                                       from the wheel inside the qemu test bed
#   scripts/check_wheel.sh --no-build --testbed
#                                       reuse the installed $VENV, test bed only
#
# The build: a copy of this checkout as a fresh clone would have it plus the
# uncommitted changes (git's tracked and untracked-but-not-ignored files: no
# .venv, no compiled extension, no eBPF object, no vmlinux.h), then
# `pip wheel --no-deps .` run by a fresh build venv. The wheel goes into another
# fresh venv ($VENV), and every check runs from /tmp, away from the source tree.
#
# The checks: the wheel carries the cffi extension, the eBPF object and LICENSE;
# its metadata; `ublkml --version`; `ublkml --help` lists every command entry
# point; `ublkml add -t loop --help` imports neither numpy nor onnxruntime; the
# agent finds its object through importlib.resources; and, as root, the agent
# runs with eBPF accounting (source "ebpf") and counts direct I/O to a loop
# device exactly. Devices: natively where the kernel has ublk, else (--testbed)
# in the test bed, which shares this machine's root file system read-only, so
# the guest runs the same $VENV.
#
# Environment: WORK (default /tmp/ublkml-wheel-check), VENV (default
# /tmp/wheel-venv), PYTHON (default python3).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF="$REPO/scripts/check_wheel.sh"
WORK=${WORK:-/tmp/ublkml-wheel-check}
VENV=${VENV:-/tmp/wheel-venv}
PYTHON=${PYTHON:-python3}

say() { echo "[check_wheel] $*" >&2; }
fail() { echo "[check_wheel] FAIL: $*" >&2; exit 1; }
ok() { echo "[check_wheel] ok: $*" >&2; }

# ---- ublk devices and the eBPF agent from the wheel (here or in the test bed) ----
# Runs as `check_wheel.sh --devices`: a loop-backed ublk device, the agent
# (eBPF) watching it, 512 direct 4 KiB writes, the agent's count of them.
devices() {
  cd /tmp
  unset PYTHONPATH
  [ -e /dev/ublk-control ] || fail "no /dev/ublk-control here (use --testbed)"
  # Globals, not locals: the EXIT trap runs after this function has returned.
  ublkml="$VENV/bin/ublkml" scratch="" dev_id=""
  local bdev
  scratch=$(mktemp -d /dev/shm/ublkml-wheel.XXXXXX)
  export UBLKML_AGENT_DIR="$scratch/agent"
  cleanup_devices() {
    "$ublkml" agent stop >/dev/null 2>&1 || true
    [ -n "$dev_id" ] && { "$ublkml" del -n "$dev_id" >/dev/null 2>&1 || true; }
    rm -rf "$scratch"
  }
  trap cleanup_devices EXIT
  truncate -s 64M "$scratch/backing"
  local added
  added=$("$ublkml" add -t loop -f "$scratch/backing" --json) || fail "ublkml add -t loop"
  dev_id=$(field "$added" dev_id)
  bdev=$(field "$added" bdev)
  ok "ublkml add -t loop: $added"
  "$ublkml" list
  agent_counts "$bdev"
  "$ublkml" del -n "$dev_id"
  dev_id=""
  ok "ublkml del -n: device removed"
}

# Field $2 of the JSON document $1 (a dotted path: ops.write.ios).
field() {
  "$VENV/bin/python" -c '
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2"
}

# The agent, started from the wheel, watches block device $1; 512 direct
# writes of 4 KiB must appear in its eBPF counters, exactly.
agent_counts() {
  local bdev=$1 name state stats
  name=$(basename "$bdev")
  state=$("$VENV/bin/ublkml" agent start --instance wheelcheck --json) || fail "agent start"
  echo "    $state"
  [ "$(field "$state" source)" = ebpf ] \
    || fail "the agent fell back to sysfs: $(field "$state" fallback_reason)"
  ok "ublkml agent start: source ebpf, attach $(field "$state" attach)"
  "$VENV/bin/ublkml" agent watch "$name"
  sleep 1  # the agent picks the watch up from its registry
  dd if=/dev/zero of="$bdev" bs=4k count=512 oflag=direct status=none
  for _ in $(seq 50); do
    stats=$("$VENV/bin/ublkml" agent stats "$name" --json)
    [ "$(field "$stats" ops.write.ios)" -ge 512 ] && break
    sleep 0.2
  done
  echo "    source $(field "$stats" source), writes $(field "$stats" ops.write.ios)," \
       "bytes $(field "$stats" ops.write.bytes), mean latency" \
       "$(field "$stats" mean_latency_us) us"
  [ "$(field "$stats" source)" = ebpf ] && [ "$(field "$stats" ops.write.ios)" = 512 ] \
    && [ "$(field "$stats" ops.write.bytes)" = $((512 * 4096)) ] \
    || fail "expected 512 writes (2 MiB) counted by eBPF: $stats"
  ok "ublkml agent stats: eBPF counted the 512 writes to $bdev"
  state=$("$VENV/bin/ublkml" agent status)
  echo "    agent status: source $(field "$state" source), pins $(field "$state" pin_dir)"
  "$VENV/bin/ublkml" agent unwatch "$name"
  "$VENV/bin/ublkml" agent stop
}

if [ "${1:-}" = "--devices" ]; then
  devices
  exit 0
fi

build=1 testbed=0
for arg in "$@"; do
  case $arg in
    --no-build) build=0 ;;
    --testbed) testbed=1 ;;
    *) echo "usage: $0 [--no-build] [--testbed]" >&2; exit 2 ;;
  esac
done

# ---- build and install ----------------------------------------------------------
if ((build)); then
  rm -rf "$WORK" "$VENV"
  mkdir -p "$WORK/src" "$WORK/dist"
  say "copying the checkout (as a clone plus uncommitted changes) to $WORK/src"
  git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$WORK/src" -xf -
  say "building the wheel with pip wheel in a fresh venv"
  "$PYTHON" -m venv "$WORK/build-venv"
  (cd "$WORK/src" && "$WORK/build-venv/bin/pip" wheel -q --no-deps -w "$WORK/dist" .) \
    || fail "pip wheel"
  say "installing it into a fresh venv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$WORK"/dist/ublkml-*.whl || fail "pip install of the wheel"
fi
[ -x "$VENV/bin/ublkml" ] || fail "$VENV has no ublkml (run without --no-build)"

# ---- checks from outside the source tree ------------------------------------------
cd /tmp
unset PYTHONPATH
PY="$VENV/bin/python"
if ((build)); then
  wheel=$(ls "$WORK"/dist/ublkml-*.whl)
  say "wheel $(basename "$wheel"):"
  "$PY" - "$wheel" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
want = ["kernel_agent/bpf/blkacct.bpf.o", "kernel_agent/bpf/blkacct.bpf.c",
        "kernel_agent/bpf/recocheck.bpf.o", "kernel_agent/bpf/recocheck.bpf.c",
        "ublkml-0.1.0.dist-info/licenses/LICENSE", "ublk_driver/py.typed"]
for n in names:
    if not n.endswith(".py"):
        print("   ", n)
missing = [w for w in want if w not in names]
if not any(n.startswith("ublk_driver/_ublkml_cffi") and n.endswith(".so") for n in names):
    missing.append("ublk_driver/_ublkml_cffi*.so")
sys.exit(f"missing from the wheel: {missing}" if missing else 0)
EOF
  ok "the wheel carries the extension, the eBPF objects and LICENSE"
fi

"$PY" - <<'EOF' || fail "metadata"
from importlib.metadata import metadata
m = metadata("ublkml")
for k in ("Name", "Version", "License-Expression", "License-File", "Requires-Python"):
    print(f"    {k}: {m.get(k)}")
assert m["Name"] == "ublkml" and m["License-Expression"], "name or licence missing"
EOF
ok "metadata"

"$PY" -c 'import ublk_driver, kernel_agent, sys; [print("   ", m.__file__) for m in (ublk_driver, kernel_agent)]; sys.exit(0 if ublk_driver.__file__.startswith(sys.prefix) else "imported from outside the venv")' \
  || fail "ublkml is imported from outside $VENV"
echo "    ublkml --version: $("$VENV/bin/ublkml" --version)"

help=$("$VENV/bin/ublkml" --help)
"$PY" - "$help" <<'EOF' || fail "ublkml --help"
import sys
from importlib.metadata import entry_points
commands = sorted(ep.name for ep in entry_points(group="ublkml.commands"))
listed = {line.split()[0] for line in sys.argv[1].splitlines() if line.startswith("    ")}
missing = [c for c in commands if c not in listed]
print("    commands:", " ".join(commands))
sys.exit(f"not in ublkml --help: {missing}" if missing else 0)
EOF
ok "ublkml --help lists every command entry point"

"$VENV/bin/ublkml" agent run --help >/dev/null || fail "ublkml agent run --help"
ok "ublkml agent run --help"

heavy=$("$PY" -X importtime "$VENV/bin/ublkml" add -t loop --help 2>&1 >/dev/null \
        | grep -E '\| +(numpy|onnxruntime)(\.|$)' || true)
[ -z "$heavy" ] || fail "ublkml add -t loop --help imports the ML stack: $heavy"
ok "ublkml add -t loop --help imports neither numpy nor onnxruntime"

"$PY" - <<'EOF' || fail "the agent's eBPF object"
import importlib.resources as r
from kernel_agent.accounting import OBJECT_PATH, bpf_unavailable_reason
obj = r.files("kernel_agent") / "bpf" / "blkacct.bpf.o"
print("    ", obj, "exists" if obj.is_file() else "MISSING")
assert obj.is_file() and str(obj) == str(OBJECT_PATH), OBJECT_PATH
print("     eBPF here:", bpf_unavailable_reason() or "usable")
EOF
ok "the agent finds its eBPF object in site-packages"

if [ "$(id -u)" = 0 ]; then
  say "the agent from the wheel, on a loop device"
  export UBLKML_AGENT_DIR="$WORK/agent"
  loopfile=$(mktemp /tmp/ublkml-wheel-loop.XXXXXX)
  truncate -s 64M "$loopfile"
  loopdev=$(losetup -f --show "$loopfile")
  trap '"$VENV/bin/ublkml" agent stop >/dev/null 2>&1 || true; losetup -d "$loopdev"; rm -f "$loopfile"' EXIT
  agent_counts "$loopdev"
  unset UBLKML_AGENT_DIR
else
  say "not root: the agent's eBPF run is skipped"
fi

# ---- ublk devices -------------------------------------------------------------------
if [ -e /dev/ublk-control ]; then
  say "ublk devices from the wheel, natively"
  bash "$SELF" --devices
elif ((testbed)); then
  say "ublk devices from the wheel, in the test bed"
  "$REPO/.venv/bin/ublkml" vm run --timeout 1800 -- env VENV="$VENV" bash "$SELF" --devices \
    || fail "in the test bed"
else
  say "no ublk here: run with --testbed for ublkml add and the agent on a ublk device"
fi
say "all checks passed"
