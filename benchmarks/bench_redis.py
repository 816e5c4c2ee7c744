"""Redis: one API key's quota shared by 4 OS processes through `RedisRateLimiter`.

Setup: a ``redis-server`` this script starts on a free port (or ``--redis-url``), the
emulator in its own process, and 4 worker processes (this script with ``--worker``), each
running ``FluxClient.gather_generate(its quarter of the prompts, concurrency=8,
limiter=...)`` with the default retry policy. All 4 start together. Figures come from the
emulator's own arrival timestamps and counters:

1. **Pacing**: one shared ``RedisRateLimiter(rate=100)`` against an emulator with no limit,
   2,000 prompts (20 s; ``--quick``: 800, 8 s). Achieved = (count - 1) / (last - first)
   within ±3 % of 100/s; no sliding 1 s window above 103 requests; 0 prompts lost.
2. **Shared adaptation**: the same 4 processes with a ceiling of 100/s against an emulator
   that admits 60/s (``--rate-limit 60 --burst 5``), 1,200 prompts (20 s at capacity;
   ``--quick``: 480). Goodput (successes ÷ the batch's wall time ÷ 60) ≥ 0.85, ≤ 1.3
   attempts per prompt (emulator requests ÷ prompts), 0 prompts failed.
3. **Contrast**: both runs again with an in-process ``RateLimiter(100)`` in each process
   (what a deployment without Redis gets): their rate, 429s, goodput and attempts, side
   by side in the ``peer`` column (no target).
4. **Cost**: permits per second one process takes from the local Redis (64 waiters, no
   effective rate limit) ≥ 2,000/s, and one waiter's permits per second (one round trip
   each; information).

Also saves ``docs/img/redis.png``: accepted (2xx) and rejected (429) requests per second
against the 60/s server, shared limiter above, in-process limiters below, from the
emulator's own timestamps (needs matplotlib; ``--no-plot`` skips it).

    python benchmarks/bench_redis.py [--quick] [--redis-url redis://...] [--no-plot]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import (
    API_KEY,
    IMG_DIR,
    BenchOutput,
    EmulatorProcess,
    Row,
    prompts,
    run_main,
)
from bench_storm import plot

from flux_async import FluxClient, RateLimiter

PROCESSES = 4
RATE = 100.0
CAPACITY = 60.0
CAPACITY_BURST = 5
CONCURRENCY = 8
PACING_TOLERANCE = 0.03
WINDOW_CAP = 103
TARGET_GOODPUT = 0.85
TARGET_ATTEMPTS = 1.30
TARGET_PERMITS = 2000.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="~8 s per run instead of 20 s")
    parser.add_argument("--redis-url", default=None, help="use this Redis, not a new one")
    parser.add_argument("--plot", type=Path, default=IMG_DIR / "redis.png")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seconds = 8.0 if args.quick else 20.0
    return args


# -- Redis -------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """The given URL, or a throwaway ``redis-server`` on a free port."""
    if url is not None:
        yield url
        return
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--dir", directory, "--save", "", "--appendonly", "no", "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock,
                ):
                    sock.sendall(b"PING\r\n")
                    if sock.recv(100).startswith(b"+PONG"):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# -- the worker processes ----------------------------------------------------------------


async def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["limiter"] == "redis":
        from flux_async.redis import RedisRateLimiter

        limiter: Any = RedisRateLimiter.from_url(cfg["redis_url"], name=cfg["name"], rate=RATE)
    else:
        limiter = RateLimiter(RATE)
    items = [f"{p} (worker {cfg['index']})" for p in prompts(cfg["prompts"])]
    async with FluxClient(
        base_url=cfg["base_url"], api_key=API_KEY, max_connections=CONCURRENCY
    ) as client:
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results = await client.gather_generate(items, concurrency=CONCURRENCY, limiter=limiter)
    end = time.monotonic()
    if cfg["limiter"] == "redis":
        await limiter.aclose()
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[type(r.error).__name__] = errors.get(type(r.error).__name__, 0) + 1
    return {"ok": sum(r.ok for r in results), "errors": errors, "end": end}


def worker_main(raw: str) -> int:
    print(json.dumps(asyncio.run(_worker(json.loads(raw)))), flush=True)
    return 0


def run_processes(limiter: str, base_url: str, redis_url: str, n: int) -> tuple[float, dict]:
    """4 workers over ``n`` prompts: (wall time from GO to the last one done, totals)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    procs = []
    for i in range(PROCESSES):
        cfg = {
            "limiter": limiter,
            "redis_url": redis_url,
            "name": name,
            "base_url": base_url,
            "prompts": n // PROCESSES,
            "index": i,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("a worker did not start")
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        outs = []
        for proc in procs:
            assert proc.stdout is not None
            outs.append(json.loads(proc.stdout.readline()))
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors: dict[str, int] = {}
    for out in outs:
        for k, v in out["errors"].items():
            errors[k] = errors.get(k, 0) + v
    totals = {"ok": sum(o["ok"] for o in outs), "failed": sum(errors.values()), "errors": errors}
    return max(o["end"] for o in outs) - started, totals


def busiest_window(times: Sequence[float], width: float = 1.0) -> int:
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width, lo=i) - i for i, t in enumerate(ordered)),
        default=0,
    )


