"""One contender of ``bench_overhead.py --fresh`` in a process that imports what a user's
script would, and nothing of the benchmark harness.

Whether a process's socket reads map memory afresh depends on what it allocated and freed
before (glibc raises its mmap threshold when a mapped block is freed), so the harness's
own imports would change what is measured. Prints one JSON line: requests/s, CPU µs and
minor page faults per request of the timed run, after a warm-up.

    python benchmarks/_fresh_client.py {flux-async|raw aiohttp} N CONCURRENCY BASE_URL
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path

# The scripts run as `python benchmarks/x.py` from a checkout: make `flux_async` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from flux_async import FluxClient

BODY = {"model": "flux-kontext-pro", "n": 1, "aspect_ratio": "1:1"}


async def flux(base_url: str, prompts: list[str], concurrency: int) -> int:
    async with FluxClient(
        base_url=base_url, api_key="bench", max_connections=concurrency
    ) as client:
        results = await client.gather_generate(prompts, concurrency=concurrency)
    return sum(not result.ok for result in results)


async def raw(base_url: str, prompts: list[str], concurrency: int) -> int:
    url, headers = base_url + "/images/generations", {"Authorization": "Bearer bench"}
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str) -> bool:
            body = {**BODY, "prompt": prompt}
            async with semaphore, session.post(url, json=body, headers=headers) as response:
                return response.status == 200 and "data" in json.loads(await response.read())

        return sum(not ok for ok in await asyncio.gather(*map(one, prompts)))


async def main(name: str, n: int, concurrency: int, base_url: str) -> int:
    run = flux if name == "flux-async" else raw
    prompts = [f"bench prompt {i}: a lighthouse at dusk, oil on canvas" for i in range(n)]
    failed = await run(base_url, prompts[: max(500, n // 4)], concurrency)
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = time.process_time(), time.perf_counter()
    failed += await run(base_url, prompts, concurrency)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before.ru_minflt
    print(json.dumps({"rps": n / wall, "cpu_us": 1e6 * cpu / n, "faults": faults / n}))
    return 1 if failed else 0


if __name__ == "__main__":
    name, n, concurrency, base_url = sys.argv[1:]
    sys.exit(asyncio.run(main(name, int(n), int(concurrency), base_url)))
