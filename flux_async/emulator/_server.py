"""The :class:`Emulator`: its arguments, its public controls and its lifecycle on a socket.

An emulator is three parts: a :class:`~._pipeline.Pipeline` that answers generation requests
(and keeps the stats, the request log and the fault script), the aiohttp app around it
(:mod:`._app`), and the runner bound to ``host:port`` between :meth:`Emulator.start` and
:meth:`Emulator.close`.

Every answer, success or error, carries ``x-request-id: req_<hex>``, and every error has the
OpenAI JSON shape. API keys never leave the process: they are identified everywhere (stats,
requests, repr, error messages) by :meth:`Emulator.key_id`, a short SHA-256 fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import TracebackType
from typing import Final, Self

from aiohttp.web import TCPSite

from ._app import Runner, make_app
from ._faults import Fault, FaultRates
from ._pipeline import Pipeline, key_id
from ._stats import EmulatorStats, SeenRequest

__all__ = ["Emulator", "EmulatorStats", "Fault", "FaultRates", "SeenRequest"]

# Long enough for a response already being written to finish, short enough that closing an
# emulator with a request stuck in a handler does not stall a test.
_SHUTDOWN_GRACE: Final = 0.5
# Listen backlog: benchmarks open hundreds of connections at once.
_BACKLOG: Final = 1024


def _check_arguments(
    latency: float,
    rate_limit: float | None,
    burst: int,
    max_in_flight: int | None,
    faults: FaultRates | None,
    port: int,
) -> None:
    if not (math.isfinite(latency) and latency >= 0):
        raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
    if rate_limit is not None and not (math.isfinite(rate_limit) and rate_limit > 0):
        raise ValueError(f"rate_limit must be None or > 0, got {rate_limit!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be an int >= 1, got {burst!r}")
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ValueError(f"max_in_flight must be None or an int >= 1, got {max_in_flight!r}")
    if faults is not None and not isinstance(faults, FaultRates):
        raise TypeError(f"faults must be a FaultRates or None, got {type(faults).__name__}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")


def _key_ids(api_keys: Iterable[str] | None) -> dict[str, str] | None:
    if api_keys is None:
        return None
    keys = list(api_keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError("api_keys must be None (no auth) or non-empty strings")
    return {key: key_id(key) for key in keys}


class Emulator:
    """A local server implementing ``POST /v1/images/generations``, for tests and benchmarks.

    ``api_keys=None`` accepts any (or no) bearer; ``rate_limit`` is requests/second per key
    (None: unlimited); ``max_in_flight`` caps concurrent generations (None: unlimited);
    ``url_ttl`` makes image URLs expire that many seconds after their generation (a 403
    afterwards, as from a signed bucket URL; None: never); ``port=0`` picks a free port.
    Keys are never shown: see :meth:`key_id`.

    Example::

        async with Emulator(api_keys=["sk-test"], rate_limit=5, burst=2) as emu:
            client = AsyncOpenAI(base_url=emu.base_url, api_key="sk-test")
            emu.script(Fault.status(503))      # the next request fails once
            ...
            assert emu.stats.successes == 1
            assert emu.requests[0].outcome == "fault"
    """

    __slots__ = (
        "_base_url",
        "_burst",
        "_host",
        "_key_ids",
        "_pipeline",
        "_port",
        "_rate_limit",
        "_runner",
    )

    def __init__(
        self,
        api_keys: Iterable[str] | None = None,
        *,
        latency: float = 0.0,
        rate_limit: float | None = None,
        burst: int = 1,
        max_in_flight: int | None = None,
        faults: FaultRates | None = None,
        seed: int = 0,
        require_aspect_ratio: bool = True,
        dedupe_idempotency: bool = False,
        record_requests: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        url_ttl: float | None = None,
    ) -> None:
        self._key_ids = _key_ids(api_keys)
        _check_arguments(latency, rate_limit, burst, max_in_flight, faults, port)
        if url_ttl is not None and not (math.isfinite(url_ttl) and url_ttl > 0):
            raise ValueError(f"url_ttl must be None or seconds > 0, got {url_ttl!r}")
        self._rate_limit = rate_limit
        self._burst = burst
        self._host = host
        self._port = port
        self._pipeline = Pipeline(
            key_ids=self._key_ids,
            latency=float(latency),
            limits=None if rate_limit is None else (rate_limit, burst),
            max_in_flight=max_in_flight,
            faults=faults,
            seed=seed,
            require_aspect_ratio=require_aspect_ratio,
            dedupe_idempotency=dedupe_idempotency,
            record_requests=record_requests,
        )
        # Image URLs then carry ?expires= and answer 403 after it, like signed bucket URLs.
        self._pipeline.images.url_ttl = url_ttl
        self._runner: Runner | None = None
        self._base_url: str | None = None

    # -- public API -------------------------------------------------------------------------

    @staticmethod
    def key_id(key: str) -> str:
        """Fingerprint an API key so it can be named without being shown.

        Example::

            Emulator.key_id("sk-test")  # 'key-' + the first 8 hex digits of its SHA-256
        """
        return key_id(key)

    @property
    def stats(self) -> EmulatorStats:
        """Live counters; see :class:`EmulatorStats`.

        Example::

            assert emu.stats.successes == 3
        """
        return self._pipeline.stats

    @property
    def requests(self) -> list[SeenRequest]:
        """Every generation request so far, in arrival order (empty with ``record_requests=False``).

        Example::

            assert [r.outcome for r in emu.requests] == ["fault", "success"]
        """
        return self._pipeline.requests

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, ready for ``AsyncOpenAI(base_url=emu.base_url)``.

        Raises ``RuntimeError`` before :meth:`start`.

        Example::

            async with Emulator() as emu:
                print(emu.base_url)  # http://127.0.0.1:54321/v1
        """
        if self._base_url is None:
            raise RuntimeError("the emulator is not running; call start() or use 'async with'")
        return self._base_url

    def script(self, *faults: Fault) -> None:
        """Queue faults for the next generation requests, one each, in arrival order.

        Example::

            emu.script(Fault.status(503), Fault.drop())  # 1st request 503, 2nd dropped, 3rd ok
        """
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"script() takes Fault objects, got {type(fault).__name__}")
        self._pipeline.script.extend(faults)

    def reset(self) -> None:
        """Zero the counters, forget recorded requests, the fault script, rate-limit state,
        stored idempotent responses, and restart the random fault sequence from ``seed``.

        Example::

            emu.reset()
            assert emu.stats.requests == 0 and emu.requests == []
        """
        self._pipeline.reset()

    async def start(self) -> None:
        """Bind and start serving (``async with`` does this for you).

        Example::

            emu = Emulator()
            await emu.start()
            try:
                ...
            finally:
                await emu.close()
        """
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        runner = Runner(
            make_app(self._pipeline, self.reset),
            # Access logging costs more than the rest of the hot path; the stats replace it.
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await runner.setup()
        try:
            site = TCPSite(runner, self._host, self._port, backlog=_BACKLOG)
            await site.start()
            port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._pipeline.waits.open()
        self._runner = runner
        self._base_url = f"http://{host}:{port}/v1"

    async def close(self) -> None:
        """Stop serving; requests still waiting (latency, slow faults) are dropped.

        Safe to call more than once.

        Example::

            await emu.close()
            await emu.close()  # no-op
        """
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        self._base_url = None
        self._pipeline.waits.close()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        keys = None if self._key_ids is None else sorted(self._key_ids.values())
        where = self._base_url or f"{self._host}:{self._port} (not running)"
        return f"<Emulator {where} keys={keys} rate_limit={self._rate_limit} burst={self._burst}>"
