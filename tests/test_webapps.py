"""The web-app examples of docs/guides/web-apps.md, run against the emulator.

Each example file under docs/examples/ is imported as it is (nothing copied into the
test), configured the way its docstring says (``FLUX_BASE_URL`` / ``FLUX_API_KEY``), and
driven through its real startup, many concurrent requests and shutdown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from flux_async import AiohttpTransport, FluxClient, RateLimiter
from flux_async.emulator import Emulator, Fault

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
API_KEY = "sk-web-app"


def load_example(name: str) -> ModuleType:
    """Import ``docs/examples/<name>.py`` fresh (its module-level app included)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"flux_examples_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(spec.name, None)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Emulator]:
    """The upstream, with a little latency, and the environment the examples read."""
    async with Emulator(api_keys=[API_KEY], latency=0.05) as emu:
        monkeypatch.setenv("FLUX_BASE_URL", emu.base_url)
        monkeypatch.setenv("FLUX_API_KEY", API_KEY)
        yield emu


async def test_fastapi_example(emulator: Emulator) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    example = load_example("fastapi_app")
    app = example.app
    transport = httpx.ASGITransport(app=app)
    # The lifespan runs as a server would run it: the client exists only inside it.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as http,
    ):
        client = app.state.flux
        assert isinstance(client, FluxClient)
        answers = await asyncio.gather(
            *(http.post("/images", json={"prompt": f"fox {i}"}) for i in range(50))
        )
        assert [a.status_code for a in answers] == [200] * 50
        assert all(a.json()["urls"] for a in answers)
        bad = await http.post("/images", json={"prompt": "x", "aspect_ratio": "5:1"})
        assert bad.status_code == 422
        assert bad.json()["detail"].startswith("aspect_ratio:")
        emulator.script(Fault.status(401))
        failed = await http.post("/images", json={"prompt": "no entry"})
        assert failed.status_code == 502
        health = await http.get("/health")
        assert health.json() == {"outage": False, "waiting": 0}
    assert client.closed
    assert emulator.stats.successes == 50


async def test_aiohttp_example(emulator: Emulator) -> None:
    example = load_example("aiohttp_app")
    app = example.make_app()
    async with TestClient(TestServer(app)) as http:
        client = app[example.FLUX]
        answers = await asyncio.gather(
            *(http.post("/images", json={"prompt": f"crow {i}"}) for i in range(50))
        )
        assert [a.status for a in answers] == [200] * 50
        bodies = await asyncio.gather(*(a.json() for a in answers))
        assert all(body["urls"] for body in bodies)
        bad = await http.post("/images", json={"prompt": ""})
        assert bad.status == 422
        assert (await bad.json())["error"].startswith("prompt:")
        emulator.script(Fault.status(429, headers={"Retry-After": "3600"}))
        busy = await http.post("/images", json={"prompt": "too much"})
        assert busy.status == 503
        assert busy.headers["Retry-After"] == "3600"
    assert client.closed
    assert emulator.stats.successes == 50


async def test_the_default_pool_serves_200_handlers_without_queueing() -> None:
    """200 concurrent calls on a client with the default pool are all on the wire at once
    (with the old default pool of 100, half of them queued for a connection: two round
    trips). The start ramp is off: it spreads a fresh client's first 200 calls over
    ~200 ms by design (tests/test_ramp.py), and a loaded machine can stretch that past
    the upstream's 0.5 s, which would measure the ramp and the machine, not the pool."""
    limiter = RateLimiter(slow_start=False)
    async with (
        Emulator(latency=0.5) as upstream,
        FluxClient(base_url=upstream.base_url, limiter=limiter) as client,
    ):
        transport = client.transport
        assert isinstance(transport, AiohttpTransport)
        await asyncio.gather(*(client.generate(f"p{i}") for i in range(200)))
        assert upstream.stats.max_in_flight_seen == 200
        assert transport.session is not None
        connector = transport.session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit == transport.max_connections == 1000
