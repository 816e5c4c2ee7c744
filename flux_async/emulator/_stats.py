"""What the emulator remembers: :class:`EmulatorStats` (counters) and :class:`SeenRequest` (log)."""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs

__all__ = ["COUNTERS", "OUTCOME_COUNTER", "EmulatorStats", "Outcome", "SeenRequest"]

Outcome = Literal[
    "pending",
    "success",
    "rate_limited",
    "concurrency_limited",
    "fault",
    "bad_request",
    "unauthorized",
    "dropped",
    "replayed",
]
"""What became of a generation request; ``"pending"`` only while it is still being handled."""

COUNTERS: Final = (
    "requests",
    "successes",
    "rate_limited",
    "concurrency_limited",
    "faults",
    "bad_requests",
    "unauthorized",
    "replayed",
)
"""The counters kept both in :class:`EmulatorStats` and per key."""

OUTCOME_COUNTER: Final[dict[str, str]] = {
    "success": "successes",
    "rate_limited": "rate_limited",
    "concurrency_limited": "concurrency_limited",
    "fault": "faults",
    "dropped": "faults",
    "bad_request": "bad_requests",
    "unauthorized": "unauthorized",
    "replayed": "replayed",
}
"""The counter each final :data:`Outcome` adds one to."""


@attrs.define
class EmulatorStats:
    """Live counters of an :class:`Emulator` (``emu.stats``); ``snapshot()`` copies them.

    ``faults`` counts injected faults of every kind (a slow fault is counted even though the
    request then goes on to its own outcome). ``in_flight`` counts generation requests whose
    handler is running, admitted or not, so ``max_in_flight_seen`` is the client's peak
    concurrency. ``per_key`` maps a key fingerprint (or ``"anonymous"``) to the same counters.

    Example::

        assert emu.stats.successes == 3
        assert emu.stats.per_key[Emulator.key_id("sk-test")]["rate_limited"] == 1
    """

    requests: int = 0
    successes: int = 0
    rate_limited: int = 0
    concurrency_limited: int = 0
    faults: int = 0
    bad_requests: int = 0
    unauthorized: int = 0
    replayed: int = 0
    in_flight: int = 0
    max_in_flight_seen: int = 0
    per_key: dict[str, dict[str, int]] = attrs.Factory(dict)

    def snapshot(self) -> dict[str, Any]:
        """Return a JSON-able copy of every counter.

        Example::

            json.dumps(emu.stats.snapshot())
        """
        data: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        data["in_flight"] = self.in_flight
        data["max_in_flight_seen"] = self.max_in_flight_seen
        data["per_key"] = {kid: dict(counts) for kid, counts in self.per_key.items()}
        return data

    def _zero(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        # Requests still being handled will decrement in_flight; zeroing it would go negative.
        self.max_in_flight_seen = self.in_flight
        self.per_key.clear()


@attrs.define
class SeenRequest:
    """One generation request as the emulator saw it (``emu.requests``, arrival order).

    ``time`` is the server's ``time.monotonic()`` at arrival; ``body`` the parsed JSON object
    (None when it was not one); ``status`` None while pending or when dropped.

    Example::

        first = emu.requests[0]
        assert first.outcome == "success" and first.body["prompt"] == "a cat"
    """

    time: float
    key_id: str
    idempotency_key: str | None
    body: dict[str, Any] | None = None
    status: int | None = None
    outcome: Outcome = "pending"
