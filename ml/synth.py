"""Synthetic, labelled drive data in the layouts of two public data sets.

No public data set is downloaded: these generators make data with the same
layout and the phenomena the detectors must cope with, from a seed.

Telemetry (Alibaba Perseus fail-slow layout)::

    DIR/<host>/<day>.csv       ts,disk_id,throughput,latency   (one row per drive and interval)
    DIR/labels.csv             host,disk_id                    (the fail-slow drives)
    DIR/injected.csv           host,disk_id,slowdown,onset_s,duty,throughput_factor

Units: ts in seconds (Unix time), throughput in bytes/s, latency in
microseconds.  Each host has its own workload (diurnal, with bursts) shared
unevenly by its drives, some much busier than others ("hot"); a drive's
latency grows with its load, with per-drive noise, and some healthy drives are
very noisy with short spikes.  A fail-slow drive is slower by a factor
(log-uniform in ``slowdown``) from an onset on, either continuously or in
episodes (``duty``: the fraction of time slow), and may serve less throughput
while slow.

SMART history (Backblaze daily layout)::

    DIR/<YYYY-MM-DD>.csv       date,serial_number,model,capacity_bytes,failure,
                               smart_N_normalized,smart_N_raw,...

A failing drive's last row has ``failure=1`` and it disappears afterwards;
most failing drives first accumulate reallocated / pending / uncorrectable
sectors and timeouts, some fail without warning; some healthy drives carry
small, stable error counts.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

EPOCH = 1704067200  # 2024-01-01T00:00:00Z: the generated data's first day


@dataclass(frozen=True)
class TelemetryConfig:
    """Knobs of the telemetry generator (ranges are sampled per host or drive)."""

    hosts: int = 60
    disks: tuple[int, int] = (8, 12)          # drives per host, inclusive
    days: int = 1
    interval_s: int = 60
    slow_fraction: float = 0.08               # of all drives
    slowdown: tuple[float, float] = (1.3, 8.0)  # log-uniform
    bursty_fraction: float = 0.5              # of slow drives: slow in episodes
    duty: tuple[float, float] = (0.2, 0.7)    # bursty drives: fraction of time slow
    episode_min: tuple[float, float] = (5.0, 40.0)  # bursty drives: mean episode length
    onset: tuple[float, float] = (0.0, 0.7)   # fraction of the period
    slow_tput_exponent: tuple[float, float] = (0.0, 0.5)  # throughput x slowdown^-e
    noisy_fraction: float = 0.15              # healthy drives with heavy noise and spikes
    imbalance: float = 0.3                    # sigma of the lognormal load share
    hot_fraction: float = 0.1                 # drives with 2-3x the load


#: ``train`` makes the reference model's training data; ``heldout`` is the
#: evaluation set: other seed, more hosts, wider drive counts, milder and
#: stronger slowdowns, more noise and imbalance, later onsets.
PRESETS: dict[str, TelemetryConfig] = {
    "train": TelemetryConfig(),
    "heldout": TelemetryConfig(hosts=40, disks=(6, 16), slowdown=(1.2, 10.0),
                               duty=(0.15, 0.8), episode_min=(3.0, 60.0), onset=(0.0, 0.8),
                               noisy_fraction=0.25, imbalance=0.45, hot_fraction=0.15),
    "small": TelemetryConfig(hosts=6, disks=(4, 8), slow_fraction=0.15),
}


def config_from(preset: str, **overrides: Any) -> TelemetryConfig:
    """A preset with some fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    names = {f.name for f in fields(TelemetryConfig)}
    return replace(PRESETS[preset],
                   **{k: v for k, v in overrides.items() if v is not None and k in names})


def _episodes(rng: np.random.Generator, n: int, mean_on: float, duty: float) -> npt.NDArray[
        np.bool_]:
    """An on/off state per sample, with geometric run lengths and the given duty."""
    mean_off = mean_on * (1 - duty) / duty
    state = np.zeros(n, dtype=np.bool_)
    t = int(rng.integers(0, max(int(mean_off), 1) + 1))  # start in an off run
    while t < n:
        on = int(rng.geometric(1 / max(mean_on, 1.0)))
        state[t:t + on] = True
        t += on + int(rng.geometric(1 / max(mean_off, 1.0)))
    return state


@dataclass(frozen=True)
class Injected:
    host: str
    disk_id: str
    slowdown: float
    onset_s: float
    duty: float
    throughput_factor: float


