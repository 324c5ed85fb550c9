"""JSON-lines logs rotate by size and stay readable."""

from __future__ import annotations

from pathlib import Path

from kernel_agent.eventlog import JsonLinesLog, read_jsonl


def test_rotation(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path / "events.jsonl", max_bytes=1000, backups=2)
    for i in range(100):
        log.write({"i": i, "pad": "x" * 40})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1000
    newest = [r["i"] for r in read_jsonl(tmp_path / "events.jsonl")]
    assert newest[-1] == 99
    older = [r["i"] for r in read_jsonl(tmp_path / "events.jsonl.1")]
    assert older[-1] == newest[0] - 1
