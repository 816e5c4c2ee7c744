"""Waking a round of a writer's awaiters a few per turn of the event loop.

A writer makes a round of files durable together, so their awaiters are ready together:
up to a fan-out's ``concurrency`` workers. A worker's step that reads its answer frees
~30 more objects the garbage collector counts than it makes (its request's are done
with); the step in which it wakes from its save makes ~44 more than it frees (its
result, and its next request's). CPython collects the young generation once 700 more
have been made than freed, so woken together those steps made a young collection in
nearly every round, each promoting the objects of every prompt still waiting for its
file, and the promoted ones brought full collections: ~450 young and 4-5 full per 10,000
prompts saved by `iter_generate`, against ~8 and 0 with saving off. Woken four per turn
(~180 objects), their steps fall between those of the answers the event loop reads
meanwhile, and the collector runs as often as with saving off: 6-11 young and no full
collection per 10,000 prompts (`iter_generate`, tmpfs and disk), 0.5-1.3 µs a prompt
against 23-29 woken eight per turn (128-146 young, 1-2 full); with `gather_generate`,
whose results stay, 20-30 µs against 48-50 (25-28 with saving off). Two per turn saved
the collector little more and wake the last of a round later; one per turn left the
event loop idle while workers waited (on the CPU 0.93 of the wall, against 0.97).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

__all__ = ["WAKES_PER_TURN", "Wakes"]

#: At most this many awaiters are woken per turn of the event loop (module docstring):
#: four workers' next requests make ~180 objects, a quarter of the young generation's
#: threshold of 700.
WAKES_PER_TURN: Final = 4


class Wakes:
    """Gives futures their outcome (a result, or an exception), in the order handed
    over, at most `WAKES_PER_TURN` per turn of the event loop: the first ones at once,
    the rest in the turns that follow. A future already done (its awaiter was cancelled)
    is skipped. Used on one event loop only.

    Example::

        wakes = Wakes(asyncio.get_running_loop())
        wakes.add(future, "out/000001.png")
        wakes.add(other, OSError(28, "No space left on device"))
        wakes.wake()
    """

    __slots__ = ("_loop", "_ready", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: deque[tuple[asyncio.Future[str], str | BaseException]] = deque()
        self._scheduled = False

    def add(self, future: asyncio.Future[str], outcome: str | BaseException) -> None:
        """Hand over ``future``'s outcome; `wake` gives it."""
        self._ready.append((future, outcome))

    def wake(self) -> None:
        """Give the next outcomes now (up to `WAKES_PER_TURN`), and the rest in the
        following turns."""
        if self._scheduled:
            return  # the turns already scheduled give them
        ready = self._ready
        for _ in range(min(WAKES_PER_TURN, len(ready))):
            future, outcome = ready.popleft()
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if ready:
            self._scheduled = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self.wake()