def _host(rng: np.random.Generator, cfg: TelemetryConfig, n_disks: int,
          slow: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                                                 list[tuple[int, float, float, float, float]]]:
    """(throughput, latency) as [disks, samples] for one host, and its faults."""
    n = cfg.days * 86400 // cfg.interval_s
    t = np.arange(n) * cfg.interval_s
    # The host's workload: a daily cycle, slow drift (AR(1)) and bursts.
    phase = rng.uniform(0, 2 * np.pi)
    ar = np.zeros(n)
    eps = rng.normal(0, 0.08, n)
    for i in range(1, n):
        ar[i] = 0.97 * ar[i - 1] + eps[i]
    bursts = np.where(rng.random(n) < 0.02, rng.uniform(1.5, 3.0, n), 1.0)
    load = (1 + 0.5 * np.sin(2 * np.pi * t / 86400 + phase)) * np.exp(ar) * bursts
    host_tput = rng.uniform(20e6, 150e6)
    share = rng.lognormal(0, cfg.imbalance, n_disks)
    hot = rng.random(n_disks) < cfg.hot_fraction
    share[hot] *= rng.uniform(2, 3, hot.sum())
    share /= share.mean()
    tput = host_tput * load[None, :] * share[:, None] * rng.lognormal(0, 0.15, (n_disks, n))
    # Latency grows with the drive's utilisation; HDD-like or SSD-like host.
    base = (rng.uniform(3000, 8000) if rng.random() < 0.5 else rng.uniform(100, 400))
    cap = host_tput * 4
    base_d = base * rng.lognormal(0, 0.1, n_disks)
    sigma = rng.uniform(0.08, 0.2, n_disks)
    noisy = (rng.random(n_disks) < cfg.noisy_fraction) & ~slow
    sigma[noisy] = rng.uniform(0.35, 0.6, noisy.sum())
    faults: list[tuple[int, float, float, float, float]] = []
    factor = np.ones((n_disks, n))
    tfactor = np.ones((n_disks, n))
    for d in np.flatnonzero(slow):
        f = float(np.exp(rng.uniform(np.log(cfg.slowdown[0]), np.log(cfg.slowdown[1]))))
        onset = int(rng.uniform(*cfg.onset) * n)
        if rng.random() < cfg.bursty_fraction:
            duty = float(rng.uniform(*cfg.duty))
            state = _episodes(rng, n, rng.uniform(*cfg.episode_min), duty)
        else:
            duty = 1.0
            state = np.ones(n, dtype=np.bool_)
        state[:onset] = False
        expo = float(rng.uniform(*cfg.slow_tput_exponent))
        factor[d, state] = f
        tfactor[d, state] = f ** -expo
        faults.append((int(d), f, float(onset * cfg.interval_s), duty, f ** -expo))
    tput *= tfactor
    lat = base_d[:, None] * (1 + 3 * tput / cap) * rng.lognormal(0, 1, (n_disks, n)) ** sigma[
        :, None]
    spikes = (rng.random((n_disks, n)) < 0.01) & noisy[:, None]
    lat = np.where(spikes, lat * rng.uniform(3, 15, (n_disks, n)), lat)
    lat *= factor
    return tput, lat, faults


def make_telemetry(out_dir: str, seed: int, cfg: TelemetryConfig | None = None,
                   progress: Any = None) -> list[Injected]:
    """Write a telemetry tree (see the module doc); returns the injected faults."""
    cfg = cfg or TelemetryConfig()
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    injected: list[Injected] = []
    per_day = 86400 // cfg.interval_s
    for h in range(cfg.hosts):
        host = f"host{h:03d}"
        n_disks = int(rng.integers(cfg.disks[0], cfg.disks[1] + 1))
        slow = rng.random(n_disks) < cfg.slow_fraction
        tput, lat, faults = _host(rng, cfg, n_disks, slow)
        disk_ids = [f"disk{d:02d}" for d in range(n_disks)]
        for d, slowdown, onset, duty, tf in faults:
            injected.append(Injected(host, disk_ids[d], slowdown, onset, duty, tf))
        os.makedirs(os.path.join(out_dir, host), exist_ok=True)
        for day in range(cfg.days):
            sl = slice(day * per_day, (day + 1) * per_day)
            ts = EPOCH + np.arange(sl.start, sl.stop) * cfg.interval_s
            name = _dt.datetime.fromtimestamp(int(ts[0]), _dt.UTC).strftime("%Y-%m-%d")
            tp, lt = tput[:, sl], lat[:, sl]
            lines = ["ts,disk_id,throughput,latency"]
            lines += [f"{ts[i]},{disk_ids[d]},{tp[d, i]:.0f},{lt[d, i]:.1f}"
                      for i in range(ts.size) for d in range(n_disks)]
            with open(os.path.join(out_dir, host, f"{name}.csv"), "w") as out:
                out.write("\n".join(lines) + "\n")
        if progress is not None:
            progress(h + 1, cfg.hosts)
    with open(os.path.join(out_dir, "labels.csv"), "w") as f:
        f.write("host,disk_id\n")
        f.writelines(f"{i.host},{i.disk_id}\n" for i in injected)
    with open(os.path.join(out_dir, "injected.csv"), "w") as f:
        f.write("host,disk_id,slowdown,onset_s,duty,throughput_factor\n")
        f.writelines(f"{i.host},{i.disk_id},{i.slowdown:.3f},{i.onset_s:.0f},{i.duty:.3f},"
                     f"{i.throughput_factor:.3f}\n" for i in injected)
    return injected


