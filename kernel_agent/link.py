"""An extension's side of the agent: lazy, retried registration and its ring.

The agent may start after the extension (a device's leg policy, the drive
monitor), so registration is tried when there is something to send, and again
after ``retry_s`` when it failed; :attr:`ExtensionLink.why` says why nothing
can be sent yet, for the caller to log or show.

Where submissions go is decided here, in :func:`open_submitter`, the one
way extensions submit (:meth:`ExtensionLink.submit`, ``ublkml agent
recommend``): the extension's eBPF queue
(:class:`kernel_agent.rcqueue.KernelQueue`) when the running agent checks
recommendations in the kernel and gave this extension a queue, else the ring
file, whose records the agent's Python validator checks.  While the eBPF
checker is loaded the agent refuses ring records, so the choice is made
again when the agent changes (restarted, adopted the extension late).
Answers come back on the ring file either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel_agent.agent import read_agent_state
from kernel_agent.errors import AgentError
from kernel_agent.rcqueue import KernelQueue
from kernel_agent.registry import Extension, Registry
from kernel_agent.ring import Channel, Completion, Recommendation

#: How long a new extension waits for the agent to adopt it and create its
#: eBPF queue (the agent re-reads the registry every tick, 50 ms).
ADOPT_WAIT_S = 2.0


View = tuple[object, object, object]


def agent_view(root: Path, ext_id: int) -> View:
    """What the path choice depends on: the running agent, its checker and the
    extension's queue.  When it changes (the agent restarted, or adopted the
    extension late), :class:`ExtensionLink` picks the path again."""
    return _view(read_agent_state(root), ext_id)


def _view(state: dict[str, Any] | None, ext_id: int) -> View:
    state = state or {}
    return (state.get("pid"), state.get("checker"),
            (state.get("queues") or {}).get(str(ext_id)))


def open_submitter(registry: Registry, ext: Extension, wait_s: float = ADOPT_WAIT_S,
                   ring: Channel | None = None) -> tuple[Channel | KernelQueue, str]:
    """The extension's way in, and which checker it reaches: ``"ebpf"``, or
    ``"python: <why not eBPF>"``.

    The only place that chooses: the eBPF queue when the running agent checks
    in the kernel and lists one for ``ext`` (waiting up to ``wait_s`` for it to
    adopt a new extension); else the ring file.  While the eBPF checker is
    loaded the agent refuses ring records (they would bypass the kernel's
    checks), so a ``"python: ..."`` answer then says why this extension cannot
    reach it.  ``ring``: the extension's ring, already open (kept: its sequence
    numbers go on).
    """
    channel, checker, _ = _pick(registry, ext, wait_s, ring)
    return channel, checker


def _pick(registry: Registry, ext: Extension, wait_s: float, ring: Channel | None
          ) -> tuple[Channel | KernelQueue, str, View]:
    """:func:`open_submitter`, and the agent's view the choice was made on."""
    ring = ring if ring is not None else Channel.open(ext.ring)
    deadline = time.monotonic() + wait_s
    while True:
        state = read_agent_state(registry.root)
        view = _view(state, ext.id)
        if state is None or state.get("checker") != "ebpf":
            why = (state or {}).get("checker_reason") or "no agent running"
            return ring, f"python: {why}", view
        queues = state.get("queues") or {}
        if str(ext.id) in queues:
            pin = queues[str(ext.id)]
            if not pin:
                return ring, ("python: the agent has no eBPF queue for this extension (see "
                              "its audit.jsonl); it refuses ring records while its eBPF "
                              "checker is loaded"), view
            try:
                return KernelQueue(ring, pin), "ebpf", view
            except OSError as e:  # e.g. not root: bpf_obj_get needs CAP_BPF
                return ring, (f"python: cannot open the eBPF queue {pin}: {e}; the agent "
                              "refuses ring records while its eBPF checker is loaded"), view
        if time.monotonic() >= deadline:
            return ring, (f"python: the agent did not give extension {ext.id} an eBPF "
                          f"queue within {wait_s:g} s"), view
        time.sleep(0.02)


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
        self.channel: Channel | KernelQueue | None = None
        #: Which checker the submissions reach (:func:`open_submitter`).
        self.checker = ""
        self.why = "not registered with the kernel agent yet"
        self._tried = float("-inf")
        self._ext: Extension | None = None
        self._view: View = (None, None, None)

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
            self.channel, self.checker, self._view = _pick(self.registry, ext, ADOPT_WAIT_S,
                                                           None)
        except (AgentError, OSError) as e:
            self.why = f"cannot register with the kernel agent: {e}"
            return self.why
        self.ext_id = ext.id
        self._ext = ext
        return None

    def submit(self, rec: Recommendation) -> Recommendation | None:
        """Send ``rec`` on the path :func:`open_submitter` picks (picked again when the
        agent changed since); what was sent, or None when the queue is full."""
        if self.channel is None or self._ext is None:
            raise AgentError(f"not registered with the kernel agent: {self.why}")
        if agent_view(self.registry.root, self._ext.id) != self._view:
            ring = self.channel.ring if isinstance(self.channel, KernelQueue) else self.channel
            if isinstance(self.channel, KernelQueue):
                self.channel.release()   # the old agent's queue: nobody drains it now
            self.channel, self.checker, self._view = _pick(self.registry, self._ext,
                                                           ADOPT_WAIT_S, ring)
        return self.channel.submit(rec)

    def completions(self) -> list[Completion]:
        """The agent's answers since the last call (on the ring file, either path)."""
        return self.channel.completions() if self.channel is not None else []

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
