"""An extension's side of the agent: lazy, retried registration and its ring.

The agent may start after the extension (a device's leg policy, the drive
monitor), so registration is tried when there is something to send, and again
after ``retry_s`` when it failed; :attr:`ExtensionLink.why` says why nothing
can be sent yet, for the caller to log or show.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from kernel_agent.agent import read_agent_state
from kernel_agent.errors import AgentError
from kernel_agent.registry import Registry
from kernel_agent.ring import Channel


class ExtensionLink:
    """Registration of one extension of class ``cls`` and the ring it was given."""

    def __init__(self, cls: str, agent_dir: str | None = None, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 what: str = "recommendations") -> None:
        self.cls = cls
        self.registry = Registry(agent_dir)
        self.retry_s = retry_s
        self.clock = clock
        self.what = what
        self.ext_id: int | None = None
        self.channel: Channel | None = None
        self.why = "not registered with the kernel agent yet"
        self._tried = float("-inf")

    def connect(self, params: dict[str, str],
                before_add: Callable[[Registry], None] | None = None) -> str | None:
        """None when registered (now or before), else why not (:attr:`why`)."""
        if self.channel is not None:
            return None
        now = self.clock()
        if now - self._tried < self.retry_s:
            return self.why
        self._tried = now
        if read_agent_state(self.registry.root) is None:
            self.why = (f"no kernel agent is running (state dir {self.registry.root}): "
                        f"{self.what} are not sent; start one with `ublkml agent start`")
            return self.why
        try:
            if before_add is not None:
                before_add(self.registry)
            ext = self.registry.add(self.cls, params)
            self.channel = Channel.open(ext.ring)
        except (AgentError, OSError) as e:
            self.why = f"cannot register with the kernel agent: {e}"
            return self.why
        self.ext_id = ext.id
        return None

    def drop_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def close(self) -> None:
        """Close the ring and unregister (best effort: the agent may be gone)."""
        self.drop_channel()
        if self.ext_id is not None:
            with contextlib.suppress(AgentError, OSError):
                self.registry.remove(self.ext_id)
            self.ext_id = None