# ---- SMART history (Backblaze) ----------------------------------------------

#: attributes written, in Backblaze's column order (normalized, then raw)
SMART_IDS = (1, 5, 9, 187, 188, 194, 197, 198)


@dataclass(frozen=True)
class SmartConfig:
    drives: int = 400
    days: int = 90
    fail_fraction: float = 0.06
    silent_fraction: float = 0.3      # failing drives without any warning
    warning_days: tuple[int, int] = (3, 25)
    noisy_fraction: float = 0.05      # healthy drives with small stable error counts


SMART_PRESETS: dict[str, SmartConfig] = {
    "train": SmartConfig(),
    "heldout": SmartConfig(drives=500, days=120, fail_fraction=0.05, silent_fraction=0.35,
                           warning_days=(2, 30), noisy_fraction=0.08),
    "small": SmartConfig(drives=60, days=40, fail_fraction=0.15),
}


def make_smart(out_dir: str, seed: int, cfg: SmartConfig | None = None) -> dict[str, str]:
    """Write a Backblaze-layout SMART history; returns serial -> failure date."""
    cfg = cfg or SmartConfig()
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    n, days = cfg.drives, cfg.days
    serials = [f"ZA{seed:02d}{i:06d}" for i in range(n)]
    models = rng.choice(["ST4000DM000", "ST12000NM0007", "HGST HMS5C4040BLE640"], n)
    caps = {"ST4000DM000": 4000787030016, "ST12000NM0007": 12000138625024,
            "HGST HMS5C4040BLE640": 4000787030016}
    fails = rng.random(n) < cfg.fail_fraction
    fail_day = np.where(fails, rng.integers(days // 4, days, n), days + 1)
    silent = fails & (rng.random(n) < cfg.silent_fraction)
    warn = rng.integers(cfg.warning_days[0], cfg.warning_days[1] + 1, n)
    hours0 = rng.uniform(1000, 40000, n)
    noisy = ~fails & (rng.random(n) < cfg.noisy_fraction)
    # Raw counters per drive and day: [drives, days]
    zeros = np.zeros((n, days))
    raw = {k: zeros.copy() for k in SMART_IDS}
    raw[1] = rng.integers(0, 200_000_000, (n, days)).astype(float)  # read error rate: noise
    raw[9] = hours0[:, None] + 24 * np.arange(days)[None, :]
    raw[194] = np.round(rng.normal(33, 4, n)[:, None] + rng.normal(0, 1.5, (n, days)))
    base5 = np.where(noisy, rng.integers(1, 40, n), 0)
    base188 = np.where(rng.random(n) < 0.05, rng.integers(1, 5, n), 0)
    for k, base in ((5, base5), (188, base188), (197, base5 * (rng.random(n) < 0.3)),
                    (187, np.zeros(n)), (198, np.zeros(n))):
        raw[k] += base[:, None]
    rates = {5: 3.0, 197: 2.0, 198: 1.0, 187: 1.5, 188: 0.5}
    for i in np.flatnonzero(fails & ~silent):
        start = max(int(fail_day[i]) - int(warn[i]), 0)
        span = days - start
        for k, rate in rates.items():
            growth = np.cumsum(rng.poisson(rate * rng.uniform(0.3, 2.0), span))
            raw[k][i, start:] += growth
    ids = SMART_IDS
    header = "date,serial_number,model,capacity_bytes,failure," + ",".join(
        f"smart_{k}_normalized,smart_{k}_raw" for k in ids)
    failure_dates: dict[str, str] = {}
    for day in range(days):
        date = (_dt.date(2024, 1, 1) + _dt.timedelta(days=day)).isoformat()
        alive = np.flatnonzero(fail_day >= day)
        lines = [header]
        for i in alive:
            failed = int(fail_day[i] == day)
            if failed:
                failure_dates[serials[i]] = date
            cells = []
            for k in ids:
                r = raw[k][i, day]
                norm = max(1, 100 - int(r) // 10) if k in (5, 197, 198) else 100
                # Backblaze leaves attributes a model does not report empty.
                if k == 188 and models[i].startswith("HGST"):
                    cells += ["", ""]
                else:
                    cells += [str(norm), f"{r:.0f}"]
            lines.append(f"{date},{serials[i]},{models[i]},{caps[str(models[i])]},{failed},"
                         + ",".join(cells))
        with open(os.path.join(out_dir, f"{date}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return failure_dates
