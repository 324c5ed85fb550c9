"""``ublkml bench engine-ab``: the C engines of two checkouts, side by side in one boot.

Two source trees (``--before DIR --after DIR``), each a checkout of this
repository with its cffi engine built in place, are measured against the same
kernel baselines as ``ublkml bench``'s null and loop groups, in one sitting:

* ``null_blk``: the kernel's null_blk (:func:`bench.runner.null_blk_device`);
* ``ublkml-null-before``, ``ublkml-null-after``: ``ublkml add -t null`` from each tree;
* ``kernel-loop``: the kernel loop with direct I/O (:func:`bench.runner.kernel_loop_device`);
* ``ublkml-loop-before``, ``ublkml-loop-after``: ``ublkml add -t loop`` from each tree,
  on the same backing file.

A device "from a tree" is ``python -m ublk_driver add ...`` run with the tree
as its working directory and as ``PYTHONPATH`` (ahead of the editable
install), and deleted by the same tree's ``del``.  Before and after each
measurement the server's ``/proc/PID/maps`` must show that tree's compiled
engine, else the measurement is an error, not a figure.

All six devices are live for the whole run (an idle device costs nothing: its
server sleeps in io_uring_enter).  Each round measures the two fio jobs of the
benchmark's goals (:mod:`bench.jobs`: 4k randread QD32 and QD1, one queue) on
every device, one job after the other (their order alternates between
rounds), the devices of a job in the order of a row of a Williams design
(:func:`bench.runner._williams_row`): over six rounds every device takes every
place once and follows every other device once, so a drift in the machine's
speed weighs on every device alike.

The ratios are computed as ``ublkml bench`` computes its goals: the median of
the rounds' IOPS of the ublkml device over the median of the kernel device's
(:func:`summarize`), for each tree; after/before is the ratio of the two
ratios, and also the two trees' median IOPS directly.

Where: here as root when the kernel has ublk, else re-run in one boot of the
test bed (:mod:`ublk_driver.testbed.where`), which sees the host's file
system, trees included; the guest writes ``results.json`` into ``--out`` and
the host checks that neither tree's engine changed meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.machinery
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import runner
from bench.jobs import FioError, workload_by_name
from bench.report import ratio
from bench.runner import (
    DEPTH,
    FULL_RAMP,
    FULL_RUNTIME,
    LOOP_BYTES,
    LOOP_FS_BYTES,
    NULL_GB,
    BenchError,
    Case,
    Context,
    DeviceSpec,
    Handle,
    say,
)
from ublk_driver.core.cli import CliError, Subparsers, UsageError, int_in, seconds_in
from ublk_driver.scratch import ScratchUnavailableError, ram_ext4, with_sbin
from ublk_driver.testbed.where import needs_testbed, run_in_testbed

__all__ = [
    "DEFAULT_ROUNDS",
    "LABELS",
    "SLOTS",
    "AbError",
    "Step",
    "Tree",
    "check_mapping",
    "check_tree",
    "format_table",
    "mapped_engines",
    "measure",
    "plan",
    "register",
    "summarize",
]

SCHEMA_VERSION = 1
#: The two trees, in the order the table shows them.
LABELS = ("before", "after")
KINDS = ("null", "loop")
BASELINES = {"null": "null_blk", "loop": "kernel-loop"}
#: The jobs of ``ublkml bench``'s goals, one queue each.
WORKLOAD_NAMES = ("4k-randread-qd32", "4k-randread-qd1")
QUEUES = 1
DEFAULT_ROUNDS = 5


def ublkml_name(kind: str, label: str) -> str:
    """``ublkml-null-before``: the device of target ``kind`` served from tree ``label``."""
    return f"ublkml-{kind}-{label}"


#: Every device of a round; a row of the Williams design permutes them.
SLOTS: tuple[str, ...] = tuple(
    name for kind in KINDS
    for name in (BASELINES[kind], *(ublkml_name(kind, label) for label in LABELS)))

#: The compiled engine's file name, without its extension suffix.
ENGINE_STEM = "_ublkml_cffi"
#: What the engine is built from: a compiled engine older than any of them is stale.
ENGINE_SOURCES = ("ublk_driver/csrc/*.c", "ublk_driver/csrc/*.h", "ublk_driver/_build.py")
#: Seconds to set up the shared backing file (written with random data under TCG).
_BACKING_OVERHEAD = 30.0


class AbError(BenchError):
    """A tree that cannot be compared, or a device whose engine cannot be verified."""


# ---------------------------------------------------------------------------
# The trees
# ---------------------------------------------------------------------------


def _build_hint(path: Path) -> str:
    return f"cd {path} && {sys.executable} setup.py build_ext --inplace"


@dataclass(frozen=True)
class Tree:
    """A checkout whose compiled engine is measured."""

    label: str
    path: Path
    engine: Path
    """The compiled engine Python imports from this tree (the first extension suffix found)."""

    @property
    def engine_dir(self) -> Path:
        return self.path / "ublk_driver"

    def sha256(self) -> str:
        return hashlib.sha256(self.engine.read_bytes()).hexdigest()

    def info(self) -> dict[str, Any]:
        """What the results say about the tree: commit, changed files, the engine's hash."""
        return {"path": str(self.path), "commit": _git(self.path, "rev-parse", "HEAD"),
                "dirty": (_git(self.path, "status", "--porcelain", "--untracked-files=no")
                          or "").splitlines(),
                "engine": {"path": str(self.engine), "sha256": self.sha256(),
                           "size": self.engine.stat().st_size}}

    def env(self) -> dict[str, str]:
        """The environment of this tree's ``ublkml``: the tree alone on PYTHONPATH, so
        that it comes before the editable install, and sbin on PATH."""
        env = with_sbin(dict(os.environ))
        env["PYTHONPATH"] = str(self.path)
        return env


