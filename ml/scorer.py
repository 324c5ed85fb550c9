"""The scorer thread of a live device: completion records in, path verdicts out.

Every ``interval_s`` (100 ms) the thread takes the tick's per-path
summaries: from the counts the queue threads keep (``Server.read_summaries``,
``ServerConfig.summaries``: no per-I/O work in Python, the difference of two
reads), else by draining the completion records (``Server.read_completions``)
and folding them (:func:`ml.features.summarize`).  It keeps a sliding window of the last
``window_ticks`` ticks as a running sum (add the new tick, subtract the one
that fell out), and scores every path with enough completions in one
onnxruntime call: per path per window, never per I/O.  The window also never
spans more than ``window_ticks * interval_s`` (1 s) of time plus the newest
tick: on a starved machine ticks come late (in the loaded test bed 2-5 a
second instead of 10), and a window of 10 late ticks would hold several
seconds of old completions and slow every verdict down.

The thread never stops the device: every error (a model that fails, a
callback that raises, a state file that cannot be written) is logged and
counted, and the next tick runs.  Hot-swapping: :meth:`Scorer.swap_model`
validates a model before it replaces the current one, and refuses one that
needs features the per-path summaries lack (:func:`check_model`); with a
``dev_id`` the thread also watches ``$UBLKML_STATE_DIR/<dev_id>.model`` (written by
``ublkml model use``) and swaps when its mtime changes.  The latest verdicts
are in :meth:`Scorer.verdicts` and in ``$UBLKML_STATE_DIR/<dev_id>.verdicts.json``.

Hooks: ``on_verdict(path, score, flagged)`` after each scoring
(recommendations), ``on_records(records)`` with each drained batch (recording
labelled runs: the records can only be drained once, so a recorder taps here),
``on_tick(verdicts)`` at the end of every tick, even one without records (the
leg policy's chores: :mod:`ml.legpolicy`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ml.features import (
    FEATURE_NAMES,
    NOT_IN_RECORDS,
    Summary,
    select,
    summarize,
    summary_features,
    summary_from_counts,
)
from ml.model import REFERENCE_MODELS, Model, ModelError, load_model, reference_model
from ublk_driver.core.priority import raise_thread_priority
from ublk_driver.records import COMPLETION_DTYPE

log = logging.getLogger("ublkml.ml.scorer")

DEFAULT_INTERVAL_S = 0.1
DEFAULT_WINDOW_TICKS = 10
DEFAULT_MIN_COMPLETIONS = 32


def state_dir() -> str:
    """Where device state lives, as ublk_driver.server decides it."""
    return os.environ.get("UBLKML_STATE_DIR", "/run/ublkml")


def model_file(dev_id: int, directory: str | None = None) -> str:
    """The file ``ublkml model use`` writes and the scorer watches."""
    return os.path.join(directory or state_dir(), f"{dev_id}.model")


def verdicts_file(dev_id: int, directory: str | None = None) -> str:
    return os.path.join(directory or state_dir(), f"{dev_id}.verdicts.json")


def check_model(model: Model) -> Model:
    """``model`` if the scorer can feed it; else :class:`ModelError`, one line.

    The scorer has per-path summaries (counts, latency histograms), not the
    per-interval throughput samples that the ``fit_*`` features fit latency
    against (:data:`ml.features.NOT_IN_RECORDS`): those columns would be NaN in
    every window, and the model's verdicts meaningless.
    """
    if model.kind != "fail_slow":
        raise ModelError(f"{model.info.path}: a {model.kind} model; the scorer needs "
                         "a fail_slow model")
    missing = [n for n in model.features if n in NOT_IN_RECORDS]
    if missing:
        raise ModelError(f"{model.info.path}: needs {', '.join(missing)}, which the "
                         "scorer's per-path summaries do not have (a drive-telemetry model, "
                         "for `ublkml ml detect` and `ublkml monitor`); use a per-path "
                         f"model such as the packaged {REFERENCE_MODELS['fail_slow']}")
    return model


def load_scorer_model(path: str | None = None) -> Model:
    """The fail_slow model at ``path`` (None: the packaged one), if the scorer can
    feed it (:func:`check_model`)."""
    if path is None:
        return check_model(reference_model("fail_slow"))
    return check_model(load_model(path, expect_kind="fail_slow"))


class CompletionSource(Protocol):
    def read_completions(self, max_per_queue: int = ...) -> npt.NDArray[Any]: ...


class SummarySource(Protocol):
    def read_summaries(self) -> npt.NDArray[Any] | None: ...


@dataclass(frozen=True)
class PathVerdict:
    """The latest verdict on one completion path."""

    path: int
    score: float
    flagged: bool
    completions: int       # in the window that was scored
    window_s: float
    time: float            # Unix time of the scoring
    model_version: str
    features: dict[str, float]


class Scorer:
    """Scores a device's completion paths with a fail-slow model, in a thread."""

    def __init__(self, source: CompletionSource, model: Model | str | None = None, *,
                 interval_s: float = DEFAULT_INTERVAL_S,
                 window_ticks: int = DEFAULT_WINDOW_TICKS,
                 min_completions: int = DEFAULT_MIN_COMPLETIONS,
                 dev_id: int | None = None, directory: str | None = None,
                 on_verdict: Callable[[int, float, bool], None] | None = None,
                 on_records: Callable[[npt.NDArray[Any]], None] | None = None,
                 on_tick: Callable[[list[PathVerdict]], None] | None = None,
                 state_interval_s: float = 1.0) -> None:
        if interval_s <= 0 or window_ticks < 1:
            raise ValueError("interval_s must be > 0 and window_ticks >= 1")
        self.source = source
        self._model = (load_scorer_model(model) if model is None or isinstance(model, str)
                       else check_model(model))
        self.interval_s = interval_s
        self.window_ticks = window_ticks
        self.window_s = window_ticks * interval_s
        self.min_completions = min_completions
        self.dev_id = dev_id
        self.directory = directory
        self.on_verdict = on_verdict
        self.on_records = on_records
        self.on_tick = on_tick
        self.state_interval_s = state_interval_s
        self._ring: collections.deque[tuple[Summary, float]] = collections.deque()
        self._window = Summary.empty()
        self._counts: npt.NDArray[Any] | None = None  # the engine's, at the last tick
        self._last_tick = time.monotonic()
        self._lock = threading.Lock()
        self._verdicts: dict[int, PathVerdict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._model_mtime: float | None = None
        self._state_written = 0.0
        self.model_error: str | None = None
        # Cost accounting: the scoring work (drain, summaries, features, model)
        # apart from what users hang on the hooks and the state file.
        self.consumed = 0
        self.ticks = 0
        self.scored_windows = 0
        self.scoring_ns = 0
        self.total_ns = 0
        self.errors = 0
        self._error_counts: collections.Counter[str] = collections.Counter()

    # ---- model ----------------------------------------------------------------

    @property
    def model(self) -> Model:
        return self._model

    def swap_model(self, path: str) -> Model:
        """Validate ``path`` (:func:`load_scorer_model`) and make it the model; on
        error the old one stays."""
        new = load_scorer_model(path)
        with self._lock:
            old, self._model = self._model, new
        log.info("scorer: model %s (version %s) replaces %s", new.info.path, new.info.version,
                 old.info.path)
        return new

    def _poll_model_file(self) -> None:
        if self.dev_id is None:
            return
        path = model_file(self.dev_id, self.directory)
        try:
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            return
        if mtime == self._model_mtime:
            return
        self._model_mtime = mtime
        with open(path) as f:
            target = f.read().strip()
        try:
            self.swap_model(target)
            self.model_error = None
        except ModelError as e:
            self.model_error = str(e)
            raise

    # ---- one tick ----------------------------------------------------------------

    def _error(self, what: str, e: BaseException) -> None:
        self.errors += 1
        key = f"{what}: {e}"
        self._error_counts[key] += 1
        n = self._error_counts[key]
        if n == 1 or n % 100 == 0:  # no log storm at 10 ticks per second
            log.error("scorer: %s (%d times)", key, n)

    def tick(self) -> list[PathVerdict]:
        """Drain, update the window and score it; the thread calls this."""
        t0 = time.perf_counter_ns()
        out: list[PathVerdict] = []
        try:
            self._poll_model_file()  # first, so that a new model scores this tick
        except Exception as e:
            self._error("model swap refused", e)
        try:
            out = self._tick(t0)
        except Exception as e:
            self._error("tick failed", e)
        try:
            self._maybe_write_state()
        except Exception as e:
            self._error("cannot write the state file", e)
        self.total_ns += time.perf_counter_ns() - t0
        self.ticks += 1
        return out

    def _tick_summary(self) -> tuple[Summary, npt.NDArray[Any]]:
        """This tick's completions: from the engine's per-path counts when the
        source keeps them (no per-I/O work here), else from its records."""
        counts = None
        reader = getattr(self.source, "read_summaries", None)
        if reader is not None:
            counts = reader()
        if counts is None:
            recs = self.source.read_completions()
            return summarize(recs), recs
        recs = (self.source.read_completions() if self.on_records is not None
                else np.empty(0, dtype=COMPLETION_DTYPE))
        prev, self._counts = self._counts, counts.copy()
        if prev is not None:
            for name in ("n", "errors", "bytes", "lat_sum", "lat_sumsq", "hist"):
                counts[name] -= prev[name]
        return summary_from_counts(counts), recs

    def _tick(self, t0: int) -> list[PathVerdict]:
        s, recs = self._tick_summary()
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        self._ring.append((s, elapsed))
        self._window.add(s)
        duration = sum(e for _, e in self._ring)
        # Drop the oldest tick while the window has too many ticks, or while
        # the others alone cover window_s (late ticks: keep about window_s).
        while len(self._ring) > self.window_ticks or (
                len(self._ring) > 1 and duration - self._ring[0][1] >= self.window_s):
            old, e = self._ring.popleft()
            self._window.subtract(old)
            duration -= e
        self.consumed += int(s.n.sum())
        paths, x = summary_features(self._window, max(duration, 1e-3), self.min_completions)
        model = self._model
        verdicts: list[PathVerdict] = []
        if paths.size:
            scores, flags = model.predict(select(x, model.features))
            self.scored_windows += 1
            wall = time.time()
            verdicts = [PathVerdict(int(p), float(scores[i]), bool(flags[i]),
                                    int(self._window.n[p]), duration, wall, model.info.version,
                                    {n: float(v) for n, v in zip(FEATURE_NAMES, x[i],
                                                                 strict=True)
                                     if not np.isnan(v)})
                        for i, p in enumerate(paths)]
            with self._lock:
                for v in verdicts:
                    self._verdicts[v.path] = v
        self.scoring_ns += time.perf_counter_ns() - t0
        if self.on_records is not None and recs.shape[0]:
            try:
                self.on_records(recs)
            except Exception as e:
                self._error("on_records hook failed", e)
        if self.on_verdict is not None:
            for v in verdicts:
                try:
                    self.on_verdict(v.path, v.score, v.flagged)
                except Exception as e:
                    self._error("on_verdict hook failed", e)
        if self.on_tick is not None:
            try:
                self.on_tick(verdicts)
            except Exception as e:
                self._error("on_tick hook failed", e)
        return verdicts

    # ---- results ------------------------------------------------------------------

    def verdicts(self) -> dict[int, PathVerdict]:
        """The latest verdict per path."""
        with self._lock:
            return dict(self._verdicts)

    def stats(self) -> dict[str, Any]:
        """Counters and the amortised cost per completion."""
        per = self.scoring_ns / self.consumed if self.consumed else None
        return {"consumed": self.consumed, "ticks": self.ticks,
                "scored_windows": self.scored_windows, "errors": self.errors,
                "scoring_ns_per_completion": per,
                "total_ns_per_completion": self.total_ns / self.consumed
                if self.consumed else None,
                "dropped": self._dropped()}

    def _dropped(self) -> int | None:
        fn = getattr(self.source, "records_dropped", None)
        try:
            return int(fn()) if fn is not None else None
        except Exception:
            return None

    def snapshot(self) -> dict[str, Any]:
        """What the state file holds."""
        return {"dev_id": self.dev_id, "updated": time.time(),
                "model": self._model.info.as_dict(), "model_error": self.model_error,
                "stats": self.stats(),
                "verdicts": [asdict(v) for v in sorted(self.verdicts().values(),
                                                       key=lambda v: v.path)]}

    def _maybe_write_state(self, force: bool = False) -> None:
        if self.dev_id is None:
            return
        now = time.monotonic()
        if not force and now - self._state_written < self.state_interval_s:
            return
        self._state_written = now
        path = verdicts_file(self.dev_id, self.directory)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, path)

    # ---- thread -----------------------------------------------------------------

    def start(self) -> Scorer:
        if self._thread is not None:
            raise RuntimeError("scorer already started")
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ublkml-scorer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # Ticks on a fixed period (a tick's own time is not added to the
        # wait), but with a rest of at least half a period after a tick that
        # overran: no catch-up burst, and a starved machine is not starved
        # further by a scorer ticking back to back.
        why = raise_thread_priority()
        if why is not None:
            log.warning("scorer: %s", why)
        due = time.monotonic()
        while True:
            now = time.monotonic()
            due = max(due + self.interval_s, now + self.interval_s / 2)
            if self._stop.wait(due - now):
                return
            self.tick()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after a last tick (so that nothing drained is left out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.tick()
        with contextlib.suppress(Exception):
            self._maybe_write_state(force=True)

    def __enter__(self) -> Scorer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
