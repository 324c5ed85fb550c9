"""The recommendation round trip on a host loop device: eBPF checker vs Python validator.

``python -m kernel_agent.roundtrip [-n 500] [--paths ebpf,python] [--tick-only] [--json]``

For each path it starts the agent as its own process (``python -m kernel_agent
run``; ``--no-bpf-checker`` for the Python path) on a fresh state dir, watches
a new 64 MiB loop device in *recommend* mode, registers this process as an
``ml-extension`` holding the device's lease (through
:class:`kernel_agent.link.ExtensionLink`, which picks the path as any extension
does), and then, one at a time, submits a ``read_ahead_kb`` recommendation
and waits for its answer (RECOMMENDED) on the extension's ring.  The time from
before the submission to the answer read back is one round trip: submit ->
kernel or Python check -> the agent's user-space check -> answer.  The class's
rate limit is lifted in the state dir's ``limits.json`` so that every record is
judged on its merits.

The extension polls its completion ring every ~50 us, so a round trip is
over-stated by up to that.  ``--tick-only`` removes the agent's wake-up FIFO
(``<state dir>/wake``): the agent then finds records on its 50 ms tick alone.
Needs root (loop devices; the eBPF path needs CAP_BPF).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernel_agent.agent import read_agent_state
from kernel_agent.errors import AgentError
from kernel_agent.link import ExtensionLink
from kernel_agent.registry import Registry
from kernel_agent.ring import WAKE_NAME, Recommendation, Status
from ublk_driver import scratch

POLL_S = 50e-6


@contextlib.contextmanager
def loop_device(work: Path) -> Iterator[str]:
    """A 64 MiB loop device backed by a file in ``work`` (its name, e.g. 'loop3')."""
    img = work / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    try:
        with scratch.loop_device(img) as path:
            yield os.path.basename(path)
    except scratch.ScratchUnavailableError as e:
        raise AgentError(f"{e} (loop devices need root)") from None


@contextlib.contextmanager
def agent_process(root: Path, instance: str, python: bool) -> Iterator[dict[str, Any]]:
    """The agent in its own process; its agent.json once it is up."""
    env = dict(os.environ, UBLKML_AGENT_DIR=str(root))
    argv = [sys.executable, "-m", "kernel_agent", "run", "--instance", instance]
    if python:
        argv.append("--no-bpf-checker")
    with open(root / "agent.log", "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            state = read_agent_state(root)
            if state and state.get("pid") == proc.pid:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AgentError(f"the agent did not come up; see {root / 'agent.log'}")
            time.sleep(0.05)
        yield state
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(path: str, n: int, work: Path, device: str, tick_only: bool = False,
            warmup: int = 20) -> dict[str, Any]:
    """``n`` round trips on one path (``ebpf`` or ``python``); latencies in microseconds."""
    root = work / f"agent-{path}"
    root.mkdir()
    (root / "limits.json").write_text(json.dumps(
        {"ml-extension": {"rate_per_s": 1_000_000, "burst": 1_000_000}}))
    Registry(root).watch(device, "recommend")
    instance = f"rt{os.getpid()}{path}"
    with agent_process(root, instance, python=path == "python") as state:
        if tick_only:
            os.unlink(root / WAKE_NAME)
        link = ExtensionLink("ml-extension", str(root), retry_s=0)
        why = link.connect({"pid": str(os.getpid()), "model": "roundtrip", "device": device})
        if why is not None:
            raise AgentError(why)
        try:
            assert link.channel is not None
            got = link.checker.split(":")[0]
            if got != path:
                raise AgentError(f"asked for the {path} path, the extension got {link.checker}")
            times: list[float] = []
            statuses: dict[str, int] = {}
            for i in range(warmup + n):
                rec = Recommendation(device, "read_ahead_kb", str(128 + 4 * (i % 64)), 0.9,
                                     "roundtrip", 10_000, 0)
                t0 = time.perf_counter_ns()
                sent = link.channel.submit(rec)
                if sent is None:
                    raise AgentError("the submission queue is full")
                answer = None
                deadline = time.monotonic() + 5
                while answer is None:
                    for c in link.channel.completions():
                        if c.seq == sent.seq:
                            answer = c
                    if answer is None:
                        if time.monotonic() > deadline:
                            raise AgentError(f"no answer to seq {sent.seq} within 5 s")
                        time.sleep(POLL_S)
                dt = (time.perf_counter_ns() - t0) / 1000
                if i >= warmup:
                    times.append(dt)
                    statuses[answer.status.name.lower()] = \
                        statuses.get(answer.status.name.lower(), 0) + 1
                if answer.status is not Status.RECOMMENDED:
                    raise AgentError(f"expected RECOMMENDED, got {answer}")
        finally:
            link.close()
    return {"path": path, "checker": state.get("checker"), "wake": not tick_only, "n": n,
            "statuses": statuses, "p50_us": round(_percentile(times, 0.50), 1),
            "p99_us": round(_percentile(times, 0.99), 1),
            "mean_us": round(statistics.fmean(times), 1), "max_us": round(max(times), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernel_agent.roundtrip",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("-n", type=int, default=500, help="round trips per path (default 500)")
    p.add_argument("--paths", default="ebpf,python",
                   help="comma-separated: ebpf (rc_check), python (the validator)")
    p.add_argument("--tick-only", action="store_true",
                   help="no wake-up FIFO: the agent finds records on its 50 ms tick")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if not paths or set(paths) - {"ebpf", "python"} or args.n < 1:
        p.error("--paths takes ebpf and/or python; -n at least 1")
    if os.geteuid() != 0:
        print("error: needs root (a loop device; the eBPF checker needs CAP_BPF)",
              file=sys.stderr)
        return 1
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="ublkml-roundtrip-") as tmp, \
                loop_device(Path(tmp)) as dev:
            for path in paths:
                print(f"{path}: {args.n} round trips on {dev} ...", file=sys.stderr,
                      flush=True)
                results.append(measure(path, args.n, Path(tmp), dev, args.tick_only))
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"results": results}, indent=1))
    else:
        for r in results:
            print(f"{r['path']:<7} wake={'yes' if r['wake'] else 'no':<3} n={r['n']} "
                  f"p50 {r['p50_us']} us  p99 {r['p99_us']} us  mean {r['mean_us']} us  "
                  f"max {r['max_us']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
