"""Latency-bound fan-out: how close each client gets to the ideal wall time.

Setup: 2,000 prompts, concurrency 100, a server that takes 0.1 s per generation: the fast
constant-answer server of ``_fastserver.py`` (``--latency 0.1``) in its own process, not
the emulator, whose own CPU on two cores would set the pace (raw aiohttp measured 1.15-1.2x
the ideal against it). The ideal wall time is ``ceil(n / c) * latency`` (2.0 s): the
client keeps ``c`` requests in flight all the time and adds nothing. Each contender
(flux-async, raw aiohttp, openai; connection pools ≥ 100) is warmed up once, then run
``--rounds`` times (3) interleaved; the median wall ÷ ideal is reported.

Target: flux-async's wall ≤ 1.05x raw aiohttp's, measured in the same run. The ideal
itself is out of any client's reach on a slow machine: the answers of a wave arrive
together and each costs the client a few hundred µs of CPU, so the last of 100 waits tens
of ms, every wave; wall ÷ ideal is shown for information.

    python benchmarks/bench_latency.py [--prompts 2000] [--concurrency 100] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from _common import (
    CONTENDERS,
    FLUX,
    OPENAI,
    RAW,
    BenchOutput,
    Row,
    RunResult,
    interleaved_rounds,
    measure,
    median,
    run_main,
)
from _fastserver import FastServerProcess

TARGET = 1.05


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="500 prompts, 1 round (smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per run (2000)")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.1, help="server seconds/request")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 500 if args.quick else 2000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def run(args: argparse.Namespace) -> BenchOutput:
    n, c, latency = args.prompts, args.concurrency, args.latency
    ideal = math.ceil(n / c) * latency
    print(
        f"latency-bound: {n} prompts, concurrency {c}, latency {latency}s, "
        f"ideal {ideal:.2f}s, {args.rounds} round(s)"
    )
    with FastServerProcess("--latency", str(latency)) as emu:

        def run_one(name: str) -> RunResult:
            emu.reset()
            return measure(name, emu, n, c)

        def warmup(name: str) -> RunResult:
            emu.reset()
            return measure(name, emu, 2 * c, c)

        runs = interleaved_rounds(CONTENDERS, args.rounds, run_one, warmup=warmup)

    wall = {name: median(r.wall for r in rs) for name, rs in runs.items()}
    failed = {name: sum(r.failed for r in rs) for name, rs in runs.items()}
    over = {name: w / ideal for name, w in wall.items()}
    setup = f"n={n}, c={c}, {latency:g} s"

    def show(name: str) -> str:
        return f"{over[name]:.3f} ({wall[name]:.2f} s)"

    vs_raw = wall[FLUX] / wall[RAW]
    rows = [
        Row(
            figure=f"latency-bound wall, flux ÷ raw ({setup})",
            flux=f"{wall[FLUX]:.2f} s",
            peer=f"{RAW} {wall[RAW]:.2f} s",
            ratio=f"{vs_raw:.3f}x",
            target=f"<= {TARGET:.2f}x",
            met=failed[FLUX] == 0 and vs_raw <= TARGET,
        ),
        Row(
            figure=f"latency-bound wall ÷ ideal {ideal:.1f} s",
            flux=show(FLUX),
            peer=f"{RAW} {show(RAW)}",
            ratio=f"{over[FLUX]:.3f}",
            target="(info)",
            met=None,
        ),
        Row(
            figure="latency-bound wall, flux ÷ openai",
            flux=show(FLUX),
            peer=f"{OPENAI} {show(OPENAI)}",
            ratio=f"{wall[FLUX] / wall[OPENAI]:.2f}x",
            target="(info)",
            met=None,
        ),
    ]
    notes = [
        f"ideal = ceil({n}/{c}) x {latency:g} s = {ideal:.2f} s; median of {args.rounds} "
        "round(s); "
        + "; ".join(
            f"{name}: wall {wall[name]:.3f} s = {over[name]:.3f}x ideal, {failed[name]} failed"
            for name in CONTENDERS
        )
    ]
    return BenchOutput("latency-bound", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
