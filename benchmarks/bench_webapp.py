"""Web app: 200 concurrent handlers sharing one default client vs a raw aiohttp session.

Setup: an ``aiohttp.web`` app whose ``POST /images`` handler makes one upstream call
to the emulator (its own process, ``--latency 0.2``) and answers with the image URLs.
The app runs in this process on 127.0.0.1, its load generator too (one event loop);
the two apps differ only in what their handlers hold:

* ``flux-async``: one ``FluxClient(base_url=..., api_key=...)`` with every default
  (pool, limiter, retry policy), made and closed in the app's ``cleanup_ctx``;
* ``raw aiohttp``: one ``aiohttp.ClientSession`` with an unlimited pool
  (``TCPConnector(limit=0)``): POST JSON, read the body, ``json.loads`` it;
* (information) ``flux-async`` with ``max_connections=100``, the default before 0.4.

Each round starts each app fresh and sends it two bursts of 200 concurrent requests
(``--handlers``): the first opens the connections (client to app, app to upstream), the
second, 0.5 s later, is timed request by request at the load generator. ``--rounds``
(3) rounds interleave the apps; the figures are the medians of each round's p50 and p99.

Targets: flux-async p50 ≤ 1.15x and p99 ≤ 1.25x raw aiohttp's, 0 failed requests.

    python benchmarks/bench_webapp.py [--handlers 200] [--latency 0.2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
from _common import (
    API_KEY,
    ASPECT_RATIO,
    FLUX,
    MODEL,
    RAW,
    BenchOutput,
    EmulatorProcess,
    Row,
    median,
    run_main,
)
from aiohttp import web

from flux_async import FluxClient

P50_TARGET = 1.15
P99_TARGET = 1.25
OLD_POOL = "flux-async, pool 100"
APPS = (FLUX, RAW, OLD_POOL)
UPSTREAM = web.AppKey("upstream", object)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 round (smoke)")
    parser.add_argument("--handlers", type=int, default=200, help="requests per burst (200)")
    parser.add_argument("--latency", type=float, default=0.2, help="upstream seconds/request")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


@dataclass
class Burst:
    """One timed burst against one app: each request's latency, and the failures."""

    app: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]

    def summary(self) -> str:
        failed = f", FAILED {self.failures}" if self.failures else ""
        return f"{self.app:<22} p50 {self.p50:.3f} s  p99 {self.p99:.3f} s{failed}"


def flux_app(base_url: str, max_connections: int | None) -> web.Application:
    """The app of docs/examples/aiohttp_app.py, reduced to the call being measured."""

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = {} if max_connections is None else {"max_connections": max_connections}
        async with FluxClient(base_url=base_url, api_key=API_KEY, **settings) as client:
            app[UPSTREAM] = client
            yield

    async def handler(request: web.Request) -> web.Response:
        order = await request.json()
        client = request.app[UPSTREAM]
        assert isinstance(client, FluxClient)
        response = await client.generate(order["prompt"], aspect_ratio=ASPECT_RATIO)
        return web.json_response({"urls": response.urls})

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_post("/images", handler)
    return app


def raw_app(base_url: str) -> web.Application:
    """The same app holding one aiohttp session with an unlimited pool."""
    url = base_url + "/images/generations"
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[UPSTREAM] = session
            yield

    async def handler(request: web.Request) -> web.Response:
        order = await request.json()
        session = request.app[UPSTREAM]
        assert isinstance(session, aiohttp.ClientSession)
        body = {"prompt": order["prompt"], "model": MODEL, "n": 1, "aspect_ratio": ASPECT_RATIO}
        async with session.post(url, json=body, headers=headers) as response:
            raw = await response.read()
            if response.status != 200:
                return web.json_response({"error": response.status}, status=502)
        return web.json_response({"urls": [item["url"] for item in json.loads(raw)["data"]]})

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/images", handler)
    return app


