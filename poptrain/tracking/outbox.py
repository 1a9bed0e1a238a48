"""Metrics held where they are produced (a member, the coordinator) until the driver has written them.

The driver's :class:`poptrain.tracking.runs.Tracking` empties every outbox into MLflow; an outbox
drops what it handed out only once tracking says it is written, so nothing is lost, and a
member's checkpoint holds :meth:`MetricsOutbox.unwritten` so a restart sends it again.
"""

from __future__ import annotations

import threading

Item = tuple  # (key, value, step, timestamp_ms)


class MetricsOutbox:
    """Metrics a member (or the coordinator) produced, held until the driver has written them.

    ``take(written)`` hands out what was added since the last take; what was handed out is kept
    until a later take says ``written`` (everything the driver took so far is in MLflow). Safe
    to call from another thread than the one adding (a member's ``train`` runs beside it).
    """

    def __init__(self, items: list[Item] | None = None):
        self._pending: list[Item] = list(items or [])
        self._taken: list[Item] = []
        self._lock = threading.Lock()

    def add(self, items: list[Item]) -> None:
        with self._lock:
            self._pending.extend(items)

    def take(self, written: bool, resend: bool = False) -> list[Item]:
        """What was added since the last take (``resend``: and what was taken before, still
        unacknowledged: the reply to the last take never arrived)."""
        with self._lock:
            if written and not resend:
                self._taken = []
            new, self._pending = self._pending, []
            out = self._taken + new if resend else new
            self._taken.extend(new)
            return out

    def unwritten(self) -> list[Item]:
        """Everything not known to be in MLflow (what a checkpoint keeps), oldest first."""
        with self._lock:
            return [tuple(item) for item in self._taken + self._pending]
