"""429 storm: 32 concurrent callers against a server that takes 40 requests/s.

Setup: an emulator with ``--rate-limit 40 --burst 4`` (GCRA admitting 40/s, with 0.1 s
of tolerance for arrival jitter): past that it answers 429 with ``retry-after-ms`` and
``Retry-After``; a rejected request costs it no capacity. Real gateways meter per
minute with far larger buckets; ``--burst 1`` (an information row, flux-async only)
shows the harshest server, which rejects any two requests closer than 25 ms, so that
loopback jitter alone draws 429s below capacity.
1,000 prompts at concurrency 32 with NO rate configured on the client, so flux-async
relies on its adaptive limiter alone (pause gate on Retry-After, multiplicative cut,
additive growth). The peer is ``openai.AsyncOpenAI`` with its default retries (2) under
a semaphore of 32. Each client gets a fresh emulator.

Figures, per client:

* prompts lost: prompts that ended in an error;
* goodput ÷ capacity: successful prompts per second over the client's wall time ÷ 40;
* attempts per prompt: requests the emulator saw ÷ prompts.

Targets (flux-async): 0 lost, goodput ≥ 0.9 x capacity, ≤ 1.3 attempts/prompt.
Also saves ``docs/img/storm.png``: accepted (2xx) and rejected (429) requests per
second over time for both clients, from the emulator's own timestamps.

    python benchmarks/bench_storm.py [--prompts 1000] [--capacity 40] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from _common import (
    FLUX,
    IMG_DIR,
    OPENAI,
    BenchOutput,
    EmulatorProcess,
    Row,
    RunResult,
    measure,
    run_main,
)

TARGET_LOST = 0
TARGET_GOODPUT = 0.90
TARGET_ATTEMPTS = 1.30
CONTENDERS = (FLUX, OPENAI)

Log = list[tuple[float, str, int | None]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="200 prompts (smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (1000)")
    parser.add_argument("--capacity", type=float, default=40.0, help="emulator requests/s")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--burst", type=int, default=4, help="emulator burst (4)")
    parser.add_argument("--plot", type=Path, default=IMG_DIR / "storm.png")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 200 if args.quick else 1000
    return args


def per_second(log: Log) -> tuple[list[int], list[int]]:
    """Accepted (2xx) and rejected (429) requests in each second since the first request."""
    if not log:
        return [], []
    start = min(t for t, _, _ in log)
    size = int(max(t for t, _, _ in log) - start) + 1
    accepted, rejected = [0] * size, [0] * size
    for t, _, status in log:
        second = int(t - start)
        if status is not None and 200 <= status < 300:
            accepted[second] += 1
        elif status == 429:
            rejected[second] += 1
    return accepted, rejected


def plot(path: Path, logs: dict[str, Log], capacity: float, n: int, concurrency: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib is not importable: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(len(logs), 1, figsize=(10, 3.2 * len(logs)), sharex=True)
    axes_list = list(axes) if len(logs) > 1 else [axes]
    for ax, (name, log) in zip(axes_list, logs.items(), strict=True):
        accepted, rejected = per_second(log)
        seconds = range(len(accepted))
        ax.bar(seconds, accepted, width=1.0, align="edge", color="tab:green", label="2xx")
        ax.bar(
            seconds,
            rejected,
            width=1.0,
            align="edge",
            bottom=accepted,
            color="tab:red",
            alpha=0.7,
            label="429",
        )
        ax.axhline(capacity, color="black", linestyle="--", linewidth=1, label="capacity")
        ax.set_title(
            f"{name}: {sum(accepted)} accepted, {sum(rejected)} rejected "
            f"({n} prompts, concurrency {concurrency})"
        )
        ax.set_ylabel("requests / s")
        ax.legend(loc="upper right")
    axes_list[-1].set_xlabel("seconds since the first request (emulator clock)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  plot saved to {path}")


def run(args: argparse.Namespace) -> BenchOutput:
    n, c, capacity, burst = args.prompts, args.concurrency, args.capacity, args.burst
    print(
        f"429 storm: {n} prompts, concurrency {c}, "
        f"emulator --rate-limit {capacity:g} --burst {burst}"
    )
    server = ("--rate-limit", f"{capacity:g}", "--burst", str(burst))
    results: dict[str, RunResult] = {}
    attempts: dict[str, float] = {}
    logs: dict[str, Log] = {}
    for name in CONTENDERS:
        with EmulatorProcess(*server) as emu:
            result = measure(name, emu, n, c)
            stats = emu.stats()
            logs[name] = emu.request_log()
        results[name] = result
        attempts[name] = stats["requests"] / n
        print(
            f"  {result.summary()}\n"
            f"  {'':<12} emulator: {stats['requests']} requests, {stats['successes']} 2xx, "
            f"{stats['rate_limited']} x 429, max in flight {stats['max_in_flight_seen']}"
        )
    if args.plot is not None:
        plot(args.plot, logs, capacity, n, c)

    goodput = {name: r.ok / r.wall / capacity for name, r in results.items()}
    flux, peer = results[FLUX], results[OPENAI]
    setup = f"n={n}, c={c}, {capacity:g}/s, burst {burst}"
    # The least time the run could take: GCRA admits one request every 1/capacity s.
    best = (n - 1) / capacity
    rows = [
        Row(
            figure=f"429 storm prompts lost ({setup})",
            flux=f"{flux.failed} / {n}",
            peer=f"{OPENAI} {peer.failed} / {n}",
            ratio=f"{flux.failed / n:.3f}",
            target=f"{TARGET_LOST}",
            met=flux.failed <= TARGET_LOST,
        ),
        Row(
            figure="429 storm goodput ÷ capacity",
            flux=f"{flux.ok / flux.wall:.1f} ok/s ({goodput[FLUX]:.2f})",
            peer=f"{OPENAI} {peer.ok / peer.wall:.1f} ok/s ({goodput[OPENAI]:.2f})",
            ratio=f"{goodput[FLUX]:.3f}",
            target=f">= {TARGET_GOODPUT:.2f}",
            met=goodput[FLUX] >= TARGET_GOODPUT,
        ),
        Row(
            figure="429 storm attempts per prompt",
            flux=f"{attempts[FLUX]:.2f}",
            peer=f"{OPENAI} {attempts[OPENAI]:.2f}",
            ratio=f"{attempts[FLUX]:.3f}",
            target=f"<= {TARGET_ATTEMPTS:.2f}",
            met=attempts[FLUX] <= TARGET_ATTEMPTS,
        ),
    ]
    if burst != 1:
        with EmulatorProcess("--rate-limit", f"{capacity:g}", "--burst", "1") as emu:
            strict = measure(FLUX, emu, n, c)
            strict_attempts = emu.stats()["requests"] / n
        print(f"  burst 1: {strict.summary()}")
        strict_goodput = strict.ok / strict.wall / capacity
        rows.append(
            Row(
                figure="429 storm goodput ÷ capacity at burst 1 (strict)",
                flux=f"{strict.ok / strict.wall:.1f} ok/s ({strict_goodput:.2f})",
                peer=f"lost {strict.failed}, {strict_attempts:.2f} attempts/prompt",
                ratio=f"{strict_goodput:.3f}",
                target="(info)",
                met=None,
            )
        )
    notes = [
        f"the best possible run takes (n-1)/capacity = {best:.1f} s; "
        + "; ".join(
            f"{name}: wall {r.wall:.1f} s, {r.ok} ok, lost {r.failed}"
            + (f" {dict(r.errors)}" if r.errors else "")
            + f", {attempts[name]:.2f} attempts/prompt"
            for name, r in results.items()
        )
    ]
    if not math.isfinite(goodput[FLUX]):
        notes.append("flux-async goodput is undefined (zero wall time)")
    return BenchOutput("429 storm", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
