"""pytest fixtures for testing code built on flux-async, registered when it is installed.

Installing flux-async registers this plugin (the ``pytest11`` entry point ``flux_async``;
``-p no:flux_async`` turns it off). Its fixtures:

* ``flux_emulator``: a running `Emulator` in the test's event loop, closed after the test.
  It requires `FLUX_TEST_KEY`; set its options (``latency``, ``rate_limit``, ``burst``,
  ``max_in_flight``, ``faults``, ``api_keys``, ...) with the ``flux_emulator`` marker.
* ``flux_client``: a `FluxClient` pointed at ``flux_emulator``, with the key, and retries
  that never sleep (`RetryPolicy.for_tests`); closed after the test. The ``flux_client``
  marker passes other `FluxClient` arguments.
* ``flux_emulator_factory``: ``await flux_emulator_factory(**options)`` starts another
  emulator (all of them closed after the test).
* ``flux_mock``: a `FluxMock`, a fake server with no sockets, and ``flux_mock_client``:
  a `FluxClient` over its transport (retries never sleep; closed after the test).

The async fixtures are run by pytest-asyncio (strict or auto mode; they use the loop of
the fixture loop scope, function by default, which the test must share) when that plugin
is active, else they are plain async fixtures for another async plugin (anyio) to run.
Importing this module imports neither.

Example::

    @pytest.mark.flux_emulator(rate_limit=5, latency=0.01)
    async def test_my_app_survives_429s(flux_client, flux_emulator):
        results = await my_app.make_thumbnails(flux_client, ["a fox"] * 20)
        assert all(r.ok for r in results)
        assert flux_emulator.stats.rate_limited > 0
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ._client import FluxClient
from ._retry import RetryPolicy
from .emulator import Emulator
from .testing import FLUX_TEST_KEY, FluxMock

# The fixture functions below are plain functions: pytest_configure registers them as
# fixtures, so importing one by name gives no fixture.
__all__ = ["pytest_configure"]

_MARKERS = (
    "flux_emulator(**options): options of the flux_emulator fixture's Emulator "
    "(latency, rate_limit, burst, max_in_flight, faults, seed, api_keys, ...)",
    "flux_client(**options): FluxClient arguments for the flux_client and "
    "flux_mock_client fixtures (they override the fixtures' own)",
)


def _options(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    """The keyword options of the closest ``name`` marker (the test's over its class's)."""
    marker = request.node.get_closest_marker(name)
    if marker is None:
        return {}
    if marker.args:
        raise pytest.UsageError(f"@pytest.mark.{name} takes keyword options only")
    return dict(marker.kwargs)


def _emulator_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options = _options(request, "flux_emulator")
    options.setdefault("api_keys", [FLUX_TEST_KEY])
    return options


def _client_key(request: pytest.FixtureRequest) -> str:
    """The key the fixture client sends: the emulator's first, or the test key (any key
    passes an emulator with ``api_keys=None``)."""
    keys = _emulator_options(request)["api_keys"]
    return next(iter(keys)) if keys else FLUX_TEST_KEY


def _client_options(request: pytest.FixtureRequest, **defaults: Any) -> dict[str, Any]:
    return {"retry": RetryPolicy.for_tests(), **defaults, **_options(request, "flux_client")}


async def flux_emulator_factory() -> AsyncIterator[Callable[..., Awaitable[Emulator]]]:
    """Start emulators: ``await flux_emulator_factory(**options)``; all closed after the test.

    They require `FLUX_TEST_KEY` unless ``api_keys`` says otherwise.

    Example::

        async def test_failover(flux_emulator_factory):
            primary = await flux_emulator_factory(faults=FaultRates(error_rate=1.0))
            backup = await flux_emulator_factory()
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> Emulator:
            options.setdefault("api_keys", [FLUX_TEST_KEY])
            return await stack.enter_async_context(Emulator(**options))

        yield start


async def flux_emulator(
    request: pytest.FixtureRequest,
    flux_emulator_factory: Callable[..., Awaitable[Emulator]],
) -> Emulator:
    """A running emulator in the test's loop; options from the ``flux_emulator`` marker.

    Example::

        @pytest.mark.flux_emulator(latency=0.05, rate_limit=10, burst=2)
        async def test_pacing(flux_client, flux_emulator):
            ...
    """
    return await flux_emulator_factory(**_emulator_options(request))


async def flux_client(
    request: pytest.FixtureRequest, flux_emulator: Emulator
) -> AsyncIterator[FluxClient]:
    """A `FluxClient` for ``flux_emulator`` whose retries never sleep; closed after the test.

    Example::

        async def test_one_call(flux_client):
            assert (await flux_client.generate("a fox")).urls
    """
    options = _client_options(
        request, api_key=_client_key(request), base_url=flux_emulator.base_url
    )
    async with FluxClient(**options) as client:
        yield client


def flux_mock() -> FluxMock:
    """A `FluxMock`: a fake images server behind a `MockTransport`, no sockets.

    Example::

        def test_no_request_yet(flux_mock):
            assert flux_mock.requests == []
    """
    return FluxMock()


async def flux_mock_client(
    request: pytest.FixtureRequest, flux_mock: FluxMock
) -> AsyncIterator[FluxClient]:
    """A `FluxClient` over ``flux_mock``'s transport whose retries never sleep; closed
    after the test.

    Example::

        async def test_retries_a_503(flux_mock, flux_mock_client):
            flux_mock.script(TransportResponse(503))
            await flux_mock_client.generate("a fox")
            assert len(flux_mock.requests) == 2
    """
    options = _client_options(request, api_key=FLUX_TEST_KEY, transport=flux_mock.transport)
    async with FluxClient(**options) as client:
        yield client


# Registered as fixtures by pytest_configure, with the decorator of the async plugin in use.
_FIXTURES = (flux_emulator_factory, flux_emulator, flux_client, flux_mock, flux_mock_client)


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers and the fixtures, the async ones with pytest-asyncio's
    decorator when that plugin is active (so that they run in strict mode too).

    Example::

        $ pytest -p no:flux_async   # run without these fixtures
    """
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    decorate: Callable[..., Any] = pytest.fixture
    if config.pluginmanager.hasplugin("asyncio"):
        # Already imported: pytest loaded it as a plugin.
        import pytest_asyncio

        decorate = pytest_asyncio.fixture
    fixtures = types.ModuleType("flux_async.pytest_plugin.fixtures")
    for function in _FIXTURES:
        is_async = inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)
        setattr(fixtures, function.__name__, (decorate if is_async else pytest.fixture)(function))
    config.pluginmanager.register(fixtures, "flux_async.fixtures")