async def burst(session: aiohttp.ClientSession, url: str, name: str, n: int) -> Burst:
    """``n`` concurrent requests to the app; each timed from send to body read."""
    result = Burst(name)

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            async with session.post(url, json={"prompt": f"web app prompt {i}"}) as response:
                body = await response.read()
                ok = response.status == 200 and bool(json.loads(body)["urls"])
        except aiohttp.ClientError:
            ok = False
        if ok:
            result.latencies.append(time.perf_counter() - started)
        else:
            result.failures += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return result


async def measure_app(name: str, make: Callable[[], web.Application], n: int) -> Burst:
    """Start the app, send a warm-up burst, then the timed one; stop the app."""
    runner = web.AppRunner(make(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/images"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as load:
            warmup = await burst(load, url, name, n)
            if warmup.failures:
                print(f"  warm-up {warmup.summary()}")
            await asyncio.sleep(0.5)
            return await burst(load, url, name, n)
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> BenchOutput:
    n, latency = args.handlers, args.latency
    print(
        f"web app: {n} concurrent handlers, upstream latency {latency}s, "
        f"{args.rounds} round(s), second burst of each app timed"
    )
    runs: dict[str, list[Burst]] = {name: [] for name in APPS}
    with EmulatorProcess("--latency", str(latency), "--no-record") as emu:
        makers: dict[str, Callable[[], web.Application]] = {
            FLUX: lambda: flux_app(emu.base_url, None),
            RAW: lambda: raw_app(emu.base_url),
            OLD_POOL: lambda: flux_app(emu.base_url, 100),
        }
        order = list(APPS)
        for i in range(args.rounds):
            for name in order:
                gc.collect()
                result = asyncio.run(measure_app(name, makers[name], n))
                runs[name].append(result)
                print(f"  round {i + 1}/{args.rounds} {result.summary()}", flush=True)
            order = order[1:] + order[:1]

    p50 = {name: median(b.p50 for b in bursts) for name, bursts in runs.items()}
    p99 = {name: median(b.p99 for b in bursts) for name, bursts in runs.items()}
    failed = {name: sum(b.failures for b in bursts) for name, bursts in runs.items()}
    setup = f"{n} handlers, {latency:g} s upstream"
    ok = failed[FLUX] == 0

    def ratio(figures: dict[str, float], name: str) -> float:
        return figures[name] / figures[RAW]

    rows = [
        Row(
            figure=f"web app p50, flux ÷ raw ({setup})",
            flux=f"{p50[FLUX]:.3f} s",
            peer=f"{RAW} {p50[RAW]:.3f} s",
            ratio=f"{ratio(p50, FLUX):.3f}x",
            target=f"<= {P50_TARGET:.2f}",
            met=ok and ratio(p50, FLUX) <= P50_TARGET,
        ),
        Row(
            figure="web app p99, flux ÷ raw",
            flux=f"{p99[FLUX]:.3f} s",
            peer=f"{RAW} {p99[RAW]:.3f} s",
            ratio=f"{ratio(p99, FLUX):.3f}x",
            target=f"<= {P99_TARGET:.2f}",
            met=ok and ratio(p99, FLUX) <= P99_TARGET,
        ),
        Row(
            figure="web app p50 with the old pool (100), ÷ raw",
            flux=f"{p50[OLD_POOL]:.3f} s",
            peer=f"{RAW} {p50[RAW]:.3f} s",
            ratio=f"{ratio(p50, OLD_POOL):.3f}x",
            target="(info)",
            met=None,
        ),
    ]
    notes = [
        f"{n} concurrent requests to an aiohttp.web app per burst, the second timed; median "
        f"of {args.rounds} round(s); "
        + "; ".join(
            f"{name}: p50 {p50[name]:.3f} s, p99 {p99[name]:.3f} s, {failed[name]} failed"
            for name in APPS
        )
    ]
    return BenchOutput("web app", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
