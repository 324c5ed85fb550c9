"""Driver actions (demote_leg, promote_leg) reach a ublk server through its admin socket.

The socket is real and served by ublk_driver.admin's AdminServer thread; behind
it is tests/ublk_driver/admin/doubles.py's FakeServer (the real server is in
tests/ublk_driver/admin/test_admin_ublk.py).  Device ``ublkb7`` is named, not opened:
nothing here needs the ublk driver.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import pytest

from kernel_agent.accounting import BlockDevice
from kernel_agent.actions import (
    ActionError,
    DriverAction,
    UblkControlChannel,
    default_actions,
    ublk_channel_for,
)
from tests.ublk_driver.admin.doubles import Served, serve

UBLKB7 = BlockDevice("ublkb7", 259, 7)


@pytest.fixture
def served() -> Iterator[Served]:
    with serve() as s:
        yield s


def test_channel_for_maps_ublkbN_to_its_socket(served: Served) -> None:
    ch = ublk_channel_for(UBLKB7, served.state_dir)
    assert isinstance(ch, UblkControlChannel) and ch.dev_id == 7
    assert ublk_channel_for(BlockDevice("ublkb8", 259, 8), served.state_dir) is None  # no server
    assert ublk_channel_for(BlockDevice("loop0", 7, 0), served.state_dir) is None
    assert ublk_channel_for(BlockDevice("ublkc7", 240, 7), served.state_dir) is None


def test_demote_and_promote_through_the_allow_list(served: Served) -> None:
    specs = default_actions(throttle=None,
                            channel_for=functools.partial(ublk_channel_for,
                                                          state_dir=served.state_dir))
    demote, promote = specs["demote_leg"], specs["promote_leg"]
    assert isinstance(demote.applier, DriverAction) and not demote.check_effect
    assert demote.applier.available(UBLKB7) is None
    assert "no admin socket to the server of loop0" in str(
        demote.applier.available(BlockDevice("loop0", 7, 0)))
    assert demote.why_invalid("16") and promote.why_invalid("x")   # the leg, 0..15

    demote.applier.write(UBLKB7, "1")
    assert served.fake.calls == [("set_leg_state", 1, "demoted")]
    assert served.fake.legs[1].state == "demoted"
    promote.applier.write(UBLKB7, "1")     # returns once the resync started
    deadline = time.monotonic() + 10
    while served.fake.legs[1].state != "active":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ("promote_leg", 1, None) in served.fake.calls


def test_perform_returns_the_previous_state(served: Served) -> None:
    ch = UblkControlChannel(7, state_dir=served.state_dir)
    assert ch.perform(UBLKB7, "demote_leg", "0") == "active"
    assert ch.perform(UBLKB7, "demote_leg", "0") == "demoted"


@pytest.mark.parametrize(("action", "value", "message"), [
    ("demote_leg", "9", "demote_leg 9 on ublkb7: no leg 9: the mirror has legs 0..1"),
    ("demote_leg", "one", "demote_leg needs a leg number, got 'one'"),
    ("read_ahead_kb", "1", "unsupported: the ublk server has no action 'read_ahead_kb'"),
])
def test_failures_are_action_errors(served: Served, action: str, value: str,
                                    message: str) -> None:
    with pytest.raises(ActionError) as e:
        UblkControlChannel(7, state_dir=served.state_dir).perform(UBLKB7, action, value)
    assert str(e.value) == message


def test_a_server_that_went_away_is_an_action_error(served: Served) -> None:
    ch = UblkControlChannel(7, state_dir=served.state_dir)
    served.ctl.close()
    with pytest.raises(ActionError, match="is the server running"):
        ch.perform(UBLKB7, "demote_leg", "1")
