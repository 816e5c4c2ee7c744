"""Client overhead: flux-async vs a raw aiohttp loop against a server faster than both.

The fan-out benchmark talks to the bundled emulator, which on two cores is itself the
bottleneck, so the clients wait on it and their own cost is hidden. Here the server is
`_fastserver.py`: a bare ``asyncio.Protocol`` in its own process answering every
``POST /v1/images/generations`` with one constant body, several times cheaper per request
than either client, so the client is what is measured (its CPU share of the run is
printed, next to the server's).

Setup: 8,000 prompts, concurrency 64. Each contender is warmed up once, then run
``--rounds`` times (9) interleaved, rotating the order, so each round's two runs are
back to back. The table shows each contender's median, and as the ratio the median of
the rounds' own flux ÷ raw ratios: on a shared machine whose load drifts from second to
second, a ratio of two runs made side by side is steadier than a ratio of two medians
(printed in the notes as well).

* flux-async: ``FluxClient(api_key=..., base_url=..., max_connections=64)
  .gather_generate(prompts, concurrency=64)``, every other setting default;
* raw aiohttp: one ``ClientSession`` (``TCPConnector(limit=64)``), a semaphore,
  ``asyncio.gather``, POST JSON, read the body, ``json.loads``.

Client CPU µs/request is this process's CPU time (``time.process_time()``) over the timed
region ÷ prompts; imports and the server's start-up are outside it.

Targets: flux-async client CPU/request ≤ 1.10x raw, requests/s ≥ 0.90x raw.

On a busy machine the same code measures ±15 % from one invocation to the next.
``--instructions`` adds a steadier cross-check (Linux, needs ``valgrind``; about three
minutes): each contender runs in a child process under callgrind at two batch sizes,
and the difference of the instruction counts over the difference of the sizes is the
client's instructions per request, start-up and imports cancelled out. It is repeatable
to a few per cent (how many answers each loop iteration finds still varies), but counts
no cache misses or system time. Callgrind's branch simulation runs too, and the branches
its simple predictor mispredicts per request are printed beside them: a mispredicted
branch costs a modern CPU some 15-20 cycles, so code that runs 5 % more instructions and
mispredicts 12 % more branches takes more than 5 % longer. A third count runs flux-async
with a transport that answers at once (no socket, no aiohttp): what its own layers cost
per request (the call, the attempt, the limiter, the parse, the fan-out's worker).

``--fresh ROUNDS`` (6; 0 with ``--quick``) adds runs of each contender in a process of its
own, as a user's script runs: whether its socket reads map memory afresh each time
(asyncio asks for 256 KiB a read, above glibc's mmap threshold, and depending on what the
process freed before, each read then maps, faults in and unmaps that buffer) shows in its
page faults per request.

    python benchmarks/bench_overhead.py [--quick] [--prompts 8000] [--concurrency 64] [--rounds 9]
    python benchmarks/bench_overhead.py --instructions
    python benchmarks/bench_overhead.py --fresh 0   # without them
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from _common import (
    FLUX,
    RAW,
    RUNNERS,
    BenchOutput,
    Row,
    RunResult,
    callgrind_counts,
    fmt_ratio,
    interleaved_rounds,
    measure,
    median,
    prompts,
    run_main,
)
from _fastserver import FastServerProcess

CONTENDERS = (FLUX, RAW)
#: --instructions only: flux-async over a transport that answers at once.
OWN = "own layers"
#: What that transport answers: the common answer, one URL.
OWN_BODY = b'{"created": 1700000000, "data": [{"url": "https://img.example/x.png"}]}'
OWN_HEADERS = {"Content-Type": "application/json"}
TARGET_RPS = 0.90
TARGET_CPU = 1.10
# Below this share of wall time on the CPU, a client was waiting on something else.
CLIENT_BUSY_WARNING = 0.85
# Above this share of wall time on the CPU, the server may be what the client waits on.
SERVER_BUSY_WARNING = 0.70
# --instructions: batch sizes whose difference is counted (start-up cancels out).
INSTRUCTION_SIZES = (500, 2500)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="2,000 prompts, 3 rounds (a smoke run)"
    )
    parser.add_argument("--prompts", type=int, default=None, help="prompts per run (8000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (9)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per request under valgrind (slow, steady)",
    )
    parser.add_argument(
        "--fresh",
        type=int,
        default=None,
        metavar="ROUNDS",
        help="runs of each contender in a process of its own, with page faults (6; 0: none)",
    )
    # Internal: one contender's batch in this process, for --instructions.
    parser.add_argument(
        "--child", nargs=3, metavar=("CONTENDER", "N", "BASE_URL"), help=argparse.SUPPRESS
    )

    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 2000 if args.quick else 8000
    if args.rounds is None:
        args.rounds = 3 if args.quick else 9
    if args.fresh is None:
        args.fresh = 0 if args.quick else 6
    return args


def run(args: argparse.Namespace) -> BenchOutput:
    n, c = args.prompts, args.concurrency
    warm_n = max(500, n // 4)
    print(
        f"client overhead: {n} prompts, concurrency {c}, fast constant-body server, "
        f'{args.rounds} interleaved round(s) ("emulator CPU" below: the fast server\'s)'
    )
    with FastServerProcess() as server:

        def run_one(name: str, count: int = n) -> RunResult:
            server.reset()
            result = measure(name, server, count, c)
            served = server.stats()["requests"]
            if served != count:
                result.errors[f"server saw {served} requests"] += 1
            return result

        runs = interleaved_rounds(
            CONTENDERS, args.rounds, run_one, warmup=lambda name: run_one(name, warm_n)
        )

    rps = {name: median(r.rps for r in rs) for name, rs in runs.items()}
    cpu = {name: median(r.cpu_us_per_request for r in rs) for name, rs in runs.items()}
    busy = {name: median(r.busy for r in rs) for name, rs in runs.items()}
    server_busy = {
        name: median(r.server_cpu / r.wall for r in rs if r.server_cpu is not None)
        for name, rs in runs.items()
    }
    failed = {name: sum(r.failed for r in rs) for name, rs in runs.items()}
    pairs = list(zip(runs[FLUX], runs[RAW], strict=True))
    paired_rps = [f.rps / r.rps for f, r in pairs]
    paired_cpu = [f.cpu_us_per_request / r.cpu_us_per_request for f, r in pairs]
    rps_ratio = median(paired_rps)
    cpu_ratio = median(paired_cpu)
    clean = failed[FLUX] == 0 and failed[RAW] == 0
    setup = f"n={n}, c={c}"
    rows = [
        Row(
            figure=f"fast-server req/s, flux ÷ raw ({setup})",
            flux=f"{rps[FLUX]:.0f} req/s",
            peer=f"{RAW} {rps[RAW]:.0f} req/s",
            ratio=fmt_ratio(rps_ratio),
            target=f">= {TARGET_RPS:.2f}x",
            met=clean and rps_ratio >= TARGET_RPS,
        ),
        Row(
            figure="fast-server client CPU us/req, flux ÷ raw",
            flux=f"{cpu[FLUX]:.0f} us",
            peer=f"{RAW} {cpu[RAW]:.0f} us",
            ratio=fmt_ratio(cpu_ratio),
            target=f"<= {TARGET_CPU:.2f}x",
            met=clean and cpu_ratio <= TARGET_CPU,
        ),
    ]
    notes = [
        f"median of {args.rounds} interleaved round(s) after one warm-up of {warm_n} "
        "prompts each, against a constant-body asyncio server in its own process; "
        "flux ÷ raw round by round (the table's ratio is their median): req/s "
        + ", ".join(f"{p:.2f}" for p in paired_rps)
        + "; CPU/req "
        + ", ".join(f"{p:.2f}" for p in paired_cpu)
        + f"; ratio of the medians instead: req/s {fmt_ratio(rps[FLUX] / rps[RAW])}, "
        f"CPU/req {fmt_ratio(cpu[FLUX] / cpu[RAW])}; "
        + "; ".join(
            f"{name}: {rps[name]:.0f} req/s, {cpu[name]:.0f} us CPU/req, client on CPU "
            f"{100 * busy[name]:.0f}% / server {100 * server_busy[name]:.0f}% of the wall "
            f"time, {failed[name]} failed"
            for name in CONTENDERS
        )
    ]
    if args.instructions:
        counted = count_instructions(c)
        own, whole = counted[OWN]["Ir"], counted[FLUX]["Ir"]
        rows.append(
            Row(
                figure="flux-async's own layers, instructions/req (instant transport)",
                flux=f"{own / 1000:.1f}k",
                peer=f"whole stack {whole / 1000:.1f}k",
                ratio=f"{own / whole:.2f}",
                target="(info)",
                met=None,
            )
        )
        for key, figure in (
            ("Ir", "fast-server client instructions/req, flux ÷ raw (callgrind)"),
            ("mispredicted", "fast-server client branches mispredicted/req, flux ÷ raw"),
        ):
            flux, raw = counted[FLUX][key], counted[RAW][key]
            rows.append(
                Row(
                    figure=figure,
                    flux=f"{flux / 1000:.1f}k",
                    peer=f"{RAW} {raw / 1000:.1f}k",
                    ratio=fmt_ratio(flux / raw),
                    target="(info)",
                    met=None,
                )
            )
        low, high = INSTRUCTION_SIZES
        notes.append(
            f"instructions per request: (count at {high} prompts - count at {low}) / "
            f"{high - low}, each contender alone in a child process under callgrind, c={c}"
        )
    if args.fresh:
        fresh_rows, fresh_note = run_fresh(args.fresh, n, c)
        rows += fresh_rows
        notes.append(fresh_note)
    if min(busy.values()) < CLIENT_BUSY_WARNING:
        notes.append(
            f"the clients were on the CPU only {100 * min(busy.values()):.0f}% of the wall "
            "time (median round): other load on the machine took the rest, which makes the "
            "req/s ratio noisy; the CPU us/req ratio is the better guide"
        )
    if max(server_busy.values()) > SERVER_BUSY_WARNING:
        notes.append(
            f"the server was on the CPU up to {100 * max(server_busy.values()):.0f}% of the "
            "wall time: it may have paced the clients (other load on the machine?), which "
            "pulls the req/s ratio toward 1; the CPU us/req ratio is the better guide"
        )
    return BenchOutput("client overhead (fast server)", rows, notes)


def count_instructions(concurrency: int) -> dict[str, dict[str, float]]:
    """Per request for each contender, counted by callgrind: ``Ir`` (instructions) and
    ``mispredicted`` (conditional and indirect branches its branch simulation missed)."""
    low, high = INSTRUCTION_SIZES
    out: dict[str, dict[str, float]] = {}
    with FastServerProcess() as server:
        for name in (*CONTENDERS, OWN):
            counts = []
            for n in (low, high):
                arguments = [str(Path(__file__).resolve()), "--concurrency", str(concurrency)]
                arguments += ["--child", name, str(n), server.base_url]
                counted = callgrind_counts(arguments, branch_sim=True)
                counts.append(
                    {"Ir": counted["Ir"], "mispredicted": counted["Bcm"] + counted["Bim"]}
                )
            out[name] = {k: (counts[1][k] - counts[0][k]) / (high - low) for k in counts[0]}
            print(
                f"  instructions {name:<12} {out[name]['Ir'] / 1000:7.0f}k per request, "
                f"{out[name]['mispredicted'] / 1000:.1f}k branches mispredicted",
                flush=True,
            )
    return out


async def run_own_layers(
    base_url: str, items: list[str], concurrency: int, result: RunResult
) -> None:
    """flux-async's fan-out over a transport that answers `OWN_BODY` at once (one turn
    of the event loop, as an answer read from a socket would take): no socket, no
    aiohttp, so what is counted is flux-async's own layers. ``base_url`` is not dialled."""
    from flux_async import AsyncTransport, FluxClient, TransportRequest, TransportResponse

    class Instant(AsyncTransport):
        async def send(self, request: TransportRequest) -> TransportResponse:
            await asyncio.sleep(0)
            return TransportResponse(200, headers=OWN_HEADERS, body=OWN_BODY)

        async def aclose(self) -> None:
            pass

    async with FluxClient(base_url=base_url, api_key="bench", transport=Instant()) as client:
        for r in await client.gather_generate(items, concurrency=concurrency):
            if r.ok:
                result.ok += 1
            else:
                result.errors[type(r.error).__name__] += 1


