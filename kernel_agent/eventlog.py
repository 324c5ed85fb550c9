"""JSON-lines logs with size-based rotation (``events.jsonl``, ``audit.jsonl``).

One JSON object per line, each with a wall-clock ``ts``.  When a write would
take the file past ``max_bytes``, ``name`` becomes ``name.1`` (``.1`` becomes
``.2``, ... up to ``backups``; the oldest is dropped), as logrotate would, so
readers can always ``tail -F`` the same path.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonLinesLog:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 4 << 20,
                 backups: int = 3) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"ts": round(time.time(), 6), **record}, default=str) + "\n"
        with self._lock:
            if self._f.tell() + len(line) > self.max_bytes and self._f.tell() > 0:
                self._rotate()
            self._f.write(line)
            self._f.flush()

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of one log file (lines that are not JSON are skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec
    except FileNotFoundError:
        return
