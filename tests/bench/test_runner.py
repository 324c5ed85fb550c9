"""bench.runner without a kernel: the plan, the failure handling, the test-bed round trip.

The devices and fio are replaced by stand-ins here; test_vm.py runs the real thing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import runner
from bench.cli import config_from
from bench.jobs import WORKLOADS
from bench.runner import (
    DEVICES,
    GROUPS,
    BenchConfig,
    BenchError,
    Case,
    Context,
    Handle,
    MissingToolError,
    cpu_profile,
    estimate_seconds,
    plan_cases,
)
from ublk_driver.core import cli
from ublk_driver.scratch import ScratchUnavailableError
from ublk_driver.testbed import where


def parse(argv: list[str]) -> argparse.Namespace:
    """``ublkml bench ARGV``'s arguments, as the one parser tree gives them."""
    return cli.build_parser(["bench"]).parse_args(["bench", *argv])


def config(argv: list[str]) -> BenchConfig:
    return config_from(parse(argv))


def test_full_plan() -> None:
    cases = plan_cases(quick=False)
    compared = [d for d in DEVICES if d.group != "overhead"]
    overhead = [d for d in DEVICES if d.group == "overhead"]
    na = [c for c in cases if not c.applicable]
    # Only the kernel loop lacks a second hardware queue.
    assert {(c.device.name, c.queues) for c in na} == {("kernel-loop", 2)}
    # The goals' cases run GOAL_ROUNDS_FULL times (an n/a case is recorded once).
    repeated = sum(1 for d in compared for w, q in runner.GOAL_CASES
                   if (d.name, q) != ("kernel-loop", 2))
    assert len(cases) == (len(compared) * len(WORKLOADS) * 2
                          + repeated * (runner.GOAL_ROUNDS_FULL - 1)
                          + len(overhead) * runner.OVERHEAD_ROUNDS_FULL)
    for c in cases:
        if c.device.group == "overhead":
            continue
        goal_case = (c.workload.name, c.queues) in runner.GOAL_CASES and c.applicable
        assert c.repeated == goal_case
        assert c.round < (runner.GOAL_ROUNDS_FULL if goal_case else 1)
    # Group by group, queue count, workload; the baseline right before ublkml.
    order = [(c.device.group, c.queues, c.workload.name, c.round, c.device.name)
             for c in cases if c.device.group != "overhead"]
    # Rounds of a goal case: the pair's order reversed every other round.
    assert order == sorted(order, key=lambda t: (
        GROUPS.index(t[0]), t[1], [w.name for w in WORKLOADS].index(t[2]), t[3],
        [d.name for d in DEVICES].index(t[4]) * (-1 if t[3] % 2 else 1)))
    # The overhead group round by round, each round in its own order (a Williams
    # design): in the first n rounds of n devices every device takes every place
    # once, and follows every other device once.
    rounds: dict[int, list[str]] = {}
    for c in cases:
        if c.device.group == "overhead":
            rounds.setdefault(c.round, []).append(c.device.name)
    assert sorted(rounds) == list(range(runner.OVERHEAD_ROUNDS_FULL))
    assert all(sorted(names) == sorted(d.name for d in overhead) for names in rounds.values())
    n = len(overhead)
    assert n == 4 and n <= runner.OVERHEAD_ROUNDS_FULL
    first = [rounds[r] for r in range(n)]
    for place in range(n):
        assert {names[place] for names in first} == {d.name for d in overhead}
    neighbours = [(a, b) for names in first for a, b in itertools.pairwise(names)]
    assert len(set(neighbours)) == len(neighbours) == n * (n - 1)
    # Rounds of a goal case: side-by-side pairs, the order reversed every other round.
    assert [c.title for c in cases[:5]] == ["null_blk 4k randread QD1 q1 round 1",
                                            "ublkml-null 4k randread QD1 q1 round 1",
                                            "ublkml-null 4k randread QD1 q1 round 2",
                                            "null_blk 4k randread QD1 q1 round 2",
                                            "null_blk 4k randread QD1 q1 round 3"]
    assert cases[6].title == "null_blk 4k randread QD32 q1 round 1"
    assert plan_cases(quick=False, goal_rounds=1)[1].title == "ublkml-null 4k randread QD1 q1"


