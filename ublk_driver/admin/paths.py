"""Where a server's admin socket lives: ``$UBLKML_STATE_DIR/<dev_id>.sock``.

The state dir defaults to ``/run/ublkml``.  When it cannot hold sockets (a
shared file system: 9p, NFS, FUSE...), server and client both use
:func:`fallback_path`, ``<state dir>-ctl/<dev_id>.sock``.
"""

from __future__ import annotations

import os


def default_state_dir() -> str:
    return os.environ.get("UBLKML_STATE_DIR", "/run/ublkml")


def socket_path(dev_id: int, state_dir: str | None = None) -> str:
    return os.path.join(state_dir or default_state_dir(), f"{dev_id}.sock")


def fallback_path(path: str) -> str:
    """Where the socket goes when its directory cannot hold sockets: ``<dir>-ctl/``.

    Some file systems refuse them (the test bed's state dir is a 9p share:
    bind fails with ENXIO); server and client both know this second place.
    """
    directory, name = os.path.split(path)
    return os.path.join(directory.rstrip("/") + "-ctl", name)


_SHARED_FS = ("9p", "nfs", "nfs4", "cifs", "smb3", "ceph", "virtiofs", "fuse")


def fs_type(path: str) -> str:
    """The file system type of ``path`` (or of its nearest existing parent)."""
    p = os.path.realpath(path)
    while not os.path.exists(p) and p != "/":
        p = os.path.dirname(p)
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = fields[4].replace("\\040", " ")
                inside = p == mnt or p.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
    except OSError:
        pass
    return kind


def local_path(path: str) -> str:
    """``path``, or its :func:`fallback_path` when its directory is on a shared
    file system (9p, NFS, FUSE...): sockets cannot live there, and a mirror's
    journal needs shared mappings of a local page cache."""
    kind = fs_type(os.path.dirname(path) or ".")
    return fallback_path(path) if kind.split(".")[0] in _SHARED_FS else path
