"""The admin client's errors: no server, a stale socket, a mute or rude server."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading

import pytest

from ublk_driver.admin import AdminClient, AdminTimeoutError, ServerUnreachableError, socket_path


def test_client_without_a_server() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        with pytest.raises(ServerUnreachableError, match=r"is the server running\? see "
                           r"`ublkml list`"):
            AdminClient(3, 1, d).call("status")
        stale = socket.socket(socket.AF_UNIX)      # a file nobody listens on
        stale.bind(socket_path(3, d))
        stale.close()
        with pytest.raises(ServerUnreachableError, match="no admin socket for ublk device 3"):
            AdminClient(3, 1, d).call("status")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_client_timeout_and_silent_hangup() -> None:
    d = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        with socket.socket(socket.AF_UNIX) as mute:
            mute.bind(socket_path(4, d))
            mute.listen(4)                         # accepts (in the backlog), never answers
            with pytest.raises(AdminTimeoutError, match=r"did not answer 'status' within 0\.3 s"):
                AdminClient(4, 0.3, d).call("status")
        with socket.socket(socket.AF_UNIX) as rude:
            rude.bind(socket_path(5, d))
            rude.listen(4)

            def hang_up() -> None:
                conn, _ = rude.accept()
                conn.close()
            t = threading.Thread(target=hang_up)
            t.start()
            with pytest.raises(ServerUnreachableError, match="closed the admin socket connection"):
                AdminClient(5, 5, d).call("status")
            t.join()
    finally:
        shutil.rmtree(d, ignore_errors=True)