def test_time_budget() -> None:
    """The full run's estimate stays under 45 min of VM time (the python group
    has threads and processes; the goals' cases run 3 rounds; each of the
    monitor's overhead rounds starts a Python process with onnxruntime, about
    25 s under TCG; the estimate is pessimistic), --quick within 6 min with boot."""
    full = estimate_seconds(plan_cases(quick=False), runner.FULL_RUNTIME, runner.FULL_RAMP)
    quick = estimate_seconds(plan_cases(quick=True), runner.QUICK_RUNTIME, runner.QUICK_RAMP)
    assert 15 * 60 <= full <= 45 * 60
    assert quick + 60 <= 6 * 60


def test_quick_plan_and_skip() -> None:
    quick = plan_cases(quick=True)
    assert {c.device.group for c in quick} == set(GROUPS)
    assert all(c.workload.name == "4k-randread-qd32" for c in quick)
    assert {c.queues for c in quick} == {1, 2}
    skipped = plan_cases(quick=True, skip=["python", "loop"])
    assert {c.device.group for c in skipped} == {"null", "overhead"}
    assert {c.device.group for c in plan_cases(quick=True, skip=["overhead"])} == {
        "null", "loop", "python"}
    assert parse(["--skip", "overhead"]).skip == ["overhead"]


def test_overhead_plan_alternates_off_and_on_round_by_round() -> None:
    cases = [c for c in plan_cases(quick=True) if c.device.group == "overhead"]
    assert [d.name for d in DEVICES if d.group == "overhead"] == [
        "ublkml-null-off", "ublkml-null-acct", "ublkml-null-score", "ublkml-null-monitor"]
    assert len(cases) == 4 * runner.OVERHEAD_ROUNDS_QUICK >= 12
    assert [c.title for c in cases[:5]] == [
        "ublkml-null-off 4k randread QD32 q1 round 1",
        "ublkml-null-acct 4k randread QD32 q1 round 1",
        "ublkml-null-monitor 4k randread QD32 q1 round 1",
        "ublkml-null-score 4k randread QD32 q1 round 1",
        "ublkml-null-acct 4k randread QD32 q1 round 2"]
    assert all(c.queues == 1 and c.workload.name == "4k-randread-qd32" for c in cases)
    # The group runs last: every other group's devices are gone by then.
    assert plan_cases(quick=True)[-len(cases):] == cases


def test_parser_and_forwarding() -> None:
    args = config(["--quick", "--skip", "python", "--runtime", "3", "--profile", "--out", "x"])
    assert args.to_args() == ["--quick", "--skip", "python", "--runtime", "3", "--profile"]
    assert args.timing() == (3.0, runner.QUICK_RAMP)
    with pytest.raises(SystemExit):
        parse(["--skip", "nonsense"])


def test_missing_tool_names_the_debian_package() -> None:
    e = MissingToolError("losetup")
    assert "install the Debian package mount" in str(e)
    e = MissingToolError("nbdkit python plug-in", "nbdkit-plugin-python")
    assert "apt-get install nbdkit-plugin-python" in str(e)