def _git(path: Path, *args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              timeout=30, check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def check_tree(label: str, directory: str | Path) -> Tree:
    """The tree at ``directory``, or :class:`AbError` saying what to do about it."""
    path = Path(directory).resolve()
    if not path.is_dir():
        raise AbError(f"--{label} {directory}: no such directory")
    if not (path / "ublk_driver" / "__init__.py").is_file() or \
            not (path / "ublk_driver" / "csrc").is_dir():
        raise AbError(f"--{label} {path}: not a checkout of ublkml (no ublk_driver/csrc)")
    engines = [path / "ublk_driver" / (ENGINE_STEM + suffix)
               for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    engine = next((e for e in engines if e.is_file()), None)
    if engine is None:
        raise AbError(f"--{label} {path}: no compiled engine (ublk_driver/{ENGINE_STEM}*.so); "
                      f"build it in place: {_build_hint(path)}")
    sources = [s for pattern in ENGINE_SOURCES for s in path.glob(pattern)]
    newest = max(sources, key=lambda s: s.stat().st_mtime, default=None)
    if newest is not None and newest.stat().st_mtime > engine.stat().st_mtime:
        raise AbError(f"--{label} {path}: the compiled engine is older than "
                      f"{newest.relative_to(path)}; rebuild it: {_build_hint(path)}")
    return Tree(label, path, engine)


def check_trees(before: str | Path, after: str | Path) -> tuple[Tree, Tree]:
    """Both trees checked; the same directory twice is a usage error."""
    trees = check_tree("before", before), check_tree("after", after)
    if trees[0].path == trees[1].path:
        raise UsageError(f"--before and --after are the same tree ({trees[0].path})")
    return trees


# ---------------------------------------------------------------------------
# Which engine a server runs
# ---------------------------------------------------------------------------


def mapped_engines(maps: str) -> list[str]:
    """The compiled engines a process has mapped, from its ``/proc/PID/maps`` text
    (each path once, in order; a replaced file keeps its `` (deleted)`` mark)."""
    out: list[str] = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        path = fields[5]
        name = os.path.basename(path.removesuffix(" (deleted)"))
        if name.startswith(ENGINE_STEM) and name.endswith(".so") and path not in out:
            out.append(path)
    return out


def check_mapping(paths: Sequence[str], tree: Tree, pid: int) -> str:
    """The one engine mapped (``paths``) if it is ``tree``'s, else :class:`AbError`."""
    if not paths:
        raise AbError(f"server {pid} has no compiled engine mapped: cannot tell which tree "
                      "it runs")
    if len(paths) > 1:
        raise AbError(f"server {pid} has {len(paths)} engines mapped ({', '.join(paths)})")
    path = paths[0]
    if path.endswith(" (deleted)"):
        raise AbError(f"server {pid} runs an engine that has since been replaced ({path}): "
                      f"the {tree.label} tree was rebuilt during the run")
    if Path(path) != tree.engine:
        raise AbError(f"server {pid} runs {path}, not the {tree.label} tree's engine "
                      f"({tree.engine})")
    return path


def verify_engine(pid: int, tree: Tree) -> str:
    """The path of ``tree``'s engine as server ``pid`` maps it; :class:`AbError` if the
    server is gone or runs anything else."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as e:
        raise AbError(f"cannot read the maps of server {pid} ({e.strerror}): "
                      "it is gone") from None
    return check_mapping(mapped_engines(maps), tree, pid)


# ---------------------------------------------------------------------------
# Devices from a tree
# ---------------------------------------------------------------------------


def _tree_ublkml(tree: Tree, args: Sequence[str], what: str,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m ublk_driver ARGS`` from ``tree``; a failure is one-line :class:`BenchError`."""
    return runner._sh([sys.executable, "-m", "ublk_driver", *args],
                      what=f"{what} ({tree.label} tree)", timeout=180, check=check,
                      cwd=tree.path, env=tree.env())


def add_args(kind: str, loop_file: Path | None) -> list[str]:
    """``ublkml add``'s options for a device of target ``kind``: as ``ublkml bench``'s."""
    q = ["-q", str(QUEUES), "-d", str(DEPTH)]
    if kind == "null":
        return ["-t", "null", "--size", f"{NULL_GB}G", *q]
    if loop_file is None:
        raise ValueError("a loop device needs the backing file")
    return ["-t", "loop", "-f", str(loop_file), *q]


@contextlib.contextmanager
def tree_device(tree: Tree, args: Sequence[str]) -> Iterator[Handle]:
    """``ublkml add ARGS --json`` from ``tree``, its engine verified; the same tree's
    ``ublkml del`` when done."""
    what = "ublkml add " + " ".join(args)
    proc = _tree_ublkml(tree, ["add", *args, "--json"], what)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        info = json.loads(lines[-1])
        dev_id, pid, path = int(info["dev_id"]), int(info["pid"]), str(info["bdev"])
    except (IndexError, KeyError, TypeError, ValueError):
        raise AbError(f"{what} ({tree.label} tree) printed no device description: "
                      f"{proc.stdout.strip()!r}") from None
    try:
        runner._wait_for(lambda: os.path.exists(path), 10, path)
        attrs = {k: info[k] for k in ("dev_id", "target", "queues", "depth", "block_size",
                                      "size", "direct_io", "backing", "scheduler")
                 if k in info}
        attrs.update(hw_queues=runner._hw_queues(path), tree=tree.label,
                     engine_mapped=verify_engine(pid, tree))
        yield Handle(path, attrs, pid=pid)
    finally:
        try:
            _tree_ublkml(tree, ["del", "-n", str(dev_id)], "ublkml del")
        except BenchError as e:
            say(f"warning: {e}")


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One measurement: a fio job on a device, in a round."""

    round: int
    workload: str
    device: str


def plan(rounds: int) -> list[Step]:
    """Every measurement in order: per round both jobs (alternating which comes first),
    each on every device in the order of row ``round`` of a Williams design."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    steps: list[Step] = []
    for r in range(rounds):
        order = [SLOTS[i] for i in runner._williams_row(len(SLOTS), r)]
        jobs = WORKLOAD_NAMES if r % 2 == 0 else WORKLOAD_NAMES[::-1]
        steps += [Step(r, w, d) for w in jobs for d in order]
    return steps


def estimate_seconds(rounds: int, runtime: float, ramp: float) -> float:
    """Rough wall time of a run (boot excluded)."""
    return (len(plan(rounds)) * (runtime + ramp + runner._CASE_OVERHEAD)
            + len(SLOTS) * runner._SETUP_OVERHEAD + _BACKING_OVERHEAD)


def _spec(name: str) -> DeviceSpec:
    """The device ``name`` of :data:`SLOTS` (the kernel ones are the benchmark's)."""
    for kind in KINDS:
        for label in LABELS:
            if name == ublkml_name(kind, label):
                return DeviceSpec(name, kind, "ublkml", BASELINES[kind], QUEUES, (),
                                  " ".join(["ublkml", *add_args(kind, Path("FILE"))])
                                  + f" from the {label} tree")
    return runner.device_by_name(name)


def _tree_of(device: str) -> str | None:
    return next((label for label in LABELS if device.endswith("-" + label)
                 and device.startswith("ublkml-")), None)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def _short(workload: str) -> str:
    """``qd32`` for ``4k-randread-qd32``."""
    return workload.rsplit("-", 1)[-1]


def _by_round(results: Sequence[Mapping[str, Any]], device: str,
              workload: str) -> dict[int, Mapping[str, Any]]:
    return {int(r["round"]): r for r in results if r.get("status") == "ok"
            and r["device"] == device and r["workload"] == workload}


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _round_ratios(a: Mapping[int, Mapping[str, Any]], b: Mapping[int, Mapping[str, Any]]
                  ) -> list[float]:
    """IOPS a / b of every round both have (taken in the same round, minutes apart)."""
    out = []
    for n in sorted(a.keys() & b.keys()):
        if (x := ratio(float(a[n]["iops"]), float(b[n]["iops"]))) is not None:
            out.append(x)
    return out


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"per_round": [round(v, 4) for v in values],
            "min": min(values, default=None), "max": max(values, default=None),
            "median": _median(values)}


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians of the rounds and the ratios, from the records of a run.

    ``medians[device][workload]``: median IOPS and p99 (us) over the rounds that
    succeeded, and each round's figure.  ``comparisons["null-qd32"]`` (and
    ``null-qd1``, ``loop-qd32``, ``loop-qd1``): for each tree the ratio
    ublkml / kernel of the median IOPS (as ``ublkml bench``'s goals), with the
    rounds' own ratios as the spread; ``after_over_before``: the ratio of the two
    ratios, and the two trees' median IOPS and p99 compared directly.  A figure
    no round gave is None.
    """
    medians: dict[str, dict[str, Any]] = {}
    for device in SLOTS:
        for w in WORKLOAD_NAMES:
            rounds = _by_round(results, device, w)
            iops = [float(rounds[n]["iops"]) for n in sorted(rounds)]
            p99 = [float(rounds[n]["lat_us"]["p99"]) for n in sorted(rounds)]
            medians.setdefault(device, {})[w] = {
                "rounds_ok": len(rounds), "iops": _median(iops), "p99_us": _median(p99),
                "iops_per_round": iops, "p99_us_per_round": p99}
    comparisons: dict[str, Any] = {}
    for kind in KINDS:
        base = BASELINES[kind]
        for w in WORKLOAD_NAMES:
            entry: dict[str, Any] = {"kind": kind, "workload": w, "baseline": base}
            base_rounds = _by_round(results, base, w)
            for label in LABELS:
                dev = ublkml_name(kind, label)
                entry[label] = {
                    "device": dev,
                    "ratio": ratio(medians[dev][w]["iops"], medians[base][w]["iops"]),
                    "round_ratios": _spread(_round_ratios(_by_round(results, dev, w),
                                                          base_rounds))}
            before, after = (ublkml_name(kind, label) for label in LABELS)
            entry["after_over_before"] = {
                "ratio": ratio(entry["after"]["ratio"], entry["before"]["ratio"]),
                "iops": ratio(medians[after][w]["iops"], medians[before][w]["iops"]),
                "p99": ratio(medians[after][w]["p99_us"], medians[before][w]["p99_us"]),
                "round_iops": _spread(_round_ratios(_by_round(results, after, w),
                                                    _by_round(results, before, w)))}
            comparisons[f"{kind}-{_short(w)}"] = entry
    return {"medians": medians, "comparisons": comparisons}


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_table(summary: Mapping[str, Any], rounds: int | None = None) -> str:
    """The medians and ratios as a short text table (the JSON has the rest)."""
    head = ("case", "kernel IOPS", "before IOPS", "after IOPS", "before/kern",
            "after/kern", "after/before", "rounds (after/before IOPS)")
    rows = [head]
    lat = [("case", "kernel p99", "before p99", "after p99", "after/before p99")]
    for key, c in summary["comparisons"].items():
        med = summary["medians"]
        w = c["workload"]
        kern, bef, aft = (med[d][w] for d in (c["baseline"], c["before"]["device"],
                                              c["after"]["device"]))
        ab = c["after_over_before"]
        spread = ab["round_iops"]["per_round"]
        rows.append((key, _f(kern["iops"], ",.0f"), _f(bef["iops"], ",.0f"),
                     _f(aft["iops"], ",.0f"), _f(c["before"]["ratio"], ".3f"),
                     _f(c["after"]["ratio"], ".3f"), _f(ab["ratio"], ".3f"),
                     " ".join(f"{v:.2f}" for v in spread) or "n/a"))
        lat.append((key, _f(kern["p99_us"], ",.0f"), _f(bef["p99_us"], ",.0f"),
                    _f(aft["p99_us"], ",.0f"), _f(ab["p99"], ".3f")))
    title = ("medians" + (f" of {rounds} rounds" if rounds else "")
             + "; ratios: ublkml IOPS / kernel IOPS (medians), 4k randread, 1 queue")
    return "\n".join([title, *_columns(rows), "", "p99 latency (us, medians):",
                      *_columns(lat)]) + "\n"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(wd) if i in (0, len(row) - 1) else cell.rjust(wd)
                      for i, (cell, wd) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


# ---------------------------------------------------------------------------
# The run (here: root and ublk)
# ---------------------------------------------------------------------------


class _AbRun:
    """The results document of one run, rewritten after every measurement."""

    def __init__(self, trees: Sequence[Tree], rounds: int, runtime: float, ramp: float,
                 outdir: Path) -> None:
        self.trees = {t.label: t for t in trees}
        self.runtime, self.ramp = runtime, ramp
        self.steps = plan(rounds)
        self.path = outdir / "results.json"
        self.code = 0
        env = runner._environment()
        self.meta: dict[str, Any] = {
            "kind": "engine-ab", "schema": SCHEMA_VERSION, "date": runner._now(),
            "rounds": rounds, "runtime_s": runtime, "ramp_s": ramp,
            "workloads": list(WORKLOAD_NAMES), "queues": QUEUES,
            "order": "per round both jobs (alternating first), devices in a Williams row",
            "fio_version": runner._fio_version(), **env,
            "devices": {name: _spec(name).description for name in SLOTS}}
        self.doc: dict[str, Any] = {
            "meta": self.meta, "trees": {t.label: t.info() for t in trees},
            "results": [], "summary": {}}

    def save(self) -> None:
        self.doc["summary"] = summarize(self.doc["results"])
        runner._write_json(self.path, self.doc)

    def setup(self, stack: contextlib.ExitStack, ctx: Context) -> dict[str, Handle]:
        """Every device of :data:`SLOTS`, live until ``stack`` closes."""
        directory = ctx.scratch
        try:
            fs = stack.enter_context(ram_ext4(ctx.scratch / "loopfs", LOOP_FS_BYTES))
            directory = ctx.scratch / "loopfs"
        except ScratchUnavailableError as e:
            say(f"warning: no ext4 on brd for the loop devices ({e}); using tmpfs")
            fs = {"fallback": str(e)}
        ctx.loop_file = directory / "loop-backing.img"
        ctx.loop_file_info = {**runner.create_backing_file(ctx.loop_file, LOOP_BYTES), **fs}
        self.meta["loop_backing"] = ctx.loop_file_info
        handles = {"null_blk": stack.enter_context(runner.null_blk_device(QUEUES, ctx)),
                   "kernel-loop": stack.enter_context(runner.kernel_loop_device(QUEUES, ctx))}
        for kind in KINDS:
            for label in LABELS:
                name = ublkml_name(kind, label)
                say(f"setting up {name} from {self.trees[label].path}")
                handles[name] = stack.enter_context(
                    tree_device(self.trees[label], add_args(kind, ctx.loop_file)))
        self.meta["device_attrs"] = {n: h.attrs for n, h in handles.items()}
        self.save()
        return handles

    def one(self, index: int, step: Step, handle: Handle, ctx: Context) -> None:
        """Measure one step; an error (the engine unverified included) is recorded."""
        spec = _spec(step.device)
        label = _tree_of(step.device)
        w = workload_by_name(step.workload)
        rec: dict[str, Any] = {
            "round": step.round, "device": step.device, "kind": spec.group,
            "role": spec.role, "tree": label, "workload": w.name, "label": w.label,
            "queues": QUEUES, "date": runner._now(), "scheduler": runner._scheduler(handle.path)}
        print(f"[{index}/{len(self.steps)}] round {step.round + 1} {step.device} {w.label} ... ",
              end="", file=sys.stderr, flush=True)
        try:
            tree = self.trees[label] if label else None
            if tree is not None:
                assert handle.pid is not None
                verify_engine(handle.pid, tree)
            figures = runner.measure_case(Case(spec, w, QUEUES, step.round, repeated=True),
                                          handle, ctx, runtime=self.runtime, ramp=self.ramp,
                                          profile=False)
            if tree is not None:
                assert handle.pid is not None
                rec["engine_mapped"] = verify_engine(handle.pid, tree)
            rec.update(status="ok", **figures)
        except (BenchError, FioError, OSError) as e:
            rec.update(status="error", error=str(e))
        if rec["status"] == "ok":
            print(f"{rec['iops']:,.0f} IOPS, p99 {rec['lat_us']['p99']:,.1f} us",
                  file=sys.stderr, flush=True)
        else:
            self.code = 1
            print(f"ERROR: {rec['error']}", file=sys.stderr, flush=True)
        self.doc["results"].append(rec)
        self.save()


def measure(trees: Sequence[Tree], rounds: int, runtime: float, ramp: float,
            outdir: Path) -> tuple[dict[str, Any], int]:
    """Measure here (root, ublk); (results document, exit status)."""
    run = _AbRun(trees, rounds, runtime, ramp, outdir)
    say(f"{len(run.steps)} measurements ({runtime:g} s + {ramp:g} s ramp each), about "
        f"{estimate_seconds(rounds, runtime, ramp) / 60:.0f} min, on "
        f"{run.meta['environment']} kernel {run.meta['kernel']}")
    old_term = signal.signal(signal.SIGTERM, runner._on_sigterm)
    scratch = Path(tempfile.mkdtemp(prefix="ublkml-engine-ab-", dir=runner._tmpfs_dir()))
    try:
        ctx = Context(outdir=outdir, scratch=scratch)
        with contextlib.ExitStack() as stack:
            handles = run.setup(stack, ctx)
            for i, step in enumerate(run.steps, 1):
                run.one(i, step, handles[step.device], ctx)
    except (KeyboardInterrupt, runner._Terminated):
        run.meta["interrupted"] = True
        say("interrupted: devices torn down, partial results kept")
        run.code = 130
    except (BenchError, OSError) as e:
        run.meta["error"] = str(e)
        say(f"error: {e}")
        run.code = 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(scratch, ignore_errors=True)
        run.save()
    return run.doc, run.code


# ---------------------------------------------------------------------------
# Host side: one boot of the test bed
# ---------------------------------------------------------------------------


def check_unchanged(doc: Mapping[str, Any], trees: Sequence[Tree]) -> list[str]:
    """Why the measured engines are not the trees' engines now (rebuilt during the
    run, or a different tree), one line each; empty when they are."""
    problems = []
    for tree in trees:
        seen = (((doc.get("trees") or {}).get(tree.label) or {}).get("engine") or {})
        if seen.get("sha256") != tree.sha256():
            problems.append(f"the {tree.label} tree's engine ({tree.engine}) is not the one "
                            "measured: it was rebuilt during the run")
    return problems


def run_in_vm(trees: Sequence[Tree], rounds: int, runtime: float, ramp: float, outdir: Path,
              timeout: float | None) -> tuple[dict[str, Any] | None, int]:
    """Measure in one boot of the test bed; (results document or None, exit status)."""
    estimate = estimate_seconds(rounds, runtime, ramp) + runner._BOOT_OVERHEAD
    host: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                            "loadavg_before": list(os.getloadavg())}
    args = ["--before", str(trees[0].path), "--after", str(trees[1].path),
            "--rounds", str(rounds), "--runtime", f"{runtime:g}", "--ramp", f"{ramp:g}",
            "--out", str(outdir)]
    with runner.NoiseSampler() as sampler:
        vm = run_in_testbed(["bench", "engine-ab"], args, share=outdir,
                            doing="measuring two engines side by side", estimate_s=estimate,
                            timeout=timeout or max(900.0, 2.5 * estimate + 300),
                            memory_mb=runner.VM_MEMORY_MB, cpus=runner.VM_CPUS,
                            stream=sys.stderr, console_log=outdir / "logs" / "vm-console.log",
                            cwd=runner.REPO_ROOT, say=say)
    if vm.error is not None:
        say(f"error: {vm.failure()}")
    else:
        (outdir / "logs" / "vm-dmesg.log").write_text(vm.kernel_log)
        host.update(vm_boot_s=vm.boot_seconds, vm_total_s=vm.total_seconds)
    host.update(loadavg_after=list(os.getloadavg()), during=sampler.summary())
    path = outdir / "results.json"
    if not path.exists():
        say(f"the guest wrote no {path}")
        return None, vm.code or 1
    doc: dict[str, Any] = json.loads(path.read_text())
    doc["meta"]["host"] = host
    code = vm.code
    problems = check_unchanged(doc, trees)
    if problems:
        doc["meta"]["error"] = "; ".join(problems)
        for p in problems:
            say(f"error: {p}")
        code = code or 1
    runner._write_json(path, doc)
    return doc, code


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


_positive_int = int_in("rounds", 1, 100)


_seconds = seconds_in("seconds", 0, 3600)


def cmd_engine_ab(args: argparse.Namespace) -> int:
    """Exit status: 0 every measurement succeeded; 1 a tree, a device or a measurement
    failed (recorded); 2 usage or no fio; 125 the test bed failed; 130 interrupted."""
    if args.runtime <= 0:
        raise UsageError("--runtime must be positive")
    try:
        trees = check_trees(args.before, args.after)
        runner.check_tool("fio")
    except BenchError as e:
        raise CliError(str(e), 2 if isinstance(e, runner.MissingToolError) else 1) from None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out or Path("results") / f"engine-ab-{stamp}").resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    if needs_testbed(args.in_vm):
        doc, code = run_in_vm(trees, args.rounds, args.runtime, args.ramp, outdir,
                              args.vm_timeout)
    else:
        if os.geteuid() != 0:
            raise CliError("the A/B run creates block devices and loads modules: run it as "
                           "root", 2)
        doc, code = measure(trees, args.rounds, args.runtime, args.ramp, outdir)
    if doc is None or args.in_vm:
        return code  # the host prints, from the results the guest wrote
    table = format_table(doc["summary"], doc["meta"].get("rounds"))
    (outdir / "table.txt").write_text(table)
    say(f"results: {outdir / 'results.json'}")
    print(json.dumps(doc, indent=2) if args.json else table, end="" if not args.json else "\n")
    return code


def register(verbs: Subparsers) -> None:
    """Add ``engine-ab`` to ``ublkml bench``'s sub-commands."""
    p = verbs.add_parser(
        "engine-ab", help="compare the C engines of two checkouts side by side (one boot)",
        description="Measure the ublkml null and loop targets of two checkouts (--before, "
                    "--after; each with its engine built in place) against the kernel's "
                    "null_blk and loop, all six devices live at once, in rounds (4k "
                    "randread QD32 and QD1, 1 queue; devices in a rotating balanced "
                    "order), in one sitting: here as root where /dev/ublk-control exists, "
                    "else in one boot of the qemu test bed. Each ublkml device runs `python "
                    "-m ublk_driver add` from its tree (cwd and PYTHONPATH), and every "
                    "measurement checks in /proc/PID/maps that its server runs that tree's "
                    "engine. Writes results.json (every round, medians, ratios ublkml/kernel "
                    "per tree and after/before) and table.txt.",
        epilog="Prepare a tree: `git worktree add --detach DIR COMMIT`, then build its "
               "engine in place: `cd DIR && python setup.py build_ext --inplace` (the "
               "project's venv python). See docs/benchmarks.md, Engine A/B.")
    p.add_argument("--before", required=True, metavar="DIR",
                   help="the checkout measured as 'before' (its engine built in place)")
    p.add_argument("--after", required=True, metavar="DIR",
                   help="the checkout measured as 'after' (its engine built in place)")
    p.add_argument("--rounds", type=_positive_int, default=DEFAULT_ROUNDS, metavar="N",
                   help=f"rounds; every round measures every device with both jobs "
                        f"(default {DEFAULT_ROUNDS}); the ratios compare medians of rounds")
    p.add_argument("--runtime", type=_seconds, default=FULL_RUNTIME, metavar="S",
                   help=f"seconds measured per job (default {FULL_RUNTIME:g}); a run is "
                        "about 12 x rounds x (runtime + ramp + 4 s) plus the boot")
    p.add_argument("--ramp", type=_seconds, default=FULL_RAMP, metavar="S",
                   help=f"seconds of warm-up per job, not counted (default {FULL_RAMP:g})")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: results/engine-ab-<timestamp>)")
    p.add_argument("--json", action="store_true",
                   help="print results.json on stdout instead of the table")
    p.add_argument("--vm-timeout", type=float, metavar="S",
                   help="kill the test bed after S seconds (default: from the estimate)")
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_engine_ab)


if __name__ == "__main__":
    from ublk_driver.core.cli import main

    sys.exit(main(["bench", "engine-ab", *sys.argv[1:]]))
