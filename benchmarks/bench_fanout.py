"""Fan-out overhead: requests/s through flux-async vs a raw aiohttp loop and the openai client.

Setup: 5,000 prompts, concurrency 64, a zero-latency emulator in another process (so
the figure is what each client costs per request, not what the server takes). Each
contender is warmed up once, then run ``--rounds`` times (3) interleaved, rotating the
order; the median requests/s of each is compared.

* flux-async: ``FluxClient(...).gather_generate(prompts, concurrency=64)``
  (``max_connections=64``, default retry policy and limiter);
* raw aiohttp: one ``ClientSession`` (``TCPConnector(limit=64)``), a semaphore,
  ``asyncio.gather``, POST JSON, read the body, ``json.loads``;
* openai: ``AsyncOpenAI.images.generate`` under a semaphore (pool of 1000 connections).

Targets: flux-async ≥ 0.90x raw aiohttp and ≥ 5x openai (requests/s). Client CPU
µs/request (this process's CPU time ÷ prompts) is also printed: on a noisy machine it
is steadier than wall time.

    python benchmarks/bench_fanout.py [--prompts 5000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from _common import (
    CONTENDERS,
    FLUX,
    OPENAI,
    RAW,
    BenchOutput,
    EmulatorProcess,
    Row,
    RunResult,
    fmt_ratio,
    interleaved_rounds,
    measure,
    median,
    run_main,
)

TARGET_VS_RAW = 0.90
TARGET_VS_OPENAI = 5.0
# Below this share of wall time on the CPU, a client was waiting on something else.
BUSY_WARNING = 0.85


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1,000 prompts, 1 round (smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per run (5000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument(
        "--openai-rounds",
        type=int,
        default=None,
        help="rounds openai takes part in (3; it is 10x slower, the first rounds)",
    )
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 1000 if args.quick else 5000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.openai_rounds is None:
        args.openai_rounds = min(args.rounds, 3)
    return args


def run(args: argparse.Namespace) -> BenchOutput:
    n, c = args.prompts, args.concurrency
    warm_n = max(200, n // 5)
    print(f"fan-out: {n} prompts, concurrency {c}, zero latency, {args.rounds} round(s)")
    with EmulatorProcess("--no-record") as emu:

        def run_one(name: str) -> RunResult:
            emu.reset()
            return measure(name, emu, n, c)

        def warmup(name: str) -> RunResult:
            emu.reset()
            return measure(name, emu, warm_n, c)

        runs = interleaved_rounds(
            CONTENDERS,
            args.rounds,
            run_one,
            warmup=warmup,
            rounds_for={OPENAI: args.openai_rounds},
        )

    rps = {name: median(r.rps for r in rs) for name, rs in runs.items()}
    cpu = {name: median(r.cpu_us_per_request for r in rs) for name, rs in runs.items()}
    failed = {name: sum(r.failed for r in rs) for name, rs in runs.items()}
    vs_raw = rps[FLUX] / rps[RAW]
    vs_openai = rps[FLUX] / rps[OPENAI]
    cpu_vs_raw = cpu[FLUX] / cpu[RAW]
    clean = failed[FLUX] == 0
    setup = f"n={n}, c={c}"
    rows = [
        _row(f"fan-out req/s, flux ÷ raw ({setup})", rps, RAW, vs_raw, TARGET_VS_RAW, clean),
        _row(
            f"fan-out req/s, flux ÷ openai ({setup})",
            rps,
            OPENAI,
            vs_openai,
            TARGET_VS_OPENAI,
            clean,
        ),
    ]
    rows.append(
        Row(
            figure="fan-out client CPU us/req, flux ÷ raw",
            flux=f"{cpu[FLUX]:.0f} us",
            peer=f"{RAW} {cpu[RAW]:.0f} us; {OPENAI} {cpu[OPENAI]:.0f} us",
            ratio=fmt_ratio(cpu_vs_raw),
            target="(info)",
            met=None,
        )
    )
    paired = [f.rps / r.rps for f, r in zip(runs[FLUX], runs[RAW], strict=True)]
    notes = [
        f"median of {args.rounds} interleaved round(s) ({args.openai_rounds} for openai) "
        f"after one warm-up of {warm_n} prompts each; flux ÷ raw req/s round by round: "
        + ", ".join(f"{p:.2f}" for p in paired)
        + "; "
        + "; ".join(
            f"{name}: {rps[name]:.0f} req/s, {cpu[name]:.0f} us CPU/req, {failed[name]} failed"
            for name in CONTENDERS
        )
    ]
    busy = min(median(r.busy for r in runs[FLUX]), median(r.busy for r in runs[RAW]))
    if busy < BUSY_WARNING:
        notes.append(
            f"the clients were on the CPU only {100 * busy:.0f}% of the wall time (median "
            "round): this run was bound by the emulator or by other load on the machine, "
            "which pulls the req/s ratio toward 1; the CPU us/req ratio "
            f"({fmt_ratio(cpu_vs_raw)}) is the better guide to flux-async's own overhead"
        )
    return BenchOutput("fan-out overhead", rows, notes)


def _row(
    figure: str,
    rps: dict[str, float],
    peer: str,
    ratio: float,
    target: float,
    clean: bool,
) -> Row:
    return Row(
        figure=figure,
        flux=f"{rps[FLUX]:.0f} req/s",
        peer=f"{peer} {rps[peer]:.0f} req/s",
        ratio=fmt_ratio(ratio),
        target=f">= {target:.2f}x",
        met=clean and ratio >= target,
    )


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