def test_main_without_fio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    assert cli.main(["bench", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fio not found: install the Debian package fio" in err


def test_cpu_profile() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    before = {1: ("python", 0, 0), 2: ("iou-wrk", 10, 10)}
    after = {1: ("python", 2 * tick, tick), 2: ("iou-wrk", 10, 10 + tick), 3: ("new", 0, 0)}
    p = cpu_profile(before, after, wall=4.0, iops=1000.0)
    assert (p["user_s"], p["sys_s"]) == (2.0, 2.0)
    assert p["cpu_util"] == 1.0
    assert p["cpu_us_per_io"] == 1000.0  # 4 CPU seconds for 4000 I/Os
    assert p["threads"][0] == {"tid": 1, "name": "python", "user_s": 2.0, "sys_s": 1.0}


def test_task_cpu_reads_our_threads() -> None:
    threads = runner._task_cpu(os.getpid())
    assert os.getpid() in threads
    name, ut, st = threads[os.getpid()]
    assert ut >= 0 and st >= 0 and name
    assert runner._task_cpu(2**22 + 12345) == {}


def test_backing_file(tmp_path: Path) -> None:
    info = runner.create_backing_file(tmp_path / "f.img", 2 << 20)
    assert info["size"] == 2 << 20
    assert (tmp_path / "f.img").stat().st_size == 2 << 20
    assert isinstance(info["o_direct"], bool)
    data = (tmp_path / "f.img").read_bytes()
    assert data.count(0) < len(data) // 2  # written with data, not a sparse file


# ---- the measuring loop, with stand-ins for devices and fio -------------------


class FakeLab:
    """Records set-ups and tear-downs; fails where told to."""

    def __init__(self, fail_setup: set[tuple[str, int]] | None = None,
                 fail_measure: set[str] | None = None) -> None:
        self.fail_setup = fail_setup or set()
        self.fail_measure = fail_measure or set()
        self.live: list[str] = []
        self.log: list[str] = []
        self.accounting: list[str] = []
        self.monitor: list[str] = []

    @contextlib.contextmanager
    def device(self, spec: runner.DeviceSpec, queues: int, ctx: Context) -> Iterator[Handle]:
        name = f"{spec.name}/q{queues}"
        if (spec.name, queues) in self.fail_setup:
            raise BenchError("modprobe null_blk failed (exit 1): no such module")
        self.live.append(name)
        self.log.append(f"up {name}")
        try:
            yield Handle(f"/dev/fake-{spec.name}", {"hw_queues": queues}, pid=os.getpid())
        finally:
            self.live.remove(name)
            self.log.append(f"down {name}")

    def measure(self, case: Case, handle: Handle, ctx: Context, *, runtime: float,
                ramp: float, profile: bool) -> dict[str, Any]:
        # The accounting and monitor rounds measure the plain device (programs
        # attached, or the monitor watching it).
        measured = "ublkml-null-off" if case.device.name in (
            "ublkml-null-acct", "ublkml-null-monitor") else case.device.name
        assert handle.path == f"/dev/fake-{measured}"
        if case.title in self.fail_measure:
            raise RuntimeError("something unexpected")
        iops = 1000.0 * (2 if case.device.role == "ublkml" else 1)
        return {"fio_version": "fio-3.33", "iops": iops, "bw_bytes": iops * 4096,
                "bw_mib_s": iops * 4096 / 2**20, "total_ios": 10,
                "lat_us": {"p50": 1.0, "p99": 2.0, "p99.9": 3.0, "mean": 1.0},
                "fio_cpu": {"usr": 1.0, "sys": 1.0}}


def _fake_env(monkeypatch: pytest.MonkeyPatch, lab: FakeLab) -> None:
    monkeypatch.setattr(runner, "open_device", lab.device)
    monkeypatch.setattr(runner, "measure_case", lab.measure)
    monkeypatch.setattr(runner, "_preflight", lambda spec: None)
    monkeypatch.setattr(runner, "LOOP_BYTES", 1 << 20)
    monkeypatch.setattr(runner, "_fio_version", lambda: "fio-3.33")
    lab.accounting = []

    @contextlib.contextmanager
    def accounting(path: str) -> Iterator[dict[str, Any]]:
        # The loop's bookkeeping only: the real attach is measured in test_vm.py.
        assert lab.live == ["ublkml-null-off/q1", "ublkml-null-score/q1"]
        lab.accounting.append(path)
        yield {"attach": "stand-in", "ios_counted": 10}

    monkeypatch.setattr(runner, "accounting_attached", accounting)
    lab.monitor = []

    @contextlib.contextmanager
    def monitor(path: str, **kw: Any) -> Iterator[dict[str, Any]]:
        # The loop's bookkeeping only: the real monitor is run by
        # test_monitor_running_watches_a_real_loop_device.
        assert lab.live == ["ublkml-null-off/q1", "ublkml-null-score/q1"]
        assert str(kw["log_path"]).endswith(f"logs/monitor-r{len(lab.monitor) + 1}.log")
        lab.monitor.append(path)
        yield {"source": "stand-in", "ticks": 3, "samples": 3}

    monkeypatch.setattr(runner, "monitor_running", monitor)

    def bpf_cost(case: Any, handle: Any, ctx: Any, **kw: Any) -> dict[str, Any]:
        # bpf_stats needs the real programs (measured by test_vm.py's quick run).
        assert case.device.name == "ublkml-null-off"
        return {"programs": {"ka_btf_complete": {"run_time_ns": 500, "run_cnt": 10}},
                "ios": 10, "ns_per_io": 50.0, "iops": 2000.0, "cpu_share": 1e-4}

    monkeypatch.setattr(runner, "bpf_cost", bpf_cost)

    @contextlib.contextmanager
    def no_brd(mountpoint: Path, size: int) -> Iterator[dict[str, Any]]:
        # Never load brd or run mkfs on the machine running the unit tests.
        raise ScratchUnavailableError("brd not loaded in unit tests")
        yield {}

    monkeypatch.setattr(runner, "ram_ext4", no_brd)


def test_measure_records_failures_and_tears_everything_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    lab = FakeLab(fail_setup={("null_blk", 2)},
                  fail_measure={"ublkml-python 4k randread QD32 q1"})
    _fake_env(monkeypatch, lab)
    args = config(["--quick", "--in-vm"])
    doc, code = runner.measure(args, tmp_path)
    assert code == 1
    assert lab.live == []  # every device torn down
    assert lab.log.count("up ublkml-python/q1") == lab.log.count("down ublkml-python/q1") == 1
    assert len(doc["results"]) == len(plan_cases(quick=True))
    by = {(r["device"], r["queues"]): r for r in doc["results"]}
    assert by[("null_blk", 2)]["status"] == "error"
    assert "setting up null_blk with 2 queue(s): modprobe null_blk failed" in \
        by[("null_blk", 2)]["error"]
    assert by[("ublkml-python", 1)]["error"] == "RuntimeError: something unexpected"
    # ... and the run went on after both failures.
    assert by[("ublkml-null", 2)]["status"] == "ok"
    assert by[("nbdkit-python", 1)]["status"] == "ok"
    assert by[("ublkml-null", 1)]["iops"] == 2000.0
    assert by[("ublkml-null", 1)]["fio_version"] == "fio-3.33"
    assert by[("ublkml-null", 1)]["environment"] in ("vm", "native")
    # results.json on disk is the same document.
    assert json.loads((tmp_path / "results.json").read_text()) == doc
    assert doc["meta"]["loop_backing"]["size"] == 1 << 20
    err = capsys.readouterr().err
    assert "[1/20] null_blk 4k randread QD32 q1 ... 1,000 IOPS" in err
    # The overhead group: the accounting rounds measure the plain device with
    # the programs attached; one set-up of each device for all the rounds.
    acct = [r for r in doc["results"] if r["device"] == "ublkml-null-acct"]
    assert [r["round"] for r in acct] == [0, 1, 2]
    assert all(r["accounting"] == {"attach": "stand-in", "ios_counted": 10} for r in acct)
    assert lab.accounting == ["/dev/fake-ublkml-null-off"] * 3
    # ... and so do the monitor rounds, with the monitor watching it.
    mon = [r for r in doc["results"] if r["device"] == "ublkml-null-monitor"]
    assert [r["round"] for r in mon] == [0, 1, 2]
    assert all(r["status"] == "ok" and r["monitor"]["source"] == "stand-in" for r in mon)
    assert all("accounting" not in r for r in mon)
    assert lab.monitor == ["/dev/fake-ublkml-null-off"] * 3
    assert lab.log.count("up ublkml-null-off/q1") == 1
    assert "up ublkml-null-acct/q1" not in lab.log
    assert "up ublkml-null-monitor/q1" not in lab.log
    assert doc["meta"]["overhead_rounds"] == 3
    assert doc["meta"]["bpf_cost"]["ns_per_io"] == 50.0
    assert doc["meta"]["loop_backing"]["fallback"] == "brd not loaded in unit tests"
    assert "ERROR: RuntimeError: something unexpected" in err


def test_a_monitor_that_fails_fails_its_round_only(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    lab = FakeLab()
    _fake_env(monkeypatch, lab)
    calls: list[str] = []

    @contextlib.contextmanager
    def monitor(path: str, **kw: Any) -> Iterator[dict[str, Any]]:
        # A stand-in that refuses its second round, as monitor_running does when
        # the monitor samples the drive from sysfs.
        calls.append(path)
        if len(calls) == 2:
            raise BenchError("the monitor samples ublkb0 from sysfs, not eBPF: no BTF")
        yield {"source": "stand-in", "samples": 3}

    monkeypatch.setattr(runner, "monitor_running", monitor)
    doc, code = runner.measure(config(["--quick", "--in-vm", "--skip", "null", "--skip",
                                       "loop", "--skip", "python"]), tmp_path)
    assert code == 1
    mon = {r["round"]: r for r in doc["results"] if r["device"] == "ublkml-null-monitor"}
    assert [mon[n]["status"] for n in range(3)] == ["ok", "error", "ok"]
    assert mon[1]["error"] == "the monitor samples ublkb0 from sysfs, not eBPF: no BTF"
    assert all(r["status"] == "ok" for r in doc["results"]
               if r["device"] != "ublkml-null-monitor")
    assert lab.live == []


def _losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_monitor_running_watches_a_real_loop_device(tmp_path: Path) -> None:
    """The real ``ublkml monitor run`` (eBPF, nice -10) on a loop device on the host:
    with fio reading during the block it reports ticks and intervals with I/O;
    without I/O the block is an error ("on" would not have been on); either way
    the monitor is stopped and its state directory removed."""
    if os.geteuid() != 0:
        pytest.fail("monitor_running's host test needs root (loop devices, eBPF)")
    from kernel_agent.accounting import bpf_unavailable_reason

    if reason := bpf_unavailable_reason():
        pytest.fail(f"eBPF accounting is not usable here: {reason}")
    fio = shutil.which("fio")
    if fio is None:
        pytest.fail("fio is missing (scripts/setup.sh installs it)")
    img = tmp_path / "drive.img"
    img.write_bytes(os.urandom(8 << 20))
    dev = _losetup("-f", "--show", str(img))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    try:
        log = tmp_path / "logs" / "monitor.log"
        with runner.monitor_running(dev, log_path=log, scratch=scratch) as mon:
            pid = int(mon["pid"])
            assert mon["start_s"] < runner.MONITOR_START_TIMEOUT
            subprocess.run([fio, "--name=r", f"--filename={dev}", "--rw=randread",
                            "--bs=4k", "--direct=1", "--ioengine=psync", "--time_based",
                            "--runtime=2.5", "--output=/dev/null"], check=True)
        assert not os.path.exists(f"/proc/{pid}")  # stopped (and reaped)
        assert mon["exit"] == 0
        assert (mon["drive"], mon["source"], mon["nice"]) == (
            os.path.basename(dev), "ebpf", -10)
        assert mon["ticks"] >= 2 and mon["samples"] >= 2
        assert mon["tick_ms_p50"] > 0 and mon["cpu_s"] >= 0
        assert "watching 1 drive(s)" in log.read_text()
        with pytest.raises(BenchError, match=f"the monitor saw no I/O on "
                           f"{os.path.basename(dev)} during the measurement"), \
                runner.monitor_running(dev, scratch=scratch):
            pass
        assert list(scratch.iterdir()) == []  # the monitors' state directories are gone
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_measure_marks_single_queue_devices_na(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lab = FakeLab()
    _fake_env(monkeypatch, lab)
    monkeypatch.setattr(runner, "WORKLOADS", WORKLOADS[:1])
    monkeypatch.setattr(runner, "plan_cases", lambda quick, skip=(), rounds=None,
                        goal_rounds=None: [
        c for c in plan_cases(quick=False, skip=["null", "python", "overhead"], goal_rounds=1)
        if c.workload.name == "4k-randread-qd1"])
    args = config(["--in-vm"])
    doc, code = runner.measure(args, tmp_path)
    assert code == 0
    kl2 = next(r for r in doc["results"] if r["device"] == "kernel-loop" and r["queues"] == 2)
    assert kl2["status"] == "n/a"
    assert "single hardware queue" in kl2["reason"]
    assert "up kernel-loop/q2" not in lab.log


def test_interrupt_keeps_partial_results(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lab = FakeLab()
    _fake_env(monkeypatch, lab)
    calls = []

    def measure(case: Case, handle: Handle, ctx: Context, **kw: Any) -> dict[str, Any]:
        calls.append(case)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return lab.measure(case, handle, ctx, **kw)

    monkeypatch.setattr(runner, "measure_case", measure)
    doc, code = runner.measure(config(["--quick", "--in-vm"]), tmp_path)
    assert code == 130
    assert doc["meta"]["interrupted"] is True
    assert len(doc["results"]) == 2
    assert lab.live == []


def test_host_runs_everything_in_one_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Without /dev/ublk-control: one testbed.run, then the report on the host."""
    from ublk_driver import testbed

    boots: list[dict[str, Any]] = []

    def fake_run(argv: list[str], **kw: Any) -> testbed.VmResult:
        boots.append({"argv": argv, **kw})
        outdir = Path(kw["share"])
        assert argv[1:5] == ["-m", "ublk_driver", "bench", "--in-vm"]
        from tests.bench.test_report import make_doc

        (outdir / "results.json").write_text(json.dumps(make_doc()))
        return testbed.VmResult(returncode=0, output="guest says hi", boot_seconds=5.0,
                                total_seconds=60.0, share_dir=str(outdir))

    monkeypatch.setattr(runner, "_which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(where, "native_ublk_available", lambda: False)
    monkeypatch.setattr(where, "in_vm", lambda: False)
    monkeypatch.setattr(where, "run", fake_run)
    out = tmp_path / "out"
    code = cli.main(["bench", "--quick", "--skip", "python", "--out", str(out), "--json"])
    assert code == 0
    assert len(boots) == 1
    assert boots[0]["share"] == str(out)
    assert boots[0]["argv"][-3:] == ["--quick", "--skip", "python"]
    printed = json.loads(capsys.readouterr().out)
    assert printed["meta"]["vm"]["total_s"] == 60.0
    assert printed["meta"]["host"]["other_qemu_before"] >= 0
    assert (out / "logs" / "vm-console.log").read_text() == "guest says hi"
    assert "## Targets" in (out / "report.md").read_text()


def test_host_reports_a_failed_test_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from ublk_driver import testbed

    def broken(argv: list[str], **kw: Any) -> testbed.VmResult:
        raise testbed.TestbedError("qemu-system-x86_64 not found", output="")

    monkeypatch.setattr(runner, "_which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(where, "native_ublk_available", lambda: False)
    monkeypatch.setattr(where, "in_vm", lambda: False)
    monkeypatch.setattr(where, "run", broken)
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 125
    assert "the test bed failed: qemu-system-x86_64 not found" in capsys.readouterr().err


def test_package_main_is_lazy() -> None:
    import subprocess
    import sys

    # nbdkit's interpreter imports bench.ramstore: that must not load the runner.
    code = ("import sys, bench.ramstore; "
            "assert 'bench.runner' not in sys.modules, 'runner imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])


def test_noise_sampler() -> None:
    with runner.NoiseSampler(interval=0.01) as sampler:
        import time

        time.sleep(0.05)
    summary = sampler.summary()
    assert summary["samples"] >= 2
    assert summary["other_qemu_max"] >= 0
    assert 0.0 <= summary["other_qemu_share"] <= 1.0
    assert summary["loadavg_max"] >= summary["loadavg_mean"] >= 0
    assert runner.NoiseSampler().summary() == {}
