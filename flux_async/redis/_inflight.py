"""In-flight slots (``max_in_flight``): leases in a Redis sorted set, held per task.

A slot is a lease with an expiry, renewed every third of a lease while held, so a
process killed with ``kill -9`` frees its slots when its leases expire. A task holds at
most one slot: it gives it back when its attempt reports, when it asks for its next
permit, or when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, TypeAlias

from .._concurrency import ConcurrencyLimit
from ._connection import REDIS_ERRORS, Connection
from ._scripts import RENEW, float_arg
from ._settings import LimiterConfig
from ._stats import Counters

__all__ = ["Hold", "InFlight"]

logger = logging.getLogger("flux_async.redis")

#: What a task holds: a Redis lease id, or a slot of the fallback's in-process cap.
Hold: TypeAlias = "str | ConcurrencyLimit"


class InFlight:
    """The in-flight slots this process's tasks hold, and the leases to give back.

    Lease ids are ``<tag>:<counter>``, the tag random per limiter. A lease given back is
    queued and removed from Redis in the background (or with the next booking, which
    sends the queue along); one that cannot be removed expires on its own.

    Example::

        inflight = InFlight(config, conn, counts)
        (lease,) = inflight.new_ids(1)    # booked with a permit by the ACQUIRE script
        inflight.hold(task, lease)        # renewed in the background while held
        inflight.release(task)            # queued; the next booking gives it back
    """

    def __init__(self, config: LimiterConfig, conn: Connection, counts: Counters) -> None:
        self._config = config
        self._conn = conn
        self._counts = counts
        self._tag = uuid.uuid4().hex[:16]
        self._seq = 0
        self._held: dict[asyncio.Task[Any], Hold] = {}
        self._to_release: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """Slots held now."""
        return len(self._held)

    def holds(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` holds a slot."""
        return task in self._held

    def new_ids(self, n: int) -> list[str]:
        """``n`` fresh lease ids, or none without ``max_in_flight``."""
        if self._config.settings.max_in_flight is None:
            return []
        ids = []
        for _ in range(n):
            self._seq += 1
            ids.append(f"{self._tag}:{self._seq}")
        return ids

    def hold(self, task: asyncio.Task[Any], hold: Hold) -> None:
        """``task`` holds ``hold`` until `release`, or until it ends."""
        if task not in self._held:
            task.add_done_callback(self._task_done)
        self._held[task] = hold
        if isinstance(hold, str) and self._heartbeat is None:
            self._heartbeat = self._conn.spawn(self._renew_leases())

    def release(self, task: asyncio.Task[Any]) -> None:
        """Give back the slot ``task`` holds, if any."""
        hold = self._held.pop(task, None)
        if hold is None:
            return
        task.remove_done_callback(self._task_done)
        if isinstance(hold, str):
            self.queue_release(hold)
        else:
            hold.release()

    def release_current(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give back the slot of the task running now, if it holds one (it reported)."""
        if self._held:
            task = asyncio.current_task(loop)
            if task is not None:
                self.release(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.release(task)

    def queue_release(self, lease: str) -> None:
        """Give back ``lease`` in the background; wake a booking waiting for a slot."""
        self._to_release.append(lease)
        if self._conn.slot_freed is not None:
            self._conn.slot_freed.set()
        if self._flusher is None and self._conn.usable:
            self._flusher = self._conn.spawn(self._flush_releases())

    def take_releases(self) -> list[str]:
        """The leases queued to give back, for a booking to send along."""
        releases, self._to_release = self._to_release, []
        return releases

    def restore_releases(self, releases: list[str]) -> None:
        """Queue again leases a failed booking did not give back."""
        self._to_release[:0] = releases

    def forget_leases(self) -> None:
        """Forget every lease (Redis is out of reach: they expire there on their own)."""
        for task, hold in list(self._held.items()):
            if isinstance(hold, str):
                del self._held[task]
                task.remove_done_callback(self._task_done)
        self._to_release.clear()

    async def close(self, *, give_back: bool) -> None:
        """Let go of every slot; ``give_back``: remove the leases from Redis now."""
        leases = [h for h in self._held.values() if isinstance(h, str)] + self._to_release
        for task in list(self._held):
            self._held.pop(task)
            task.remove_done_callback(self._task_done)
        self._to_release = []
        if leases and give_back:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._conn.client.zrem(self._config.leases_key, *leases)

    async def _flush_releases(self) -> None:
        try:
            while self._to_release:
                batch, self._to_release = self._to_release, []
                try:
                    await self._conn.client.zrem(self._config.leases_key, *batch)
                except REDIS_ERRORS as exc:
                    self._counts.redis_errors += 1
                    logger.debug("flux_async.redis: could not give back leases: %r", exc)
                    return  # they expire on their own
        finally:
            self._flusher = None

    async def _renew_leases(self) -> None:
        """Renew this process's leases every third of a lease while it holds any."""
        config = self._config
        lease = config.settings.lease
        try:
            while True:
                await asyncio.sleep(lease / 3)
                held = [h for h in self._held.values() if isinstance(h, str)]
                if not held:
                    return
                try:
                    await RENEW.run(
                        self._conn.client,
                        [config.leases_key],
                        [float_arg(lease), config.ttl_ms, *held],
                    )
                except REDIS_ERRORS as exc:
                    self._counts.redis_errors += 1
                    logger.debug("flux_async.redis: could not renew leases: %r", exc)
        finally:
            self._heartbeat = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} held={len(self._held)} to_release={len(self._to_release)}>"
