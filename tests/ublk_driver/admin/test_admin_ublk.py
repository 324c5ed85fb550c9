"""The admin socket of a real server: `ublkml status` over the socket, gone after `del`."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.ublk_driver.ublk_helpers import device, ublkml
from ublk_driver.admin import fallback_path, socket_path

pytestmark = pytest.mark.ublk


def test_status_over_the_socket_and_socket_removed_on_delete() -> None:
    state_dir = os.environ.get("UBLKML_STATE_DIR", "/run/ublkml")
    with device("-t", "mem", "--size", "16M", "-q", "1", "-d", "32") as d:
        doc = json.loads(ublkml("status", "-n", str(d.dev_id), "--json").stdout)
        sock = doc["socket"]    # in the state dir, or beside it where that cannot hold one
        assert sock in (socket_path(d.dev_id, state_dir),
                        fallback_path(socket_path(d.dev_id, state_dir)))
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert doc["dev_id"] == d.dev_id and doc["bdev"] == d.bdev
        assert doc["pid"] == d.info["pid"]
        assert doc["queues"] == 1 and doc["depth"] == 32
        assert doc["target"] == {"target": "mem", "size": 16 << 20}
        assert "legs" not in doc and doc["faults"] == {} and doc["jobs"] == []
        text = ublkml("status", "-n", str(d.dev_id)).stdout
        assert text.startswith(f"ublk device {d.dev_id} ({d.bdev}): mem 16M, 1 queue(s)")
    assert not os.path.exists(sock)
    proc = ublkml("status", "-n", str(d.dev_id), check=False)
    assert proc.returncode == 1 and "is the server running?" in proc.stderr
