"""bench.jobs: the fio job text and the parsing of fio's JSON (real captured output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.jobs import (
    QUICK_CASES,
    WORKLOADS,
    FioError,
    fio_job_text,
    parse_fio_json,
    workload_by_name,
)
from bench.runner import DEVICES

DATA = Path(__file__).parent / "data"


def _text(name: str) -> str:
    return (DATA / name).read_text()


def test_parse_single_job() -> None:
    # Captured with fio 3.33: 4k randread QD32, 1 job, on a host file.
    r = parse_fio_json(_text("fio-4k-randread-qd32-1job.json"), "read")
    assert r.fio_version == "fio-3.33"
    assert r.jobs == 1
    assert r.iops == pytest.approx(497073.926074)
    assert r.bw_bytes == 2036145742
    assert r.bw_mib_s == pytest.approx(2036145742 / 2**20)
    assert r.total_ios == 497571
    # lat_ns percentiles (lat_percentiles=1), converted from ns to µs.
    assert r.lat_us["p50"] == pytest.approx(45.824)
    assert r.lat_us["p99"] == pytest.approx(84.48)
    assert r.lat_us["p99.9"] == pytest.approx(3915.776)
    assert r.lat_us["mean"] == pytest.approx(64.074688826)
    assert (r.usr_cpu, r.sys_cpu) == (16.4, 56.0)
    d = r.to_dict()
    assert d["lat_us"]["p99.9"] == pytest.approx(3915.776)
    assert d["fio_cpu"] == {"usr": 16.4, "sys": 56.0}


def test_parse_two_jobs_group_reporting() -> None:
    r = parse_fio_json(_text("fio-4k-randwrite-qd1-2jobs-grouped.json"), "write")
    assert r.jobs == 1  # group_reporting: one entry for both jobs
    assert r.iops == pytest.approx(24315.684316)
    assert r.lat_us["p50"] == pytest.approx(64.256)


def test_parse_two_separate_jobs_adds_up_and_keeps_worst_percentile() -> None:
    text = _text("fio-4k-randwrite-qd1-2jobs-separate.json")
    doc = json.loads(text)
    jobs = [j["write"] for j in doc["jobs"]]
    r = parse_fio_json(text, "write")
    assert r.jobs == 2
    assert r.iops == pytest.approx(sum(j["iops"] for j in jobs))
    assert r.bw_bytes == sum(j["bw_bytes"] for j in jobs)
    assert r.total_ios == sum(j["total_ios"] for j in jobs)
    worst_p99 = max(j["lat_ns"]["percentile"]["99.000000"] for j in jobs) / 1000
    assert r.lat_us["p99"] == pytest.approx(worst_p99)


def test_parse_ignores_warnings_before_the_json() -> None:
    text = "fio: file hash not empty on exit\n" + _text("fio-4k-randread-qd32-1job.json")
    assert parse_fio_json(text, "read").iops == pytest.approx(497073.926074)


def test_parse_by_field_names_not_positions() -> None:
    # Reordering keys (as another fio version might) changes nothing.
    doc = json.loads(_text("fio-4k-randread-qd32-1job.json"))
    job = doc["jobs"][0]
    doc["jobs"][0] = dict(reversed(list(job.items())))
    assert parse_fio_json(json.dumps(doc), "read").iops == pytest.approx(497073.926074)


def test_parse_wrong_direction_is_an_error() -> None:
    with pytest.raises(FioError, match="no write I/O"):
        parse_fio_json(_text("fio-4k-randread-qd32-1job.json"), "write")


def test_parse_job_error() -> None:
    doc = json.loads(_text("fio-4k-randread-qd32-1job.json"))
    doc["jobs"][0]["error"] = 5
    with pytest.raises(FioError, match=r"error 5 \(Input/output error\)"):
        parse_fio_json(json.dumps(doc), "read")


def test_parse_falls_back_to_clat_percentiles() -> None:
    doc = json.loads(_text("fio-4k-randread-qd32-1job.json"))
    read = doc["jobs"][0]["read"]
    read["clat_ns"]["percentile"] = {"50.000000": 1000, "99.000000": 2000,
                                     "99.900000": 3000}
    del read["lat_ns"]["percentile"]
    r = parse_fio_json(json.dumps(doc), "read")
    assert (r.lat_us["p50"], r.lat_us["p99"], r.lat_us["p99.9"]) == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("text, message", [
    ("", "no JSON"),
    ("fio: engine io_uring not loadable", "no JSON"),
    ("{ not json", "malformed"),
    ('{"jobs": []}', "no jobs"),
    ('{"jobs": [{"jobname": "q0", "error": 0}]}', "no 'read' section"),
])
def test_parse_malformed(text: str, message: str) -> None:
    with pytest.raises(FioError, match=message):
        parse_fio_json(text, "read")


def test_parse_missing_percentiles() -> None:
    doc = json.loads(_text("fio-4k-randread-qd32-1job.json"))
    doc["jobs"][0]["read"]["lat_ns"]["percentile"] = {"50.000000": 1000}
    doc["jobs"][0]["read"]["clat_ns"]["percentile"] = {"50.000000": 1000}
    with pytest.raises(FioError, match=r"p99, p99\.9"):
        parse_fio_json(json.dumps(doc), "read")


def test_parse_rejects_bad_direction() -> None:
    with pytest.raises(ValueError):
        parse_fio_json("{}", "trim")


def test_job_text_is_identical_but_for_the_filename() -> None:
    w = workload_by_name("4k-randread-qd32")
    a = fio_job_text("/dev/nullb0", w, queues=2, runtime=10, ramp=2, cpus=[0, 1])
    b = fio_job_text("/dev/ublkb0", w, queues=2, runtime=10, ramp=2, cpus=[0, 1])
    assert a.replace("/dev/nullb0", "X") == b.replace("/dev/ublkb0", "X")
    for line in ("ioengine=io_uring", "direct=1", "rw=randread", "bs=4096", "iodepth=32",
                 "time_based=1", "runtime=10s", "ramp_time=2s", "group_reporting=1",
                 "lat_percentiles=1", "percentile_list=50:99:99.9"):
        assert line in a.splitlines()
    # One job per queue, each pinned to its own CPU.
    assert a.count("[q") == 2
    assert "cpus_allowed=0" in a and "cpus_allowed=1" in a


def test_single_job_is_not_pinned_and_short_times_use_ms() -> None:
    w = workload_by_name("128k-write-qd32")
    text = fio_job_text("/dev/x", w, queues=1, runtime=1.5, ramp=0.5, cpus=[0, 1])
    assert "cpus_allowed" not in text
    assert "runtime=1500ms" in text and "ramp_time=500ms" in text
    assert "rw=write" in text and "bs=131072" in text


def test_job_text_rejects_nonsense() -> None:
    w = WORKLOADS[0]
    with pytest.raises(ValueError):
        fio_job_text("/dev/x", w, queues=0, runtime=1, ramp=0, cpus=[0])
    with pytest.raises(ValueError):
        fio_job_text("/dev/x", w, queues=2, runtime=1, ramp=0, cpus=[])


def test_job_text_round_robins_cpus() -> None:
    text = fio_job_text("/dev/x", WORKLOADS[0], queues=3, runtime=1, ramp=0, cpus=[4])
    assert text.count("cpus_allowed=4") == 3


def test_workloads() -> None:
    names = [w.name for w in WORKLOADS]
    assert len(set(names)) == len(names)
    assert {(w.rw, w.bs, w.depth) for w in WORKLOADS} == {
        ("randread", 4096, 1), ("randread", 4096, 32), ("randwrite", 4096, 1),
        ("randwrite", 4096, 32), ("read", 131072, 32), ("write", 131072, 32)}
    assert workload_by_name("4k-randwrite-qd1").direction == "write"
    assert workload_by_name("128k-read-qd32").direction == "read"
    assert workload_by_name("128k-read-qd32").label == "128k seq read QD32"
    assert workload_by_name("4k-randread-qd1").label == "4k randread QD1"
    with pytest.raises(KeyError):
        workload_by_name("nope")


def test_quick_cases_name_real_devices_and_workloads() -> None:
    devices = {d.name for d in DEVICES}
    groups = set()
    for dev, w, q in QUICK_CASES:
        assert dev in devices
        workload_by_name(w)
        assert q in (1, 2)
        groups.add(next(d.group for d in DEVICES if d.name == dev))
    assert groups == {"null", "loop", "python"}  # + the overhead group, from plan_cases
