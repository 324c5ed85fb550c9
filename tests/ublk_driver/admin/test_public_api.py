"""Pin ublk_driver.admin's public names and the aliases kept from ublk_driver.ctl."""

import ublk_driver.admin as admin


def test_public_names() -> None:
    assert sorted(admin.__all__) == sorted([
        "IO_TIMEOUT", "JOBS_KEPT", "LEG_STATES", "MAX_ANSWER", "MAX_CLIENTS", "MAX_LINE", "OPS",
        "AdminAccessError", "AdminClient", "AdminError", "AdminServer", "AdminTimeoutError",
        "Administered", "BadRequest", "Job", "RequestFailedError", "ServerUnreachableError",
        "default_state_dir", "encode", "fallback_path", "fs_type", "local_path",
        "parse_request", "socket_path",
        "ControlAccessError", "ControlChannelError", "ControlClient", "ControlServer",
        "ControlTimeoutError", "Controlled",
    ])
    for name in admin.__all__:
        assert getattr(admin, name) is not None


def test_old_names_are_the_new_objects() -> None:
    assert admin.ControlServer is admin.AdminServer
    assert admin.ControlClient is admin.AdminClient
    assert admin.Controlled is admin.Administered
    assert admin.ControlChannelError is admin.AdminError
    assert admin.ControlAccessError is admin.AdminAccessError
    assert admin.ControlTimeoutError is admin.AdminTimeoutError


def test_errors_are_catchable_as_builtins() -> None:
    assert issubclass(admin.ServerUnreachableError, ConnectionError)
    assert issubclass(admin.AdminAccessError, PermissionError)
    assert issubclass(admin.AdminTimeoutError, TimeoutError)
    for cls in (admin.ServerUnreachableError, admin.AdminAccessError, admin.AdminTimeoutError,
                admin.RequestFailedError):
        assert issubclass(cls, admin.AdminError)
