"""How many worker tasks a fan-out runs: one per concurrency slot, started as prompts
come, plus stand-ins while workers sleep in backoff (``docs/design.md``, "The fan-out").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Workers"]


class Workers:
    """The worker tasks of one fan-out.

    One worker per slot: in the common case no worker ever waits for a slot, so a
    request costs no hand-over between tasks. The pool grows with the input, not ahead of
    it: `start` starts one worker, and each worker calls `add` once it has taken its first
    prompt, so that the next one waits for the next prompt. A fan-out of 5 prompts runs
    at most 6 workers whatever its ``concurrency`` (a million workers started up front,
    each to find the input empty, took 20 s and 1.4 GB). While workers sleep in backoff,
    `add` puts stand-ins on the wire, up to ``limit`` tasks in all; a worker that finds
    itself `surplus` (a sleeper woke up) retires after its prompt.

    Example::

        workers = Workers(worker, concurrency=16, limit=64, on_start=lambda: None)
        workers.start(asyncio.get_running_loop())  # the worker calls workers.add()
        await workers.wait()
    """

    __slots__ = (
        "_concurrency",
        "_loop",
        "_on_start",
        "_retiring",
        "_work",
        "limit",
        "sleeping",
        "tasks",
    )

    def __init__(
        self,
        work: Callable[[], Coroutine[Any, Any, None]],
        *,
        concurrency: int,
        limit: int,
        on_start: Callable[[], None],
    ) -> None:
        self._work = work
        self._concurrency = concurrency
        self.limit = limit
        self._on_start = on_start
        self._loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Workers that `surplus` let go, still in `tasks` until their task has ended.
        self._retiring: set[asyncio.Task[Any]] = set()
        #: Workers in a backoff sleep.
        self.sleeping = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the first worker in ``loop``; the others are started by `add`."""
        self._loop = loop
        self._spawn()

    def _spawn(self) -> None:
        assert self._loop is not None
        self._on_start()
        task = self._loop.create_task(self._work())
        self.tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._retiring.discard(task)

    def _awake(self) -> int:
        return len(self.tasks) - len(self._retiring) - self.sleeping

    def add(self) -> None:
        """Start one more worker, if fewer than ``concurrency`` are awake and the pool has
        room: when a worker has taken its first prompt (the next prompt gets a worker
        waiting for it), or gone to sleep in backoff (a stand-in for it)."""
        if self._awake() < self._concurrency and len(self.tasks) < self.limit:
            self._spawn()

    def surplus(self) -> bool:
        """More workers are awake than slots: the calling worker was a stand-in and must
        retire (True), and is counted out at once. A task leaves `tasks` only once it
        has ended, a turn of the loop later: counted until then, workers finishing in
        the same turn (a whole wave let go by the outage guard, a batch that stopped)
        each saw the same surplus and all retired, leaving prompts with no worker."""
        if self._awake() <= self._concurrency:
            return False
        task = asyncio.current_task()
        if task is not None:
            self._retiring.add(task)
        return True

    def cancel(self, spare: asyncio.Task[Any] | None = None) -> None:
        """Cancel every worker but ``spare``."""
        for task in self.tasks:
            if task is not spare:
                task.cancel()

    async def stop(self) -> None:
        """Cancel every worker and wait until each has ended."""
        tasks, self.tasks = self.tasks, set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self) -> None:
        """Wait until every worker has ended, stand-ins started meanwhile included."""
        while self.tasks:
            await asyncio.wait(set(self.tasks))
