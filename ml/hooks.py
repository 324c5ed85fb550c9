"""``ublkml add --score``: the fail-slow scorer (and a mirror's leg policy) as a server hook.

Registered in the entry-point group ``ublkml.server_hooks``, so the driver offers
``--score`` and ``--no-leg-policy`` without importing this package.  The scorer
and onnxruntime are imported only when a device is scored: a plain ``ublkml add``
never loads them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from ublk_driver.hooks import ServerHook

if TYPE_CHECKING:
    from ublk_driver.server import Server, ServerConfig
    from ublk_driver.targets.base import Backend

#: Per-completion records the leg policy's health probes read (a mirror's legs).
RECORD_CAPACITY = 1 << 14


class ScoringHook(ServerHook):
    """Scores every completion path with an ONNX fail-slow model; on a mirror, the leg
    policy demotes slow legs and re-admits healthy ones through the kernel agent."""

    def __init__(self, model: str | None, leg_policy: bool) -> None:
        self.model = model          # None: the packaged model
        self.leg_policy = leg_policy
        self.scorer: Any = None
        self.legs: Any = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--score", nargs="?", const="default", metavar="MODEL",
            help="score every completion path with an ONNX fail-slow model (the packaged "
            "one, or MODEL); `ublkml model use` hot-swaps it; on a mirror it also runs the "
            "leg policy: slow legs demoted and healthy ones re-admitted through the kernel "
            "agent (docs/failslow.md)")
        parser.add_argument("--no-leg-policy", action="store_true",
                            help="mirror with --score: score the legs but never ask for leg "
                            "changes")

    @classmethod
    def from_args(cls, args: argparse.Namespace, target_type: str) -> ScoringHook | None:
        score = getattr(args, "score", None)
        if score is None:
            return None
        from ml.scorer import load_scorer_model

        # Checked now, before any device exists: a bad model, or one whose
        # features the scorer cannot compute, creates nothing.
        load_scorer_model(None if score == "default" else score)
        leg_policy = target_type == "mirror" and not getattr(args, "no_leg_policy", False)
        return cls(None if score == "default" else score, leg_policy)

    def configure(self, config: ServerConfig, backend: Backend) -> ServerConfig:
        # The scorer reads per-path summaries that the queue threads count; only
        # the leg policy also wants the records themselves (probes).
        return dataclasses.replace(
            config, summaries=True,
            record_capacity=RECORD_CAPACITY if self.leg_policy else config.record_capacity)

    def started(self, server: Server) -> None:
        from ml.scorer import Scorer

        # Peers (mirror legs) are what a fail-slow verdict compares; a device
        # with one path has none, so it is scored once a second over a 1-s
        # window instead of ten times (each tick's features and model call cost
        # ~10 ms of CPU in the TCG test bed).
        peers = server.backend.paths > 1
        self.scorer = Scorer(server, self.model, dev_id=server.dev_id,
                             interval_s=0.1 if peers else 1.0,
                             window_ticks=10 if peers else 1)
        if self.leg_policy:
            from ml.legpolicy import controller_for

            self.legs = controller_for(server, self.scorer)
        self.scorer.start()

    def stopped(self) -> None:
        if self.scorer is not None:
            self.scorer.stop()
        if self.legs is not None:
            self.legs.close()