#: --fresh: a process whose reads map memory afresh faults ~2 pages a request; one that
#: does not, well under 1.
MAPPING_FAULTS = 1.0
#: --fresh: each run, a process that imports only what a user's script would.
FRESH_CHILD = Path(__file__).resolve().parent / "_fresh_client.py"


def run_fresh(rounds: int, n: int, c: int) -> tuple[list[Row], str]:
    """Each contender ``rounds`` times in a new process, interleaved: req/s and faults."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
    with FastServerProcess() as server:
        for index in range(rounds):
            order = CONTENDERS if index % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                command = [sys.executable, str(FRESH_CHILD), name, str(n), str(c)]
                command.append(server.base_url)
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(run)
                print(
                    f"  fresh {index + 1}/{rounds} {name:11s} {run['rps']:7.0f} req/s  "
                    f"{run['cpu_us']:4.0f} us CPU/req  {run['faults']:.2f} page faults/req"
                )
    ratios = [f["rps"] / r["rps"] for f, r in zip(runs[FLUX], runs[RAW], strict=True)]

    def mapping(name: str) -> int:
        return sum(run["faults"] >= MAPPING_FAULTS for run in runs[name])

    faults = {name: median(run["faults"] for run in runs[name]) for name in CONTENDERS}
    rows = [
        Row(
            figure=f"fresh processes: req/s, flux ÷ raw ({rounds} each)",
            flux=f"{median(run['rps'] for run in runs[FLUX]):.0f} req/s",
            peer=f"{RAW} {median(run['rps'] for run in runs[RAW]):.0f} req/s",
            ratio=fmt_ratio(median(ratios)),
            target="(info)",
            met=None,
        ),
        Row(
            figure="fresh processes whose reads map memory afresh (>= 1 page fault/req)",
            flux=f"{mapping(FLUX)} of {rounds} ({faults[FLUX]:.2f} faults/req)",
            peer=f"{RAW} {mapping(RAW)} of {rounds} ({faults[RAW]:.2f} faults/req)",
            ratio="-",
            target="(info)",
            met=None,
        ),
    ]
    note = (
        f"fresh processes: each contender warmed up ({max(500, n // 4)} prompts) and timed "
        f"({n}) in a new process, {rounds} times, interleaved; flux ÷ raw req/s round by "
        "round " + ", ".join(f"{ratio:.2f}" for ratio in ratios)
    )
    return rows, note


def run_child(args: argparse.Namespace) -> int:
    name, n, base_url = args.child[0], int(args.child[1]), args.child[2]
    result = RunResult(name, n)
    runner = run_own_layers if name == OWN else RUNNERS[name]
    asyncio.run(runner(base_url, prompts(n), args.concurrency, result))
    return 0 if result.failed == 0 else 1


def main() -> int:
    args = parse_args()
    if args.child:
        return run_child(args)

    run(args).print()
    return 0


if __name__ == "__main__":
    run_main(main)
