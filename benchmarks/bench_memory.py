"""Memory: peak RSS of a lazily streamed fan-out is O(concurrency), not O(prompts).

Setup: a zero-latency emulator started with ``--no-record`` (so it keeps no per-request
log), and for each size a fresh Python process that streams that many prompts from a
generator through ``client.iter_generate(prompts, concurrency=64)``, counting results
without keeping them, then reports its peak RSS (``resource.getrusage().ru_maxrss``).
Sizes: 1,000 and 100,000 prompts (``--prompts`` scales the large one down).

Target: peak RSS(100,000) ÷ peak RSS(1,000) ≤ 1.5. The RSS right after the imports is
printed too: the growth above it is what the fan-out itself costs.

An information row: a fresh process gathers ``--saved`` prompts (200) with
``gather_generate(prompts, save_to=DIR)`` from a server answering each with a 1.8 MB PNG
as ``b64_json`` (``bench_save.py``'s, ``--image full``), keeping every result; its RSS
growth is shown against the images' text, which results that kept it would hold.

    python benchmarks/bench_memory.py [--prompts 100000] [--small 1000] [--saved 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    FLUX,
    REPO_ROOT,
    BenchOutput,
    EmulatorProcess,
    Row,
    run_main,
)

TARGET = 1.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10,000 prompts (smoke)")
    parser.add_argument("--prompts", type=int, default=None, help="the large size (100000)")
    parser.add_argument("--small", type=int, default=1000, help="the small size (1000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--saved", type=int, default=None, help="prompts gathered with save_to= (200; 0: none)"
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--saved-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 10_000 if args.quick else 100_000
    if args.saved is None:
        args.saved = 50 if args.quick else 200
    return args


def _maxrss_kib() -> int:
    import resource

    # Linux reports KiB, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _status_kib(field: str) -> int | None:
    """A KiB figure of ``/proc/self/status`` (Linux), such as ``VmHWM`` (the peak RSS of
    this address space alone, a cross-check of ru_maxrss); None where there is none."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    key = f"{field}:"
    return int(status.split(key, 1)[1].split()[0]) if key in status else None


def _child(n: int, base_url: str, concurrency: int) -> int:
    """Runs in the fresh subprocess: stream ``n`` prompts, print one JSON line."""
    import asyncio

    from _common import API_KEY, iter_prompts

    from flux_async import FluxClient

    async def stream() -> tuple[int, int]:
        ok = failed = 0
        async with FluxClient(
            base_url=base_url, api_key=API_KEY, max_connections=concurrency
        ) as client:
            fanout = client.iter_generate(iter_prompts(n), concurrency=concurrency)
            async with fanout as results:
                async for result in results:
                    if result.ok:
                        ok += 1
                    else:
                        failed += 1
        return ok, failed

    baseline = _maxrss_kib()
    started = time.perf_counter()
    ok, failed = asyncio.run(stream())
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {"n": n, "ok": ok, "failed": failed, "wall": wall, "baseline": baseline}
            | {"maxrss": _maxrss_kib(), "hwm": _status_kib("VmHWM")}
        )
    )
    return 0


def _saved_child(n: int, base_url: str, concurrency: int) -> int:
    """Runs in the fresh subprocess: gather ``n`` prompts with ``save_to=`` into a
    temporary directory, keeping the results; print one JSON line."""
    import asyncio
    import tempfile

    from _common import API_KEY, prompts

    from flux_async import FluxClient

    async def gather(directory: str) -> tuple[int, int, int, int]:
        async with FluxClient(
            base_url=base_url, api_key=API_KEY, max_connections=2 * concurrency
        ) as client:
            results = await client.gather_generate(
                prompts(n), concurrency=concurrency, save_to=directory
            )
        held = _status_kib("VmRSS") or 0  # the results still alive
        ok = sum(result.ok for result in results)
        text = sum(
            len(image.b64_json or "")
            for result in results
            if result.response is not None
            for image in result.response.data
        )
        return ok, len(results) - ok, text, held

    baseline = _status_kib("VmRSS") or 0
    with tempfile.TemporaryDirectory(prefix="flux-bench-memory-") as directory:
        ok, failed, kept, held = asyncio.run(gather(directory))
        files = sum(path.stat().st_size for path in Path(directory).iterdir())
    print(
        json.dumps(
            {"n": n, "ok": ok, "failed": failed, "baseline": baseline, "kept": kept}
            | {"maxrss": _maxrss_kib(), "held": held, "files": files}
        )
    )
    return 0


