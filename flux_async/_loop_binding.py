"""One client, one event loop at a time: `LoopBinding` refuses a second loop while the
first is still open.
"""

from __future__ import annotations

import asyncio

from ._exceptions import EventLoopError

__all__ = ["LoopBinding"]


class LoopBinding:
    """The event loop a client is busy in.

    `check` binds to the running loop, unless bound to another, still open one. A loop
    that has closed (each ``asyncio.run`` closes its own) leaves nothing behind to share:
    the limiter rebinds to the new clock and the transport makes a new pool. Another loop
    still open may be using the same limiter, retry budget and pool from its own thread;
    sharing them would corrupt them, so it is refused, before anything is touched.

    Example::

        binding = LoopBinding()
        binding.check()  # in a running loop: binds to it
    """

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def check(self) -> None:
        """Bind to the running loop; `EventLoopError` if another open loop holds it."""
        loop = asyncio.get_running_loop()
        bound = self._loop
        if loop is bound:
            return
        if bound is not None and not bound.is_closed():
            raise EventLoopError(
                "this FluxClient is in use by another event loop, which is still open: "
                "create one FluxClient per event loop (or per thread running one), or "
                "close the other loop first (asyncio.run closes its loop when it returns)"
            )
        self._loop = loop
