"""Shared fixtures: a real emulator on a loopback socket and a client pointed at it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest
from aiohttp import web

from flux_async import FluxClient, RetryPolicy
from flux_async.emulator import Emulator

API_KEY = "sk-test-0123456789abcdef"

# `pytester` runs the pytest plugin's examples in a pytest of their own (test_plugin.py).
pytest_plugins = ["pytester"]


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """An emulator that requires ``API_KEY``, on a free port, closed after the test."""
    async with Emulator(api_keys=[API_KEY]) as emu:
        yield emu


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[FluxClient]:
    """A client for ``emulator`` whose retries never sleep."""
    async with FluxClient(
        api_key=API_KEY, base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as c:
        yield c


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, Any]:
    """Give each plain (non-async) test a loop of its own and close it afterwards.

    The looptime plugin asks the event-loop policy for a loop on every test; for a plain
    test that makes a loop nobody closes, and ``filterwarnings = error`` turns its
    ResourceWarning into a failure of whichever test runs when it is collected.
    """
    # pytest-asyncio marks every coroutine test (asyncio_mode = auto) and swaps its
    # function for a wrapper, so the marker, not the function, tells them apart.
    if pyfuncitem.get_closest_marker("asyncio") is not None:
        return (yield)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return (yield)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free local port: its root URL (``http://127.0.0.1:PORT``)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
