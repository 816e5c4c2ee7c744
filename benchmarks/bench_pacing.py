"""Pacing: does ``rate_limit=50`` send 50 requests/s, no more and no less?

Setup: 1,000 prompts through ``FluxClient.gather_generate(prompts, concurrency=64,
rate_limit=50)`` against a zero-latency emulator with no limit of its own, which
records the arrival time of every request (``time.monotonic()`` in the server).
From the server's timestamps:

* achieved rate = (count - 1) / (last - first): the configured 50/s would give exactly 50;
* busiest 1 s: the most requests in any sliding 1-second window ``[t, t + 1)``
  starting at a request (burst 1, so 50 at the configured rate, 51 with timer jitter).

flux-async only: the peers have no pacing of their own. Targets: achieved within ±2 %
of 50/s; no 1 s window above 52 requests.

    python benchmarks/bench_pacing.py [--prompts 1000] [--rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
from collections.abc import Sequence

from _common import (
    API_KEY,
    FLUX,
    BenchOutput,
    EmulatorProcess,
    Row,
    prompts,
    run_main,
)

from flux_async import FluxClient

TOLERANCE = 0.02
WINDOW_SLACK = 2  # requests above the rate allowed in one window


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="200 prompts (smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (1000)")
    parser.add_argument("--rate", type=float, default=50.0, help="rate_limit, requests/s")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 200 if args.quick else 1000
    return args


def busiest_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most timestamps in any window ``[t, t + width)`` that starts at a timestamp."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width, lo=i) - i for i, t in enumerate(ordered)),
        default=0,
    )


async def _paced(base_url: str, n: int, concurrency: int, rate: float) -> int:
    async with FluxClient(
        base_url=base_url, api_key=API_KEY, max_connections=concurrency
    ) as client:
        results = await client.gather_generate(prompts(n), concurrency=concurrency, rate_limit=rate)
    return sum(not r.ok for r in results)


def run(args: argparse.Namespace) -> BenchOutput:
    n, rate = args.prompts, args.rate
    print(f"pacing: {n} prompts at rate_limit={rate:g}/s, concurrency {args.concurrency}")
    with EmulatorProcess() as emu:
        failed = asyncio.run(_paced(emu.base_url, n, args.concurrency, rate))
        log = emu.request_log()
    times = sorted(t for t, _, _ in log)
    count = len(times)
    achieved = (count - 1) / (times[-1] - times[0]) if count > 1 else float("nan")
    window = busiest_window(times)
    window_cap = int(rate) + WINDOW_SLACK
    print(
        f"  {count} requests seen over {times[-1] - times[0]:.3f} s, {failed} failed; "
        f"achieved {achieved:.3f}/s, busiest 1 s window {window}"
    )
    ratio = achieved / rate
    ok = failed == 0 and count == n
    rows = [
        Row(
            figure=f"pacing achieved ÷ configured (n={n}, {rate:g}/s)",
            flux=f"{achieved:.2f} req/s",
            peer=f"configured {rate:g} req/s",
            ratio=f"{ratio:.3f}x",
            target=f"{1 - TOLERANCE:.2f}x .. {1 + TOLERANCE:.2f}x",
            met=ok and abs(ratio - 1) <= TOLERANCE,
        ),
        Row(
            figure="pacing busiest sliding 1 s window",
            flux=f"{window} requests",
            peer=f"configured {rate:g} req/s",
            ratio=f"{window / rate:.3f}x",
            target=f"<= {window_cap} requests",
            met=ok and window <= window_cap,
        ),
    ]
    notes = [
        f"{FLUX} only (the peers have no pacing); from the emulator's own arrival times: "
        f"{count} requests, first-to-last {times[-1] - times[0]:.3f} s, {failed} failed"
    ]
    return BenchOutput("pacing", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