# Linux carries a process's peak RSS across fork + exec: a child started straight from this
# (big) process would report our peak as its own ru_maxrss. A minimal Python launcher in
# between forks the measured child from a small address space instead.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _measure(n: int, base_url: str, concurrency: int, child: str = "--child") -> dict[str, float]:
    cmd = [
        sys.executable,
        "-c",
        _LAUNCHER,
        sys.executable,
        str(Path(__file__).resolve()),
        child,
        str(n),
        "--base-url",
        base_url,
        "--concurrency",
        str(concurrency),
    ]
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {n}-prompt child failed:\n{done.stderr[-4000:]}")
    data: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def run(args: argparse.Namespace) -> BenchOutput:
    sizes = (args.small, args.prompts)
    c = args.concurrency
    print(f"memory: peak RSS streaming {sizes[0]} vs {sizes[1]} prompts, concurrency {c}")
    runs: dict[int, dict[str, float]] = {}
    with EmulatorProcess("--no-record") as emu:
        for n in sizes:
            runs[n] = data = _measure(n, emu.base_url, c)
            print(
                f"  {n:>7} prompts: peak RSS {data['maxrss'] / 1024:6.1f} MiB "
                f"(after imports {data['baseline'] / 1024:.1f} MiB; VmHWM "
                f"{(data['hwm'] or 0) / 1024:.1f} MiB), "
                f"{data['ok']} ok, {data['failed']} failed, {data['wall']:.1f} s "
                f"({n / data['wall']:.0f} req/s)"
            )
    small, large = runs[sizes[0]], runs[sizes[1]]
    ratio = large["maxrss"] / small["maxrss"]
    growth_small = (small["maxrss"] - small["baseline"]) / 1024
    growth_large = (large["maxrss"] - large["baseline"]) / 1024
    clean = small["failed"] == 0 and large["failed"] == 0
    rows = [
        Row(
            figure=f"memory peak RSS, {sizes[1]:,} ÷ {sizes[0]:,} prompts (c={c})",
            flux=f"{large['maxrss'] / 1024:.1f} MiB",
            peer=f"{sizes[0]:,} prompts: {small['maxrss'] / 1024:.1f} MiB",
            ratio=f"{ratio:.3f}x",
            target=f"<= {TARGET:.2f}x",
            met=clean and ratio <= TARGET,
        )
    ]
    notes = [
        f"{FLUX} only, one fresh process per size; growth above the RSS after imports: "
        f"{growth_small:+.1f} MiB for {sizes[0]:,} prompts, {growth_large:+.1f} MiB for "
        f"{sizes[1]:,}"
    ]
    if args.saved:
        rows.append(saved_row(args.saved, c))
    return BenchOutput("memory", rows, notes)


def saved_row(n: int, concurrency: int) -> Row:
    """The information row of ``--saved``: RSS growth against the images' text."""
    import bench_save

    server = bench_save._this_file_as_a_process("full")("--serve", "b64", "--latency", "0")
    with server:
        data = _measure(n, server.base_url, concurrency, "--saved-child")
    mib = 2**20
    text = n * 4 * ((data["files"] / max(data["ok"], 1) + 2) // 3)  # base64 of each file
    held = (data["held"] - data["baseline"]) * 1024
    peak = (data["maxrss"] - data["baseline"]) * 1024
    print(
        f"  gathered {n} prompts with save_to= (1.8 MB b64 images): RSS with the results "
        f"held +{held / mib:.1f} MiB (peak +{peak / mib:.1f}), the images' text "
        f"{text / mib:.1f} MiB, text still in the results {data['kept'] / mib:.1f} MiB, "
        f"{data['ok']} ok, {data['failed']} failed"
    )
    return Row(
        figure=f"memory held by the results of gather_generate(save_to=), {n} 1.8 MB b64 "
        "images ÷ their text",
        flux=f"+{held / mib:.1f} MiB (peak +{peak / mib:.1f})",
        peer=f"text {text / mib:.1f} MiB; kept {data['kept'] / mib:.1f} MiB",
        ratio=f"{held / text:.2f}",
        target="(info)",
        met=None,
    )


def main() -> int:
    args = parse_args()
    if args.child is not None:
        return _child(args.child, args.base_url, args.concurrency)
    if args.saved_child is not None:
        return _saved_child(args.saved_child, args.base_url, args.concurrency)
    run(args).print()
    return 0


if __name__ == "__main__":
    run_main(main)
