"""The first spike: a fresh default client meets 200 concurrent calls.

A web app starts, and its first 200 requests arrive together; each handler awaits one
``generate()`` on one shared ``FluxClient`` made with every default. Nothing is known
about the server yet. Two servers, each the emulator in its own process:

* **limited**: 100 requests/s, burst 20, 0.2 s per generation (``--rate-limit 100
  --burst 20 --latency 0.2``), answering 429 at once with ``x-ratelimit-*`` headers.
  The best any client can do: 20 at once, then 100/s, so the last call ends
  (200 - 20) / 100 + 0.2 = 2.0 s after the spike began. A client that sends all 200
  at once draws 180 429s.
* **unlimited**: 0.2 s per generation, no rate limit. Here a client that holds calls
  back to learn the server only costs time: the spike's p50 and p99 are compared with
  those of a raw ``aiohttp`` session (unlimited pool) sending all 200 at once.

Each round makes a fresh client (and session) per server; ``--rounds`` (3) rounds
interleave the contenders and the figures are medians.

Targets: on the limited server the first spike draws 429s for at most 10 % of its calls
and fails none; on the unlimited server the spike's p99 is at most 1.5x raw aiohttp's.

    python benchmarks/bench_spike.py [--calls 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

import aiohttp
from _common import (
    API_KEY,
    ASPECT_RATIO,
    MODEL,
    RAW,
    BenchOutput,
    EmulatorProcess,
    Row,
    median,
    run_main,
)

from flux_async import FluxClient

RATE, BURST, LATENCY = 100, 20, 0.2
SHARE_429_TARGET = 0.10
P99_TARGET = 1.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 round (smoke)")
    parser.add_argument("--calls", type=int, default=200, help="calls in the spike (200)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


@dataclass
class Spike:
    """One spike: each call's latency from the spike's start, 429s drawn, failures."""

    latencies: list[float] = field(default_factory=list)
    rate_limited: int = 0
    failures: int = 0

    @property
    def wall(self) -> float:
        return max(self.latencies) if self.latencies else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]


async def _timed(start: float, call: Awaitable[object], spike: Spike) -> None:
    try:
        await call
    except Exception:
        spike.failures += 1
        return
    spike.latencies.append(time.perf_counter() - start)


async def flux_spike(base_url: str, calls: int) -> tuple[Spike, Spike]:
    """A fresh default client: the first spike, then (0.5 s later) a second one."""
    spikes = (Spike(), Spike())
    async with FluxClient(base_url=base_url, api_key=API_KEY) as client:
        for k, spike in enumerate(spikes):
            if k:
                await asyncio.sleep(0.5)
            before = client.limiter.statistics().rate_limited
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    _timed(start, client.generate(f"p{k}-{i}", aspect_ratio=ASPECT_RATIO), spike)
                    for i in range(calls)
                )
            )
            spike.rate_limited = client.limiter.statistics().rate_limited - before
    return spikes


async def raw_spike(base_url: str, calls: int) -> Spike:
    """A raw aiohttp session, unlimited pool, all calls at once (no retries)."""
    url = base_url + "/images/generations"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    spike = Spike()

    async def call(i: int) -> None:
        body = {"prompt": f"r{i}", "model": MODEL, "n": 1, "aspect_ratio": ASPECT_RATIO}
        async with session.post(url, json=body, headers=headers) as response:
            raw = await response.read()
            if response.status == 429:
                spike.rate_limited += 1
            if response.status != 200:
                raise RuntimeError(response.status)
        json.loads(raw)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(_timed(start, call(i), spike) for i in range(calls)))
    return spike


def run(args: argparse.Namespace) -> BenchOutput:
    limited_args = ("--rate-limit", str(RATE), "--burst", str(BURST))
    common = ("--latency", str(LATENCY), "--no-record")
    firsts: list[Spike] = []
    seconds: list[Spike] = []
    open_flux: list[Spike] = []
    open_raw: list[Spike] = []
    with (
        EmulatorProcess(*common, *limited_args) as limited,
        EmulatorProcess(*common) as unlimited,
    ):
        for round_ in range(args.rounds):
            # Each round's client is fresh, and each spike drains the limited server's
            # bucket: wait for it to fill again before the next client's first spike.
            first, second = asyncio.run(flux_spike(limited.base_url, args.calls))
            firsts.append(first)
            seconds.append(second)
            # Interleave the contenders, alternating which goes first.
            for contender in ("flux", "raw") if round_ % 2 == 0 else ("raw", "flux"):
                if contender == "flux":
                    open_flux.append(asyncio.run(flux_spike(unlimited.base_url, args.calls))[0])
                else:
                    open_raw.append(asyncio.run(raw_spike(unlimited.base_url, args.calls)))
            time.sleep(BURST / RATE + 0.3)
    ideal = (args.calls - BURST) / RATE + LATENCY
    share = median(s.rate_limited for s in firsts) / args.calls
    failed = sum(s.failures for s in firsts + seconds + open_flux)
    wall = median(s.wall for s in firsts)
    p50 = median(s.p50 for s in open_flux) / median(s.p50 for s in open_raw)
    p99 = median(s.p99 for s in open_flux) / median(s.p99 for s in open_raw)
    rows = [
        Row(
            f"first spike 429s ÷ calls, fresh default client ({args.calls} calls,"
            f" {RATE}/s burst {BURST})",
            f"{median(s.rate_limited for s in firsts):.0f} x 429, {failed} failed",
            f"all at once: {args.calls - BURST} x 429",
            f"{share:.3f}",
            f"<= {SHARE_429_TARGET:.2f}, 0 failed",
            share <= SHARE_429_TARGET and failed == 0,
        ),
        Row(
            "first spike wall ÷ ideal (limited server)",
            f"{wall:.2f} s",
            f"ideal {ideal:.2f} s",
            f"{wall / ideal:.3f}x",
            "(info)",
            None,
        ),
        Row(
            "second spike 429s (0.5 s later, same client)",
            f"{median(s.rate_limited for s in seconds):.0f} x 429",
            "-",
            "-",
            "(info)",
            None,
        ),
        Row(
            f"first spike p99, unlimited server, flux ÷ raw ({LATENCY} s)",
            f"{median(s.p99 for s in open_flux):.3f} s",
            f"{RAW} {median(s.p99 for s in open_raw):.3f} s",
            f"{p99:.3f}x",
            f"<= {P99_TARGET}",
            p99 <= P99_TARGET,
        ),
        Row(
            "first spike p50, unlimited server, flux ÷ raw",
            f"{median(s.p50 for s in open_flux):.3f} s",
            f"{RAW} {median(s.p50 for s in open_raw):.3f} s",
            f"{p50:.3f}x",
            "(info)",
            None,
        ),
    ]
    notes = [
        f"limited: first spikes {[s.rate_limited for s in firsts]} x 429,"
        f" walls {[round(s.wall, 2) for s in firsts]} s;"
        f" second spikes {[s.rate_limited for s in seconds]} x 429"
    ]
    return BenchOutput("First spike: a fresh default client", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