def achieved(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return (len(ordered) - 1) / (ordered[-1] - ordered[0]) if len(ordered) > 1 else float("nan")


# -- the runs ----------------------------------------------------------------------------


def pacing_run(limiter: str, redis_url: str, n: int) -> dict[str, Any]:
    with EmulatorProcess() as emu:
        wall, totals = run_processes(limiter, emu.base_url, redis_url, n)
        times = [t for t, _, _ in emu.request_log()]
    rate, window = achieved(times), busiest_window(times)
    print(
        f"  pacing, {limiter:<10}: {len(times)} requests in {wall:.1f} s, achieved "
        f"{rate:.2f}/s, busiest 1 s window {window}, failed {totals['failed']}"
    )
    return {"rate": rate, "window": window, "lost": n - totals["ok"], **totals}


def storm_run(limiter: str, redis_url: str, n: int) -> dict[str, Any]:
    server = ("--rate-limit", f"{CAPACITY:g}", "--burst", str(CAPACITY_BURST))
    with EmulatorProcess(*server) as emu:
        wall, totals = run_processes(limiter, emu.base_url, redis_url, n)
        stats = emu.stats()
        log = emu.request_log()
    goodput = totals["ok"] / wall / CAPACITY
    attempts = stats["requests"] / n
    print(
        f"  60/s server, {limiter:<10}: {totals['ok']} ok, {totals['failed']} failed in "
        f"{wall:.1f} s; goodput {goodput:.3f}x capacity, {stats['rate_limited']} x 429, "
        f"{attempts:.2f} attempts/prompt"
    )
    return {
        "goodput": goodput,
        "attempts": attempts,
        "limited": stats["rate_limited"],
        "wall": wall,
        "log": log,
        **totals,
    }


async def _permits(redis_url: str, waiters: int, seconds: float) -> float:
    from flux_async.redis import RedisRateLimiter

    # A rate no run can reach: every permit is a round trip, nothing is ever paced.
    limiter = RedisRateLimiter.from_url(
        redis_url, name=f"bench-{uuid.uuid4().hex[:8]}", rate=1e7, burst=100_000
    )
    count = 0
    async with limiter:
        await limiter.acquire()  # connect first
        deadline = time.monotonic() + seconds

        async def one() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                await limiter.acquire()
                limiter.on_success()
                count += 1

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(waiters)))
        elapsed = time.monotonic() - started
    return count / elapsed


