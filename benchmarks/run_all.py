"""Run the whole benchmark suite and print one results table.

Runs, in order: fan-out overhead, latency-bound, pacing, 429 storm, memory, import time,
faults, web app, first spike, redis, saving (``bench_*.py`` in this folder; each also runs on its
own). Every figure is a ratio against peers measured in the same invocation (a raw
aiohttp loop, the ``openai`` client), or against the ideal / configured value, never an
absolute target.

* ``--quick``: scaled-down counts, a smoke run of a minute or so (figures are noisier);
* ``--write-docs``: also write ``docs/benchmarks.md`` (table, machine, date, command,
  how to read and reproduce; embeds ``docs/img/storm.png``, which the storm run saves);
* ``--only NAME``: run only these benchmarks (fanout, overhead, latency, pacing, storm,
  memory, import, faults, webapp, spike, redis, save; repeatable). ``redis`` needs ``redis-server``
  on PATH and the ``redis`` extra.

The full run takes about 20 minutes on 2 cores.

    python benchmarks/run_all.py [--quick] [--write-docs] [--only storm]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType

import bench_fanout
import bench_faults
import bench_import
import bench_latency
import bench_memory
import bench_overhead
import bench_pacing
import bench_redis
import bench_save
import bench_spike
import bench_storm
import bench_webapp
from _common import (
    DOCS_DIR,
    BenchOutput,
    Row,
    code_digest,
    format_table,
    machine_info,
    markdown_table,
    run_main,
    source_revision,
)

BENCHMARKS: dict[str, ModuleType] = {
    "fanout": bench_fanout,
    "overhead": bench_overhead,
    "latency": bench_latency,
    "pacing": bench_pacing,
    "storm": bench_storm,
    "memory": bench_memory,
    "import": bench_import,
    "faults": bench_faults,
    "webapp": bench_webapp,
    "spike": bench_spike,
    "redis": bench_redis,
    "save": bench_save,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down smoke run")
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only these"
    )
    return parser.parse_args(argv)


def run_benchmark(name: str, module: ModuleType, quick: bool) -> BenchOutput:
    print(f"\n##### {name} #####", flush=True)
    started = time.perf_counter()
    try:
        output: BenchOutput = module.run(module.parse_args(["--quick"] if quick else []))
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        row = Row(name, "ERROR", f"{type(exc).__name__}: {exc}"[:80], "-", "-", False)
        output = BenchOutput(name, [row], [f"{name} failed: {type(exc).__name__}: {exc}"])
    output.print()
    print(f"  ({name} took {time.perf_counter() - started:.0f} s)", flush=True)
    return output


def write_docs(
    outputs: Sequence[BenchOutput],
    command: str,
    elapsed: float,
    quick: bool,
    revision: str,
) -> None:
    rows = [row for out in outputs for row in out.rows]
    info = machine_info()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    missed = [r for r in rows if r.met is False]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by benchmarks/run_all.py --write-docs; rerun it rather than edit. -->",
        "",
        f"Measured on {now} with `{command}` ({elapsed / 60:.1f} min), "
        f"flux-async at commit {revision}.",
    ]
    if quick:
        lines += [
            "",
            "**This is a `--quick` smoke run: counts are scaled down and the figures are "
            "noisier than the full run's.**",
        ]
    lines += ["", "## Results", "", markdown_table(rows), ""]
    if missed:
        lines.append(
            "Missed in this run: " + "; ".join(f"{r.figure} ({r.ratio})" for r in missed) + "."
        )
    else:
        lines.append("Every target was met in this run.")
    lines += ["", "Details from the same run:", ""]
    for out in outputs:
        for note in out.notes:
            lines.append(f"- **{out.title}**: {note}")
    lines += [
        "",
        "## Machine",
        "",
        f"- platform: `{info['platform']}` ({info['machine']}, {info['processor']})",
        f"- CPUs (`os.cpu_count()`): {info['cpu_count']}",
        f"- Python: {info['python']}",
        f"- aiohttp {info['aiohttp']}, openai {info['openai']}",
        "",
        "The client and the emulator share these CPUs, and the machine is shared with other "
        "work: absolute numbers move between runs, the ratios much less.",
        "",
        "## The 429 storm",
        "",
        "Accepted (2xx, green) and rejected (429, red) requests per second, from the "
        "emulator's own timestamps; the dashed line is the emulator's capacity (40/s).",
        "",
        "![429 storm: requests per second for flux-async and openai](img/storm.png)",
        "",
    ]
    if (DOCS_DIR / "img" / "redis.png").exists():
        lines += [
            "## Four processes, one key",
            "",
            "The same view of `bench_redis.py`'s run against a server admitting 60/s: four "
            "processes sharing one `RedisRateLimiter` (ceiling 100/s) above, each with its "
            "own `RateLimiter(100)` below.",
            "",
            "![Four processes against a 60/s server, shared or not](img/redis.png)",
            "",
        ]
    lines += [
        HOW_TO_READ,
    ]
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    path = DOCS_DIR / "benchmarks.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


HOW_TO_READ = """\
## Known gaps

