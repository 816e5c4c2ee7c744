"""Import time: ``import flux_async`` vs ``import openai`` in fresh interpreters.

Two measures, each the median of ``--runs`` (7) fresh interpreters per module, run
interleaved (pass, flux_async, openai, pass, ...) after one untimed warm-up each (so
bytecode caches are written before timing):

* wall: ``python -c 'import X'`` minus ``python -c pass``, timed from this process
  (what a CLI user waits for, interpreter start-up subtracted);
* importtime: the cumulative time of the top-level ``X`` line of
  ``python -X importtime -c 'import X'`` (the import alone, no start-up or shutdown).

Target: flux-async ≤ 0.5x openai (wall).

    python benchmarks/bench_import.py [--runs 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from _common import FLUX, OPENAI, REPO_ROOT, BenchOutput, Row, fmt_ratio, median, run_main

TARGET = 0.5
MODULES = {FLUX: "flux_async", OPENAI: "openai"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 runs (smoke)")
    parser.add_argument("--runs", type=int, default=None, help="interpreters per module (7)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 7
    return args


def _wall(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    return time.perf_counter() - started


def _importtime(module: str) -> float:
    """Seconds: the cumulative figure of the module's own line in -X importtime."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in done.stderr.splitlines():
        # "import time:       self [us] |  cumulative | imported package"
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            return int(parts[1]) / 1e6
    raise RuntimeError(f"no -X importtime line for {module}")


def run(args: argparse.Namespace) -> BenchOutput:
    print(f"import time: {args.runs} fresh interpreters per module, interleaved")
    codes = {"pass": "pass"} | {name: f"import {module}" for name, module in MODULES.items()}
    for code in codes.values():  # warm-up: write the .pyc files before timing
        _wall(code)
    walls: dict[str, list[float]] = {name: [] for name in codes}
    imports: dict[str, list[float]] = {name: [] for name in MODULES}
    for _ in range(args.runs):
        for name, code in codes.items():
            walls[name].append(_wall(code))
        for name, module in MODULES.items():
            imports[name].append(_importtime(module))
    base = median(walls["pass"])
    wall = {name: median(walls[name]) - base for name in MODULES}
    best = {name: min(walls[name]) - min(walls["pass"]) for name in MODULES}
    itime = {name: median(imports[name]) for name in MODULES}
    for name in MODULES:
        print(
            f"  {name:<12} wall - pass: median {1e3 * wall[name]:6.1f} ms, best "
            f"{1e3 * best[name]:6.1f} ms; -X importtime median {1e3 * itime[name]:6.1f} ms"
        )
    ratio = wall[FLUX] / wall[OPENAI]
    rows = [
        Row(
            figure="import time (wall - bare start-up), flux ÷ openai",
            flux=f"{1e3 * wall[FLUX]:.0f} ms",
            peer=f"{OPENAI} {1e3 * wall[OPENAI]:.0f} ms",
            ratio=fmt_ratio(ratio),
            target=f"<= {TARGET:.2f}x",
            met=ratio <= TARGET,
        ),
        Row(
            figure="import time (-X importtime), flux ÷ openai",
            flux=f"{1e3 * itime[FLUX]:.0f} ms",
            peer=f"{OPENAI} {1e3 * itime[OPENAI]:.0f} ms",
            ratio=fmt_ratio(itime[FLUX] / itime[OPENAI]),
            target="(info)",
            met=None,
        ),
    ]
    notes = [
        f"median of {args.runs} fresh interpreters each; bare `python -c pass` took "
        f"{1e3 * base:.0f} ms (subtracted)"
    ]
    return BenchOutput("import time", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