def run(args: argparse.Namespace) -> BenchOutput:
    seconds = args.seconds
    n_pacing = int(RATE * seconds)
    n_storm = int(CAPACITY * seconds)
    print(
        f"redis: {PROCESSES} processes x concurrency {CONCURRENCY}; pacing {n_pacing} prompts "
        f"at {RATE:g}/s shared; adaptation {n_storm} prompts, ceiling {RATE:g}/s vs "
        f"{CAPACITY:g}/s (burst {CAPACITY_BURST})"
    )
    with redis_server(args.redis_url) as url:
        pacing = pacing_run("redis", url, n_pacing)
        pacing_local = pacing_run("in-process", url, n_pacing)
        storm = storm_run("redis", url, n_storm)
        storm_local = storm_run("in-process", url, n_storm)
        many = asyncio.run(_permits(url, 64, 1.0 if args.quick else 3.0))
        one = asyncio.run(_permits(url, 1, 1.0 if args.quick else 2.0))
    if args.plot is not None:
        logs = {
            "one shared RedisRateLimiter": storm["log"],
            f"a RateLimiter({RATE:g}) per process": storm_local["log"],
        }
        plot(args.plot, logs, CAPACITY, n_storm, PROCESSES * CONCURRENCY)
    print(f"  permits/s from local Redis, one process: {many:.0f} (64 waiters), {one:.0f} (1)")

    peer_pacing = "in-process x4"
    rows = [
        Row(
            figure=f"redis pacing achieved ÷ configured ({PROCESSES} procs, {RATE:g}/s)",
            flux=f"{pacing['rate']:.2f} req/s",
            peer=f"{peer_pacing}: {pacing_local['rate']:.1f} req/s",
            ratio=f"{pacing['rate'] / RATE:.3f}x",
            target=f"{1 - PACING_TOLERANCE:.2f}x .. {1 + PACING_TOLERANCE:.2f}x",
            met=pacing["lost"] == 0 and abs(pacing["rate"] / RATE - 1) <= PACING_TOLERANCE,
        ),
        Row(
            figure="redis pacing busiest sliding 1 s window",
            flux=f"{pacing['window']} requests",
            peer=f"{peer_pacing}: {pacing_local['window']}",
            ratio=f"{pacing['window'] / RATE:.3f}x",
            target=f"<= {WINDOW_CAP} requests",
            met=pacing["lost"] == 0 and pacing["window"] <= WINDOW_CAP,
        ),
        Row(
            figure="redis pacing prompts lost",
            flux=str(pacing["lost"]),
            peer=f"{peer_pacing}: {pacing_local['lost']}",
            ratio="-",
            target="0",
            met=pacing["lost"] == 0,
        ),
        Row(
            figure=f"redis shared adaptation goodput ÷ capacity ({RATE:g} vs {CAPACITY:g}/s)",
            flux=f"{storm['goodput']:.3f}x",
            peer=f"{peer_pacing}: {storm_local['goodput']:.3f}x",
            ratio=f"{storm['goodput']:.3f}x",
            target=f">= {TARGET_GOODPUT:.2f}x",
            met=storm["goodput"] >= TARGET_GOODPUT,
        ),
        Row(
            figure="redis shared adaptation attempts per prompt",
            flux=f"{storm['attempts']:.2f} ({storm['limited']} x 429)",
            peer=f"{peer_pacing}: {storm_local['attempts']:.2f} ({storm_local['limited']} x 429)",
            ratio=f"{storm['attempts']:.2f}",
            target=f"<= {TARGET_ATTEMPTS:.2f}",
            met=storm["attempts"] <= TARGET_ATTEMPTS,
        ),
        Row(
            figure="redis shared adaptation prompts failed",
            flux=str(storm["failed"]),
            peer=f"{peer_pacing}: {storm_local['failed']}",
            ratio="-",
            target="0",
            met=storm["failed"] == 0,
        ),
        Row(
            figure="redis permits/s, one process, 64 waiters",
            flux=f"{many:.0f}/s",
            peer=f"1 waiter: {one:.0f}/s",
            ratio=f"{many / TARGET_PERMITS:.2f}x",
            target=f">= {TARGET_PERMITS:.0f}/s",
            met=many >= TARGET_PERMITS,
        ),
    ]
    notes = [
        f"{PROCESSES} OS processes sharing one RedisRateLimiter (name per run) against the "
        f"emulator in its own process; rates from the emulator's arrival times: shared "
        f"{pacing['rate']:.2f}/s over {n_pacing} requests vs {pacing_local['rate']:.1f}/s "
        f"with an in-process RateLimiter({RATE:g}) per process",
        f"against {CAPACITY:g}/s: shared {storm['ok']} ok in {storm['wall']:.1f} s with "
        f"{storm['limited']} x 429; in-process {storm_local['ok']} ok in "
        f"{storm_local['wall']:.1f} s with {storm_local['limited']} x 429",
    ]
    return BenchOutput("redis", rows, notes)


def main() -> int:
    args = parse_args()
    if args.worker is not None:
        return worker_main(args.worker)
    run(args).print()
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(main())
    run_main(main)