- **Latency-bound wall ÷ ideal (information; the target is flux-async ÷ raw)** is above 1.05
  for every client, the raw aiohttp loop included (1.150 for flux-async and 1.159 for raw on
  the page at 6287c19, 1.119 and 1.105, 1.110 and 1.102, 1.137 and 1.175, 1.106 and 1.090 on
  the pages before; within a few % of each other on every page). The ideal, `ceil(n/c) x
  latency`, counts no CPU time; each of the 20 waves of 100 requests costs both processes
  about 130 to 200 µs of CPU per request on 2 shared cores, which the emulator's timestamps
  show as each wave starting ~5 ms late. flux-async adds nothing measurable on top of raw
  aiohttp here.
- **Fan-out against the emulator (target ≥ 0.90x raw aiohttp)** swings between runs on this
  machine: 0.837x on this page (2,671 against 3,192 req/s; round by round 0.70-1.22;
  flux-async 371 µs of CPU a request, raw 298), where the fast server's rows were met
  (req/s 0.968x, CPU 1.033x); 0.894x on the page at e421b6d (2,349 against 2,629 req/s;
  round by round 0.76, 0.79, 0.89, 0.93, 0.98; flux-async 425 µs of CPU a request, raw
  366), where an ad hoc run
  of 6 interleaved rounds an hour before read 0.92x (2,329 against 2,528; CPU 427 against
  395 µs, the emulator's own 309 against 290, higher in either client's slower runs);
  0.913x on the page at ebc2639 (met), 0.870x on the page at fddb8ad (2,389 against
  2,747 req/s; round by round 0.76-1.04), 0.900x on the page at 6287c19 (2,271 against 2,524
  req/s, short of the target in the fourth digit; round by round 0.82-1.06), measured while
  the machine ran at about half its speed of the page before (raw aiohttp 2,524 req/s there
  against 6,992), where the fast server's req/s read 1.019x; 0.983x, 0.837x, 0.800x, 0.891x,
  0.848x, 0.946x, 0.858x, 0.906x, 0.788x, 0.929x, 1.005x, 0.82x, 0.84x and 1.00x on the
  pages before it (0.837x and 0.800x short of memory: see [the saving gate's
  notes](save-gate-notes.md)); `python benchmarks/bench_fanout.py` alone gave 1.01x, 0.80x,
  0.62x, 0.81x, 0.77x and 1.07x in one day (round by round 0.53 to 1.08). The emulator
  shares the 2 cores with the client, and in the runs that miss, flux-async's CPU per
  request against it reads 1.2-1.6x raw's. cProfile counts the same Python calls per request
  against the emulator as against the fast server (423 for flux-async, 411-421 for raw), so
  it is not extra work flux-async does for that server; not yet explained.
