"""Pin the public API (as trio does): a change here is a deliberate one."""

import ublk_driver


def test_public_names() -> None:
    assert sorted(ublk_driver.__all__) == [
        "Capabilities", "ConfigError", "Control", "ControlError", "DeviceNotFoundError",
        "Drive", "DriveLookupError", "DriverUnavailableError", "IoError", "LoopTarget",
        "MemTarget", "NullTarget", "PluginBackend", "PluginError", "Server", "ServerConfig",
        "Target", "TargetError", "UblkError", "bdev_path", "cdev_path", "driver_available",
        "drives_of", "format_size", "load_plugin", "parse_size", "why_no_drive",
    ]
    for name in ublk_driver.__all__:
        assert getattr(ublk_driver, name) is not None


def test_errors_are_catchable_as_builtins() -> None:
    assert issubclass(ublk_driver.ConfigError, ValueError)
    assert issubclass(ublk_driver.DriverUnavailableError, OSError)
    assert issubclass(ublk_driver.DeviceNotFoundError, ublk_driver.ControlError)
    assert issubclass(ublk_driver.IoError, OSError)
    assert issubclass(ublk_driver.DriveLookupError, OSError)
    assert str(ublk_driver.IoError(28)) == "No space left on device"
