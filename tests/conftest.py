"""Shared fixtures: a real emulator on a loopback socket and a client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flux_async import FluxClient, RetryPolicy
from flux_async.emulator import Emulator

API_KEY = "sk-test-0123456789abcdef"


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