- **Fast server, client CPU and req/s (targets ≤ 1.10x and ≥ 0.90x)** sit on a thin margin.
  Both were met on the page at 6287c19: req/s 1.019x and CPU 0.981x (round by round
  0.89x-1.26x and 0.79x-1.12x), and on the four pages before it, 1.023x and 0.978x
  (0.93x-1.11x and 0.90x-1.07x), 1.026x and 0.975x (0.95x-1.33x and 0.75x-1.05x), 1.070x and
  0.938x (0.82x-1.19x and 0.85x-1.22x), then 0.987x and 1.008x (0.80x-1.13x and
  0.88x-1.24x). On the page before that req/s missed by a hair and CPU was met by one:
  0.895x and 1.091x (round by round 0.75x-1.08x and 0.95x-1.32x). Both were met on the nine
  pages before that: CPU 0.976x and req/s 1.025x, then 0.982x and 0.987x, 0.944x and 1.056x,
  0.99x and 0.975x, 0.97x and 1.04x, 0.91x and 1.09x, 0.97x and 1.04x, 0.98x and 1.03x,
  1.00x and 1.00x. They were also met in the last three runs alone (`python
  benchmarks/bench_overhead.py`, paired medians of 9 rounds: CPU 1.08x, 1.03x, 1.06x; req/s
  0.94x, 0.97x, 0.95x), while earlier runs alone missed (1.10x to 1.27x and 0.78x to 0.90x;
  round by round 0.87x-1.66x and 0.60x-1.16x in one run). Callgrind is steady: flux-async
  runs 566k instructions per request against raw aiohttp's 588k (0.96x), and its branch
  simulation mispredicts 15.7k branches per request against 15.1k (1.04x), at 06ecc92
  (`python benchmarks/bench_overhead.py --instructions` prints both). On earlier pages
  flux-async counted 610k (618-619k before the JSON fast path) and 16.5k: its own layers
  stayed at 147-149k, so the ~40k it lost since is in the aiohttp part of its path, which
  was not looked into. At some 15-20 cycles a mispredicted branch, the counts put the
  expected time ratio near 1.0 (near 1.07 with the earlier ones); round by round the
  machine's drift moves the measured one by up to ±0.3 (`python
  benchmarks/bench_overhead.py` alone, at the same commit: CPU 1.044x, req/s 0.950x, rounds
  0.92x-1.54x and 0.65x-1.07x). Its cache simulation (`--cache-sim=yes` on the same
  children) finds the same misses for both. A wider margin needs fewer instructions and
  branches across flux-async's own layers (147k instructions per request with a transport
  that answers at once, the "own layers" row of `--instructions`; some 107 Python calls: the
  call, the attempt, the limiter, the parse, the fan-out's worker), not a fix to one hot
  spot. Fewer calls alone do little: two calls taken off the path saved 1.5k instructions,
  three 1.8k (Python 3.11 calls are cheap; the cost is the work each layer does). The rows
  "fresh processes" (`bench_overhead.py --fresh`) run each contender in processes of its
  own, as a user's script runs: whether a process's socket reads map memory afresh (two page
  faults a request) depends on what it freed first, and the benchmark's own long-lived
  process hides it. flux-async reads plain-HTTP sockets 64 KiB at a time so that none of its
  processes do (b9018d4); raw aiohttp reads 256 KiB.
- **Saving at c=64 against the fast server (target ≥ 0.85)**: the table has this page's
  figures, the first from 15 rounds of the gated runs (disk 0.91, rounds 0.70-1.11; tmpfs
  1.01). With the four `--gate-only` runs of the same day (below) that makes 75 rounds:
  disk 0.86 pooled (a bootstrap of the median: 0.83-0.90 in 90% of resamples), tmpfs
  0.97; the five 15-round figures read 0.93, 0.84, 0.81, 0.86 and 0.91. The best estimate
  meets the target by 0.01, and single runs still fall either side of it. The page at
  e421b6d missed it on disk and, for once, on tmpfs: disk 0.76 (rounds
  0.66, 0.95, 0.82, 0.76, 0.74), tmpfs 0.84 (0.83-0.91). On that page the disk's own work
  cost a client that saves nothing 14% (off with writes beside 1,573 prompts/s against
  1,831), against 2-11% in the runs alone of the same day, and the writer that writes
  nothing read 0.95. On disk the target was met for the first time on the page at ebc2639:
  0.90 (rounds 0.88-0.99; tmpfs 0.94), after 3215707 (below). It was missed on every page
  before:
  0.78 at fddb8ad (tmpfs 0.82), 0.72-0.84 on the pages before that (tmpfs 0.68-1.00). Runs
  of `python benchmarks/bench_save.py --dir DIR` alone (local disk): the last eight before
  3215707 read 0.82, 0.78, 0.88, 0.83, 0.79, 0.85, 0.90 and 0.78 (the target met in three,
  their median 0.83); the seven after it read 0.84, 0.87, 0.86, 0.77, 0.88, 0.81 and 0.92
  (met in four; with the pages at ebc2639 and e421b6d, 0.90 and 0.76, five of nine, their
  median 0.86). Ad hoc
  paired rounds of off and disk alone, 15 of them, read 0.84. Round by round the same code
  has read 0.55-1.06: the target sits at the line. What the measurements establish
  ([The saving gate: measurements](save-gate-notes.md) has each round, its
  commands, and what it tried and ruled out):
  - *Saving's own work in the client is small*: ~10 µs of the event loop's time a prompt
    (`bench_save.py --client-cpu`), ~110k of ~800k instructions (`--instructions`). By
    that alone on ÷ off would be about 0.87-0.90.
  - *The disk's work costs a client that saves nothing*: the row with another process
    writing the same files beside a run without saving read 0.78-1.01 on the pages and
    0.87-0.97 in runs alone. That is the kernel's (and this VM's host's) work on the same 2
    cores as the client and the server, which no change to the client wins back.
  - *Handing images over costs too*: the writer that writes nothing (answering at once)
    read 0.87-0.96.
  - *The one structural lever is ruled out by the crash bound*: a worker waits until its
    file is durable, so prompts generated but not saved stay within `concurrency`;
    releasing it earlier would make an `ok` in the manifest mean less.
  - *A faster client makes it harder*: b9018d4 took two page faults a request off the
    path of processes whose socket reads mapped memory afresh, which `perf trace` had found
    in `bench_save.py`'s process with saving off and not with saving on. The run before it
    read 0.90, the run after it 0.78 (rounds 0.78, 0.93, 0.81, 0.77, 0.75): within the
    noise, and not in the gate's favour.
  - *Results that hold paths, not images* (3215707): a fan-out with `save_to=` drops an
    image's `b64_json` text from its result once the image is in its file. The gated runs
    gather every result, so until then both arms kept ~24 KB of text a prompt; now only
    saving off does (there the text is the only copy). The page at ebc2639 is the first
    with it (0.90); the runs alone since are above.
  - *Saving's prompts/s does not follow the machine's speed*: on disk it stayed within
    ~1,450-1,900 while off moved 1,760-2,700 with the machine, so the ratio falls when the
    machine runs fast; saving at c=128 was no faster than at c=64, so the workers' wait
    for their files is not the bound.
  - *The gated runs now run side by side* (9601b02): a round's disk, off and tmpfs runs,
    reversed every other round. Before, a rotation placed disk and off up to seven runs
    apart. A run started right after another one ended had a first round near 0.6 (three
    of three): leave a minute between runs.
  - *Sixty rounds put it on the line* (2026-11-28, at a2dd4d0's library code): four runs
    of `python benchmarks/bench_save.py --gate-only --dir DIR` (new: the gated runs
    alone, 15 rounds each, ~7 min) read disk 0.93, 0.84, 0.81 and 0.86, tmpfs 1.02, 0.92,
    0.94 and 0.93. Their 60 rounds pooled: disk 0.85 (33 of 60 rounds at or above it; a
    bootstrap of the median gives 0.83-0.90 in 90% of resamples), tmpfs 0.94. Saving on
    disk ran at 1,881-2,181 prompts/s, off at 2,034-2,379. On this machine the target
    can be neither met nor missed with confidence.
  - *Against a real model it is noise*: with url images and a server taking 0.2 s a
    generation, saving reads 0.92-0.96 of off.
- **First spike p99 against the unlimited server (target ≤ 1.5x raw aiohttp)** read 1.631x
  on the page at fddb8ad (0.559 s against 0.343 s; p50 1.125x), where the page before read
  1.356x and the page after it (ebc2639) 1.204x. Three `python benchmarks/bench_spike.py`
  runs right after it read 1.101x, 1.144x and 1.130x (p99 0.420-0.432 s against 0.370-0.383
  s). The figure is the median of 3 spikes' p99s (each the second slowest of 200 calls), so
  one late turn of the event loop in two of them moves it; not looked into further.
- **The 429 storm at burst 1** (information row): a server that rejects any two
  requests closer than 25 ms draws 429s from loopback jitter alone while the client
  paces below capacity; flux-async loses no prompt there (1.10 attempts per prompt) but
  keeps 0.77 to 0.86 of capacity. The target row uses 0.1 s of burst tolerance, closer to
  gateways that meter per minute.

## How to read

Each row is one figure. `flux-async` and `peer` are what each client achieved in the same
invocation; `ratio` is the number the `target` is checked against, and the row's name says
what it is: flux-async ÷ a peer (`flux ÷ raw`, `flux ÷ openai`), or flux-async ÷ the ideal
or configured value. `(info)` rows have no target. Nothing is compared with a figure from
another run or another machine.

The peers:

- **raw aiohttp**: the loop anyone would write by hand: one `aiohttp.ClientSession`, an
  `asyncio.Semaphore(c)`, `asyncio.gather` over all prompts, POST JSON, read the body,
  `json.loads`. No retries, no validation, no pacing: the floor for the client's cost.
- **openai**: `AsyncOpenAI(base_url=..., api_key=...).images.generate(model=...,
  prompt=..., extra_body={"aspect_ratio": "1:1"})` under an `asyncio.Semaphore(c)`, with
  its default `max_retries` (2), closed after each run.
- **flux-async**: `FluxClient(base_url=..., api_key=...)` with the default retry policy,
  retry budget and adaptive limiter, and `gather_generate(prompts, concurrency=c)` (the
  memory figure streams a generator through `iter_generate`).

Connection pools are never the bottleneck: flux-async gets `max_connections=c`, the raw
loop `aiohttp.TCPConnector(limit=c)`, and openai keeps its default pool (1000 connections).
The emulator (`python -m flux_async.emulator`) always runs in its own process, started and
stopped by the script (Ctrl-C and SIGTERM included).

The figures:

1. **Fan-out overhead** (`bench_fanout.py`): 5,000 prompts, concurrency 64, zero latency;
   requests/s, median of 5 interleaved rounds (openai, ten times slower, takes part in the
   first 3) after a warm-up of each. With no server latency this measures what each client
   costs per request; `gather_generate`'s wall time includes validating every prompt before
   the first request goes out. Targets: ≥ 0.90x raw, ≥ 5x openai. The `client CPU us/req`
   row (the benchmark process's CPU time ÷ prompts) is steadier than wall time on a noisy
   machine. A client-bound run keeps the client on the CPU ~100% of the wall time; when
   the details say it was much less, the run was bound by the emulator or by other load,
   which pulls the req/s ratio toward 1, and the CPU ratio is the better guide.

   **Client overhead** (`bench_overhead.py`): the same fan-out, 8,000 prompts at
   concurrency 64, against `_fastserver.py`, a bare `asyncio.Protocol` in its own process
   several times cheaper per request than either client, so the client is what is
   measured; 9 interleaved rounds after a warm-up, the ratio the median of the rounds' own.
   Targets: client CPU per request ≤ 1.10x raw, requests/s ≥ 0.90x raw. The "fresh
   processes" rows (`--fresh`, 6 runs each; information) run each contender warmed up and
   timed in a new process that imports only what a user's script would
   (`_fresh_client.py`), with its minor page faults per request.
2. **Latency-bound** (`bench_latency.py`): 2,000 prompts, concurrency 100, against the
   fast server of `_fastserver.py` holding each answer 0.1 s (not the emulator, whose own
   CPU would set the pace on two cores); median of 3 interleaved rounds. Target:
   flux-async's wall ≤ 1.05x raw aiohttp's. Information: wall ÷ ideal, ideal = ceil(n / c)
   x latency = 2.0 s, which assumes a client that costs nothing: in truth the answers of
   each of the 20 waves arrive together and every client handles them one by one, a few
   hundred µs each on this machine. The raw loop's figure is the part no aiohttp client
   avoids here; flux-async's excess over it is its own.
3. **Pacing** (`bench_pacing.py`): 1,000 prompts with `rate_limit=50`; from the emulator's
   arrival times, achieved = (count - 1) / (last - first) and the busiest sliding 1 s
   window. Targets: within ±2 % of 50/s, no window above 52.
4. **429 storm** (`bench_storm.py`): an emulator that admits 40 requests/s and answers 429
   with `retry-after-ms` past that; concurrency 32, 1,000 prompts, no client-side rate
   (adaptive only). Prompts lost (final errors), goodput ÷ capacity (successes ÷ the
   client's wall time ÷ 40) and attempts per prompt (emulator requests ÷ prompts), for
   flux-async and for openai with its default retries, each against a fresh emulator.
   Targets (flux-async): 0 lost, goodput ≥ 0.9, ≤ 1.3 attempts/prompt. openai's goodput
   is measured over its own (short) run, in which it gave up on most prompts: read it
   next to its lost count.
5. **Memory** (`bench_memory.py`): peak RSS (`ru_maxrss`) of a fresh process streaming
   1,000 vs 100,000 prompts from a generator through `iter_generate(..., concurrency=64)`,
   against an emulator started with `--no-record`. Target: ratio ≤ 1.5. The measured
   process is started through a tiny launcher, because Linux carries a parent's peak RSS
   over fork + exec into the child's `ru_maxrss`. An information row gathers 200 prompts with
   `save_to=` from a server answering each with a 1.8 MB PNG as `b64_json`, keeping every
   result, and shows the RSS they hold against the images' text.
6. **Import time** (`bench_import.py`): `python -c 'import X'` minus `python -c pass`,
   median of 7 fresh interpreters each, interleaved; `-X importtime` as a cross-check.
   Target ≤ 0.5x openai.

   **Faults** (`bench_faults.py`): scenarios against `tests/faultserver.py`, a server
   written from the contract, independent of the emulator, in its own process, counting
   every request per `Idempotency-Key` from its side: a 500 with an HTML body on each
   prompt's first attempt, a 2.3 s outage, connections dropped mid-body, a slow first
   answer, 429s with `Retry-After`, 30 % 5xx for 10 s, garbage `Retry-After` values, a
   token bucket whose 429s say `Retry-After: 5` (`bucket-40-ra5`), a 10 s storm of
   `Retry-After: 2` (`storm-ra2`) and a spent quota (`Retry-After: 3600`,
   `quota-spent`), each with default settings. Targets per scenario: 0 lost, 0
   duplicates, the client's and the server's attempt counts agree, 0 failed (where a
   scenario expects failures, exactly those), and a wall-time bound where time is the
   point; `python benchmarks/bench_faults.py --help` and its docstring list them.
7. **Web app** (`bench_webapp.py`): an `aiohttp.web` app whose 200 concurrent handlers
   share one default `FluxClient`, against the same app holding a raw
   `aiohttp.ClientSession` with an unlimited pool; upstream latency 0.2 s; two bursts of
   200 requests per app, the second timed; median of 3 interleaved rounds. Targets: p50
   ≤ 1.15x and p99 ≤ 1.25x raw, 0 failed. An information row runs the old default pool
   (100 connections), under which half the handlers waited a round trip for a connection.
8. **First spike** (`bench_spike.py`): a fresh default `FluxClient` gets 200 concurrent
   calls at once (a web app's first requests), against the emulator in its own process:
   rate limited at 100/s with a burst of 20 (0.2 s per generation), where sending all at
   once draws 180 429s, and unlimited (0.2 s), where holding calls back only costs time,
   compared with a raw aiohttp session sending all 200 at once; median of 3 rounds, each
   with a fresh client. Targets: first-spike 429s ≤ 10 % of calls, 0 failed; p99 on the
   unlimited server ≤ 1.5x raw. Information rows: the limited spike's wall ÷ the ideal
   (20 at once, then 100/s: 2.0 s) and the second spike's 429s. Those 1-2 are the
   burst's own, on Python 3.11: aiohttp writes a request's body in a task of its own
   (started eagerly from 3.12), which runs only after the spike's other tasks have made
   their first steps, so the burst leaves a few ms after its permits and the first
   paced request right behind it, closer than the server's bucket allows (seen with the
   socket writes timed). A spike of 60 after 60 against the emulator in its own process
   (200/s, burst 10) drew 1-2 in 12 of 12 runs on 3.11, and none in 7 of 8 on 3.12 (1
   in the eighth); on virtual time, where sending takes no time, `test_quota.py` asserts
   none.
9. **Redis** (`bench_redis.py`): 4 OS processes sharing one `RedisRateLimiter` (a
   `redis-server` the script starts), against the emulator, 20 s per run. Pacing at
   100/s shared: achieved within ±3 % of 100/s, no sliding 1 s window above 103, 0 lost.
   Shared adaptation, ceiling 100/s against a server admitting 60/s (burst 5): goodput
   ≥ 0.85x capacity, ≤ 1.3 attempts per prompt, 0 failed. The `peer` column runs the
   same with an in-process `RateLimiter(100)` per process. Cost: permits per second one
   process takes from the local Redis, ≥ 2,000/s.
10. **Saving images** (`bench_save.py`): 10,000 prompts a run with `b64_json` images
   and 3,000 with `url` ones, concurrency 64, generated
   prompts/s with `save_to=` on and off, against a constant-answer server in its own
   process: `b64_json` images (decode and write; an 18 KB PNG) and `url` images (a GET
   through the pool, then write), each file written durably and atomically as the
   library does (from the fan-out's writer process: an unnamed file, one syncfs per
   group, a link under its final name, the names made durable by the next group's syncfs
   or by one of their own when none follows); "on" runs on local disk (a
   fresh directory under the current one, `--dir`: on this VM a file created under /tmp
   costs ~5x the kernel CPU of one under /work, same disk) and on tmpfs (`/dev/shm`,
   `--tmpfs-dir`); interleaved rounds, 15 of the gated runs (b64, the fast server: off,
   disk, tmpfs), the first 5 of them with the information variants, 5 of every other
   case; each ratio the median of the rounds' own ratios. The disk's own ceiling is
   measured in the same rounds: a bare loop writing the same files by the same protocol and doing
   nothing else, in files/s. Targets for b64: on ÷ min(off, ceiling) ≥ 0.85 on disk, and
   on ÷ off ≥ 0.85 on tmpfs. Information rows: the raw on ÷ off on disk; on ÷ a bare
   loop that keeps at most 64 files not yet durable, as the fan-out does (a worker waits
   for its files before its next prompt, so a crash costs at most `concurrency`
   generations); the url cases; and the url case with a server taking 0.2 s per
   generation, like a (very fast) model; the same with the thread writer instead of the
   process, on disk and tmpfs; with a writer that writes nothing, answering at once
   or 2 ms later (the event loop's own share); and saving off while another process
   writes the same files to disk by the same protocol at the pace the disk runs saved
   them (what the disk's own work costs a client that neither decodes nor writes). A
   note gives what decoding the image costs (pybase64, from the `fast` extra, when
   installed). Not on this page: `python benchmarks/bench_save.py --instructions` counts
   the client's instructions per prompt under callgrind, saving off, with the writer that
   writes nothing, and to tmpfs (steady where prompts/s is not; see the known gaps),
   `--gate-only` runs only the gated case's runs (off, disk and tmpfs), 15 rounds,
   `--protocols` times the bare loop by the thread writer's protocol and the writer
   process's, `--flushes` runs saving off beside a process writing 2,000 files/s to disk
   in rounds of 1, 8 and 64 files (one syncfs each: what a flush costs a client beside
   it), `--image full` runs everything with a 1.8 MB image (a real 1024x1024 PNG's size;
   600 prompts a run) instead of the gated 18 KB one, and
   `--client-cpu` the client's CPU time per prompt for the same three in one process over
   a transport that answers at once, with the collector on and off (what a save costs the
   client in time, with no server, socket or disk sharing the CPU). With `--confine` the
   server gets a CPU of its own and the client's event loop the others, with unconfined
   off and disk runs in the same rounds for comparison (see the known gaps).
11. **Parsing an answer** (`bench_parse.py`, not on this page: no target): what turning
   an answer's bytes into a response costs, per answer, for one, four and ten 18 KB
   `b64_json` images, one of 1.8 MB and one url: `ImagesResponse.from_bytes` against the
   same checks on the JSON scanner's parse of the whole body (flux-async before the
   images were lifted out), `json.loads` (raw aiohttp's `response.json()`, unchecked) and
   openai's model; medians of 15 interleaved rounds in one process.

## How to reproduce

```
pip install -e '.[bench]'            # openai and matplotlib for the peers and the plot
python benchmarks/run_all.py --write-docs   # everything, about 20 minutes; rewrites this page
python benchmarks/run_all.py --quick        # a smoke run with scaled-down counts
python benchmarks/bench_fanout.py --rounds 5   # any one benchmark on its own; --help lists options
python benchmarks/bench_memory.py --prompts 20000
```

Run on an otherwise idle machine if you can; on a busy one, run a benchmark twice and
trust the ratios that agree.
"""


def main() -> int:
    args = parse_args()
    command = shlex.join(["python", *sys.argv])
    # Taken before the run: flux_async/ may be edited while the benchmarks run.
    revision, code = source_revision(), code_digest()
    names = args.only or list(BENCHMARKS)
    started = time.perf_counter()
    outputs = [run_benchmark(name, BENCHMARKS[name], args.quick) for name in names]
    elapsed = time.perf_counter() - started
    rows = [row for out in outputs for row in out.rows]
    print(f"\n===== results ({'quick' if args.quick else 'full'} run, {elapsed:.0f} s) =====")
    print(format_table(rows))
    missed = [r for r in rows if r.met is False]
    print(f"\n{len(missed)} target(s) missed" + (": " if missed else ""))
    for r in missed:
        print(f"  - {r.figure}: {r.ratio} (target {r.target})")
    print(f"\ncommand: {command}")
    if code_digest() != code:
        after = source_revision()
        revision = (
            f"{revision}; flux_async/ changed during the run (at the end: {after}): the "
            "in-process benchmarks ran the code as it was at the start"
        )
        print(f"warning: the code under test changed during the run: {revision}")
    if args.write_docs:
        write_docs(outputs, command, elapsed, args.quick, revision)
    return 0


if __name__ == "__main__":
    run_main(main)
