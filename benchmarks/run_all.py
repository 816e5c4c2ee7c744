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

The full run takes about 12 minutes on 2 cores.

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

- **Latency-bound wall ÷ ideal (information; the target is flux-async ÷ raw)** is
  above 1.05 for every client, the raw aiohttp loop included (1.150 for flux-async and
  1.159 for raw here, 1.119 and 1.105, 1.110 and 1.102, 1.137 and 1.175, 1.106 and 1.090
  on the pages before; within a few % of each other on every page). The ideal,
  `ceil(n/c) x latency`, counts no CPU time; each of the 20 waves of 100 requests costs
  both processes about 130 to 200 µs of CPU per request on 2 shared cores, which the
  emulator's timestamps show as each wave starting ~5 ms late. flux-async adds nothing
  measurable on top of raw aiohttp here.
- **Fan-out against the emulator (target ≥ 0.90x raw aiohttp)** swings between runs on
  this machine: 0.900x on this page (2,271 against 2,524 req/s, short of the target in
  the fourth digit; round by round 0.82-1.06), measured while the machine ran at about
  half its speed of the page before (raw aiohttp 2,524 req/s there against 6,992), where
  the fast server's req/s read 1.019x; 0.983x, 0.837x, 0.800x, 0.891x, 0.848x, 0.946x,
  0.858x, 0.906x, 0.788x, 0.929x, 1.005x, 0.82x, 0.84x and 1.00x on the pages before it
  (0.837x and 0.800x short of memory: see saving below); `python
  benchmarks/bench_fanout.py` alone gave 1.01x, 0.80x, 0.62x, 0.81x, 0.77x and 1.07x in
  one day (round by round 0.53 to 1.08). The emulator shares the 2 cores with the
  client, and in the runs that miss, flux-async's CPU per request against it reads
  1.2-1.6x raw's. cProfile counts the same Python calls per request against the emulator
  as against the fast server (423 for flux-async, 411-421 for raw), so it is not extra
  work flux-async does for that server; not yet explained.
- **Fast server, client CPU and req/s (targets ≤ 1.10x and ≥ 0.90x)** sit on a thin margin.
  Both are met on this page: req/s 1.019x and CPU 0.981x (round by round 0.89x-1.26x and
  0.79x-1.12x), and on the four pages before it, 1.023x and 0.978x (0.93x-1.11x and
  0.90x-1.07x), 1.026x and 0.975x (0.95x-1.33x and
  0.75x-1.05x), 1.070x and 0.938x (0.82x-1.19x and 0.85x-1.22x), then 0.987x and 1.008x
  (0.80x-1.13x and 0.88x-1.24x). On the page
  before that req/s missed by a hair and CPU was met by one:
  0.895x and 1.091x (round by round 0.75x-1.08x and 0.95x-1.32x). Both were met on the nine
  pages before that: CPU 0.976x and req/s 1.025x, then 0.982x and 0.987x, 0.944x and 1.056x, 0.99x
  and 0.975x, 0.97x and 1.04x, 0.91x and 1.09x, 0.97x and 1.04x, 0.98x and 1.03x, 1.00x and
  1.00x. They were also met in the last three runs alone (`python
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
  three 1.8k (Python 3.11 calls are cheap; the cost is the work each layer does).
- **Saving at c=64 against the fast server (target ≥ 0.85)** is missed on local disk on
  every page, and on tmpfs on most. On this page (10,000 prompts a run, medians of 5
  rounds' own ratios, at 6287c19, on a machine at about half its speed of the page before:
  off 2,429 prompts/s against 4,702): disk 0.72 (rounds 0.64-1.14) and tmpfs 0.78 (rounds
  0.66-1.20). In the same rounds the thread writer read 0.48 and 0.64, a writer that
  writes nothing at all 0.95 (answering at once) and 0.73 (2 ms later), and saving off
  beside another process writing the same files to disk 0.78. The page before (946f56e,
  the writer process's new protocol) read disk 0.79 and tmpfs 0.68, the thread writer 0.43
  and 0.61, the writer that writes nothing 0.88 and 0.82, the writes beside 0.99. The page
  before that (fdfdd45, the same protocol) read disk 0.78 and tmpfs 0.76, with the
  writer that writes nothing at 0.79 and the writes beside at 0.77, but ran short of
  memory (next item). A `bench_save.py` run alone at 3c2f504 (the same library code, also
  short of memory) read disk 0.74, tmpfs 0.83, the writer that writes nothing 0.90 and the
  writes beside 0.99. Pages before: disk 0.84, tmpfs 1.00 (also short of memory); disk
  0.73, 0.72 and 0.77, tmpfs 0.75, 0.81 and 0.99.
  Eight `bench_save.py` runs alone read disk 0.67-0.82 and tmpfs 0.72-0.90; three at
  3874677-e7d0ef5 read disk 0.66, 0.59 and 0.71, tmpfs 0.89, 0.76 and 0.89 (the 0.59 run's
  first rounds, 0.36 and 0.45, ran minutes after the run before it had removed its files:
  see the removals below; the 0.71 run wrote to a new directory at the top of the
  filesystem instead). The noise is as wide as the gap. What is known:
  - *The round after ad48a2c (2026-11-27).* The saving path changed only by one call a
    prompt (a saved prompt ends a row of failed downloads, for the new save stops). Two
    runs of `python benchmarks/bench_save.py --dir DIR` on local disk: 0.79 (rounds
    0.74, 0.79, 0.83, 0.83, 0.79; 1,587 prompts/s, off 1,998; tmpfs not run) and 0.85
    (rounds 1.00, 0.97, 0.85, 0.77, 0.73, ratio of the medians 0.84; 1,665 prompts/s,
    off 1,985; tmpfs 0.92, the writes beside 0.90 and 0.92, the writer that writes
    nothing 0.94 and 0.87). Two of the last six runs meet the gate; their median is 0.83.
    The writer process alone (an ad hoc harness handing it 10,000 18 KB files, 64 in
    flight) spent 51 µs of user and 112 µs of system time a file on a disk with no
    recent removals (499 µs of system time right after removals).
  - *The round after 88d9ef1 (2026-11-27; ad hoc unless a command is named).* A fourth
    `python benchmarks/bench_save.py --dir DIR` at four a turn read disk 0.83 (rounds
    0.53, 0.83, 0.91, 0.87, 0.70; 1,806 prompts/s, off 2,167), tmpfs 0.89, the writes
    beside 0.92, the writer that writes nothing 0.91 and 0.87, the collector 33.3 µs a
    prompt saving to disk (off 28.0). How busy the client is (`getrusage` ÷ wall, 3 pairs
    of 5,000 prompts, `gather_generate`): off 0.997-1.006, tmpfs 0.975-0.993, disk
    0.963-0.973; so at most ~3 % could come back from keeping its loop busier while
    every worker waits for its file, and the rest of the gap is the same work costing
    more beside the disk. Its loop turns a prompt: off 0.06 (73 callbacks a turn), saving
    0.27 (21 a turn), the floor four wakes a turn sets for 64 workers; at a few µs a turn
    that is ~1 µs a prompt. In the same pairs off's user CPU a prompt ranged 396-493 µs.
  - *The round after 6a4b79f (2026-11-27; ad hoc unless a command is named).*
    `Wakes` now wakes four workers a turn, not eight (6a4b79f..). `python
    benchmarks/bench_save.py --dir DIR` (DIR on local disk) before it: disk 0.79 (rounds
    0.83, 0.79, 0.77, 0.64, 1.02; saving to disk ran at 1,732-1,752 prompts/s in every
    round while off ran at 2,098-2,728), tmpfs 0.86, the collector 46.4 µs a prompt
    saving to disk (off 28.1). After it, three runs: disk 0.82 (rounds 0.81, 0.95, 0.75,
    0.86, 0.82; 1,966 prompts/s), 0.78 (rounds 0.51, 0.78, 0.78, 0.81, 0.86; 1,838) and
    0.88 (rounds 0.88, 0.75, 0.86, 0.88, 0.97; 1,642, off 2,041), tmpfs 0.96, 0.83 and
    0.95, the collector 23.1, 28.0 and 28.7 µs a prompt saving to disk (off 29.6, 29.3
    and 33.6), the writes beside 0.94, 1.09 and 1.03: the collector's share is gone, one
    run in three meets the gate, and the ratio moved less than its noise. What was
    looked into:
    - *Where the young collections start.* Each callback the event loop ran was wrapped
      to note the collector's young count before and after it (collector disabled,
      2,000 prompts by `iter_generate`, tmpfs): the step in which a worker reads its
      answer nets -30 objects the collector counts (its request's freed, its response
      made), the step in which it wakes from its save +44 (its result, its next
      request); with saving off they are one step, +10.5. 39 of the 44 young collections
      of 3,000 prompts started inside a wake step. A `Saver.store` that only yields once
      (`asyncio.sleep(0)`) made 286 young collections per 10,000 prompts, against 10
      without the yield: any wait between a generation and the next request does it.
    - *Four a turn, measured* (runs of 10,000 prompts unless said). `iter_generate`: 8 a
      turn made 128-146 young and 1-2 full collections, 23-29 µs a prompt; 4 a turn 6-11
      young and none full, 0.5-1.3 µs (off: 8 and none; the design page had recorded
      ~35-50 at 8 a turn when `Wakes` came; not traced). `gather_generate` to disk,
      paired: prompts/s with 4 ÷ with 8, per-pair median 1.075 (10 pairs of 5,000
      prompts; 2 a turn 1.071, 1 a turn 0.988 with the event loop idle 7% of the wall);
      ÷ off 0.798 against 0.741 (8 rounds; 2 a turn 0.770), the collector 30.0 against
      49.5 µs a prompt. `iter_generate` to disk ÷ off 0.774 against 0.724 (6 rounds),
      `gather_generate` to tmpfs 0.871 against 0.846 (6 rounds). The round after 327b7bd had
      read 0.756 against 0.749 in 12 rounds.
    - *Four a turn is not a guarantee.* While ~1.2 million files were being removed from
      the same disk, a fan-out of 2,000 prompts saving to disk (an in-process server
      answering at once, `tests/test_wakes.py`'s) still made 29-52 young collections in
      10 of 14 runs in the test process (7-12 in 6 runs of a script of its own), against
      11 off: when every worker waits for its file, no
      answer's step falls between the wake steps. Saving to tmpfs it made 6-7 in every
      run (eight a turn: 15-36), which is what the new test checks.
    - *What is left is not the collector.* With it disabled in both runs (8 a turn),
      saving to disk read 0.762 of off (12 pairs of 3,000 prompts, `gather_generate`).
      The client's CPU a prompt (`getrusage`, 8 pairs, 8 a turn): off 426 µs user and 35
      system, disk 479 and 57, tmpfs 469 and 46.
    - *What is left is the disk's work, not the client's.* Four a turn (8 pairs of 5,000
      prompts, `gather_generate`): the client's CPU a prompt saving to tmpfs was 426 µs
      user and 38 system against off's 443 and 36 (÷ off 0.978), saving to disk 476 and
      55 (0.865). The client runs the same code either way, so what disk adds is the
      disk's work (the writer process's system calls, the kernel's writeback, the
      host's I/O) slowing the client beside it: what the "writes beside" row measures
      (0.94 and 1.09 in the two runs above). Preemptions do not carry it: the client was
      preempted 0.064 times a prompt on disk (0.015 on tmpfs, 0.002 off), mostly by
      `rcu_preempt` (`perf record -e sched:sched_switch`, one run: 376 of ~600), and
      `SCHED_BATCH`, `SCHED_IDLE` or `nice 10` for the writer process moved prompts/s
      less than the noise (0.989, 0.970 and 1.045 of the writer as started, 8 rounds).
    - *Not the server preempting the client:* with the server under `SCHED_BATCH` (no
      wake-up preemption), disk read 0.779 of off (12 pairs of 3,000 prompts). Nor the
      concurrency: saving off, the client is CPU-bound from c=16 to c=128 (2,152-2,541
      prompts/s, medians of 3 rounds, no trend).
    - *Saving off maps memory for every answer; saving does not.* `perf trace -s` of the
      client: saving off made an mmap, an mremap and a munmap a prompt, saving to disk
      0.09, 0.05 and 0.05 (getpid 4.1 and 5.1 a prompt: `asyncio.get_running_loop` on
      Python 3.11). `perf record -e syscalls:sys_enter_mremap`: each shrinks 260 KB to 28
      KB, asyncio's 256 KB receive buffer cut to the answer's size; glibc maps a block
      that large afresh each time until a larger mapped one is freed, which raises its
      threshold, and something in a saving run does that early. So the comparison favours
      saving a little in the benchmark's long-lived process, and much in a fresh one:
      saving to disk read 1.055 of off in 10 pairs of fresh processes (5,000 prompts
      each), where off made 1,746 prompts/s. A writer process that flushed each round's
      names at once (two syncfs a round) read 1.045 of the shipped one there, within the
      noise (0.80-1.44 a pair).
    - *The disk's flush, timed* (rounds of 16 files of 18 KB by the writer process's
      protocol): syncfs after their bytes 2.2 ms median (p90 2.6), after their links
      alone 0.58 ms; writing them unnamed 0.65 ms, linking them 0.66 ms. A save waited
      19-23 ms (median) from hand-over to wake on disk, 15-16 ms on tmpfs (8 a turn).
  - *The round after 327b7bd (2026-11-27; ad hoc unless a command is named).*
    `python benchmarks/bench_save.py --dir DIR` (DIR on local disk) twice: at 327b7bd disk
    0.84 (rounds 0.77, 0.84, 0.86, 0.74, 0.89) and tmpfs 0.72, the writes beside 0.88,
    the writer that writes nothing 0.92 and 0.85 (saving off 2,346 prompts/s); at b044cfb
    disk 0.78 (rounds 0.78, 0.64, 0.93, 0.77, 1.02) and tmpfs 0.88, the writes beside
    0.90, the writer that writes nothing 1.15 and 1.02 (off 2,238). The first run's first
    round started within a minute of an ad hoc harness removing 60,000 files on the same
    disk (its bare loop wrote 2,153 files/s, against 5,000-6,900 in the later rounds; see
    "removals" below). What was looked into:
    - *Saving runs near a ceiling; off does not.* In 8 paired rounds of 10,000 prompts,
      saving to disk ran at 1,850-2,300 prompts/s throughout while off ran either at
      2,250-2,380 or at 2,600-3,500 from one run to the next: the ratio read 0.89-1.01 in
      the first case and 0.55-0.68 in the second. In the fast case the client's user CPU
      a prompt rose from 333-346 µs to 445-470 with saving (`getrusage`), of which its
      own added work is ~112k instructions (`bench_save.py --instructions`: 693.5k to
      805.8k, tmpfs) and the collector ~20 µs; the rest is the same work costing more
      beside the writer process and the disk.
    - *The writer process's CPU a file, on a disk with no recent removals:* ~160-200 µs
      (user 55-65, system 115-140), ~110 on tmpfs (`/proc` accounting of its runs).
      `perf record -a -g`: its Python 34% of its samples, `linkat` 18% (four fifths of
      it looking up and inserting the new name in a directory of 10,000-20,000 entries,
      a sixth resolving `/proc/self/fd`), `syncfs` 15%, the `O_TMPFILE` open 13%, `write`
      12%, and ~6% mapping, faulting and unmapping a fresh 1 MiB object for each read of
      its pipe (fixed in b044cfb: one buffer kept; the writer's CPU a file, medians of 3
      paired disk runs, 174 to 167 µs).
    - *The removals, sized.* In the minute after 20,000 files were removed from a
      directory beside, the writer process spent 400-920 µs of system time a file, 55-60%
      of its samples in ext4's inode allocator skipping inodes freed in the last 60 s
      (`recently_deleted`, `find_inode_bit`; this disk's ext4 has no journal): 4-5x its
      usual cost. It confirms why the disk runs keep their files to the end (`Scratch`).
    - *The collector follows the wakes, the prompts/s do not.* With saving, `gather_generate`
      of 10,000 prompts made 244-267 young and 2 full collections against 90 and 1 with
      saving off. Waking 1, 4, 8 (as shipped), 16 or 64 workers a turn (`Wakes`) made
      124-130, 165-187, 257-267, ~550 and ~555 young collections, the collector's time a
      prompt 15-19, 17-18, 34-35, ~60 and 52-56 µs. But in 12 paired rounds saving to
      disk read 0.756 of off waking 4 a turn and 0.749 waking 8, so `WAKES_PER_TURN`
      stayed 8 (the next session measured again and made it 4: above).
    - *Not the writer's scheduling class.* A writer process under `SCHED_IDLE` read 0.806
      of off against 0.809 (8 paired rounds); `nice 10` and `SCHED_BATCH` were within
      the noise before. Nor the event loop's own turns: 0.06 a prompt with saving off,
      0.13-0.20 with it.
    - *Not handing over the text instead.* Copying an image's base64 text straight
      from its `str` into the shared memory (`ctypes`, no bytes in between) and leaving
      the decoding to the writer process would take 2.6 µs of the event loop's time
      where decoding and copying take 4.5 (`timeit`, 18 KB image), but the writer
      process starts without site-packages, so without pybase64, and the standard
      library's strict decoder takes 125 µs an image there: more CPU beside the client
      than it saves.
    - *Not the client's smallest steps.* Encoding and decoding file names without
      `os.fsencode`/`os.fsdecode`'s frames, and formatting the default stem without its
      own (b044cfb), moved the instructions a prompt saving to tmpfs from 805.8k to
      802.5k and the event loop's share from 729.2k to 725.5k (off 693.5k and 693.0k):
      within callgrind's spread from run to run, so they were taken back.
  - *The round after 6287c19 (2026-11-27; ad hoc unless a command is named).* This
    page is the first at 6287c19; after it, only the parse of `b64_json` answers changed
    (91b603d, below). `python benchmarks/bench_save.py` at 91b603d read disk 0.78 (rounds
    0.71-0.92) and tmpfs 0.84 (0.83-1.03); the writer that writes nothing 0.90 and 0.84,
    the writes beside 0.90 (saving off at 2,334 prompts/s: the machine still at half
    speed). What was looked into, and what it rules out:
    - *The kept results are not the gap.* The gated runs gather every result, its b64
      text included, as `gather_generate` does; the batch command streams them. Streamed
      (`iter_generate`, paired rounds of 10,000 prompts, two sets of 6 and 4), disk read
      0.71 and 0.72 of off and tmpfs 0.76 (gathered in the first set: disk 0.76): the
      same gap, with saving off itself ~1.2x faster streamed.
    - *Not a lack of CPU.* With saving off the machine was 56-59% busy (`/proc/stat`, of
      its 2 CPUs), 74-77% saving to disk and 65-69% to tmpfs. The client is bound by its
      own CPU a prompt, which rose from ~350-390 µs with saving off to ~500-520 on disk
      and ~420-490 on tmpfs.
    - *The handover costs more in a run than alone.* Over a transport that answers at
      once, timed inside runs of 20,000 prompts: decoding each 18 KB image took 5.2-6.4
      µs (3.2 alone), its copy into the shared memory 5.6-6.4 µs (~1 alone),
      `ProcessWriter.write` ~18 µs in all; the pipe's writes 1.7 µs a prompt (one write
      for ~8 images) and reading the answers 2.7.
    - *Not the VM's memory reclaim.* This VM runs DAMON (`kdamond`, paging out memory
      untouched for 6 s, up to 128 MB/s) and its balloon reports free pages to the host:
      why a page's first touch costs here. With DAMON stopped for a run (4 paired rounds,
      streamed) disk read 0.62 and tmpfs 0.84 of off, against 0.72 and 0.76 with it:
      within the noise.
    - *What every b64 prompt paid, saved or not* (changed, 91b603d). Parsing the 24 KB
      body took 24-36 µs, against ~6 for a url body: the JSON scanner reads the image's
      text a character at a time. It is now lifted out with `bytes.find`, checked as
      base64 and put back (`_images_json.py`). `python benchmarks/bench_parse.py` (new):
      28.3 µs against 35.8 for the scanner alone with one image (0.79), 0.65 with four,
      0.58 with ten, 2.16 ms against 7.86 for a 1.8 MB image (0.28); openai's model takes
      46.4 µs and 8.69 ms. `bench_save.py --instructions`: 896.2k to 695.4k instructions a
      prompt with saving off, 1006.5k to 796.8k saving to tmpfs. Saving's own work is
      unchanged, so by instructions it is a larger share of a prompt (on ÷ off 1.12 to
      1.15): a faster client makes this gate harder, not easier.
    - *Noise.* Over a transport that answers at once, the client's CPU a prompt with
      saving off read 60-96 µs in runs of 10,000 a few seconds apart, and this page's
      runs went at half the prompts/s of the page before.
  - *The round before (2026-11-27, 946f56e..6287c19).* `python benchmarks/bench_save.py` at
    182b362 read disk 0.77 (rounds 0.57-0.85) and tmpfs 0.82 (0.69-0.98); the writer
    that writes nothing 0.90 and 0.85 (at once, 2 ms later), the writes beside 0.91.
    Its new note, the collector's time a prompt in the client (`gc.callbacks`): 24 µs
    with saving off, 43 on disk, 36 on tmpfs, 40 and 59 with the writer that writes
    nothing, 32 for saving off with the writes beside. What that round changed and
    found:
    - *Real-size images went through the pipe* (fixed, 16c0653). `--image full` (new)
      runs everything with a 1.8 MB PNG, a real 1024x1024 image's size. The memory
      shared with the writer process was a fixed 8 MB ring: four such images. The rest
      went through the pipe, and the copies into fresh memory on the way (page faults,
      `clear_page`, `munmap`: `perf record -g` on the client) cost the event loop ~10 ms
      an image. Saving read 0.33 of off on tmpfs and 0.28 on disk (ad hoc, 3 rounds of
      300 prompts). The ring now grows with what is in flight, within 512 MiB reserved
      and allocated only as used: 0.85 and 0.68 in the same harness.
      `python benchmarks/bench_save.py --image full` at 8acc439 (5 rounds of 600
      prompts): off 181 prompts/s; disk 0.66 of min(off, the disk's bare loop, 195
      files/s: ~345 MB/s, so the disk is near the bound), tmpfs 0.76, the thread writer
      0.55 and 0.79, the writer that writes nothing 1.02 and 0.97, the writes beside
      0.83. With url images and a server taking 0.2 s a generation, saving read 0.41 of
      off (113 against 276 prompts/s), where the disk's bare loop wrote ~215 files/s of
      that size: 0.53 of what the disk allows.
    - *The client's own work* (e3a4acb). The saved path is made without parsing its
      name again (pathlib's shortcut where it has one), and the writer process encodes
      the directory once: 11k fewer instructions a prompt (562.6k to 551.4k saving to
      tmpfs over a transport that answers at once, callgrind). In a tight loop, the
      saver took ~11 µs a prompt with the writer that writes nothing before it.
    - *A flush's cost to a client beside it is not the gap.* `python
      benchmarks/bench_save.py --flushes --rounds 7` (new) runs saving off while another
      process writes 2,000 files/s to disk in rounds of 1, 8 and 64 files, one syncfs
      each. It read 0.95, 1.00 and 0.97 of off (rounds of 1 reached only ~1,150
      files/s). An ad hoc run of the same, 6 rounds, read 0.87, 0.89 and 1.10. Fewer
      flushes would not win the gap back.
    - *Bigger rounds cost more* (ad hoc, 8 paired rounds of 10,000 prompts). The writer
      process held each round open 2 or 5 ms to gather more images. That read 0.71 and
      0.57 of off, against 0.83 for the writer as it is. The client was on its CPU 91%
      and 80% of the time, against 98%: the workers wait for their files in a convoy
      (see "Workers waiting for a slow flush" below).
    - *The collector counts what outlives a young collection, not the paths.* Saving
      made 144-152 young collections per 10,000 prompts, against 88-93 with saving off
      (`gather_generate`). The results' `Path`s are not the cause: with plain `str`
      paths (ad hoc) the count stayed at 154-158.
    - *The noise, again.* Saving off ran at 1,948-4,208 prompts/s from run to run within
      the hour; the client's CPU was 238-513 µs a prompt for the same work. Six ad hoc
      medians of tmpfs ÷ off, of 6-8 paired rounds each, read 0.70, 0.78, 0.83, 0.83,
      0.89 and 0.95. The gate's 0.85 lies inside their spread.
  - *Two pages measured short of memory* (found on 2026-11-27). The pages at 3c0de9e and
    fdfdd45, and every ad hoc run of these two rounds before 05:40 UTC on 2026-11-27, ran
    with ~20 of this VM's 24 GB held by files that ad hoc harnesses had left on tmpfs
    (`/dev/shm`; `bench_save.py` removes its own). It came to light when the kernel killed
    a harness for want of memory. With them removed, the page at 946f56e, and ad hoc 6 paired rounds
    read disk 0.72 and tmpfs 0.86 of off, the client idle ~2% of the time on disk rather
    than 5-7%: the gap was not the lack of memory, but the figures and findings below
    from before it were taken short of it.
  - *The writer's own cost is not what holds it* (5c2244e). The writer process now writes
    each image unnamed (`O_TMPFILE`), links it under its final name after the round's
    syncfs, and under load lets the next round's syncfs make the names durable. Its bare
    loop on disk writes 1.33x the files/s of the old protocol, at 79 µs of CPU a file
    against 107 (`python benchmarks/bench_save.py --protocols`, rounds of 8 files), and
    beside a disk run it used ~0.34 cores against ~0.41 (ad hoc). The fan-out's figure did
    not move beyond the noise: 0.733 of off against 0.716 with the old protocol (6 paired
    rounds, ad hoc), and a writer that flushes each round's names at once (two flushes a
    round, one round less of latency) read 0.703 against 0.682 (8 rounds).
  - *Rounds against the event loop's long turns* (ad hoc). A stand-in writer inside the
    event loop that writes nothing but answers in rounds like the real one (each round
    takes every image handed over since the last began, and answers them all after a
    fixed 2 ms, or after the durations of the disk rounds logged) read 0.77-0.78 of off,
    its client idle 9-16% of the time: `select` returned nothing 124-153 times a run,
    ~2 ms each, against an idle client 0.7% of the time with saving off and ~4% with the
    real writer on disk. Its rounds were 1-2 images at the median and 63 at the 90th
    percentile: the event loop handles a whole round's answers in one turn (~20 prompts,
    ~4 ms), so the workers move in a convoy and wait for the next round together. With
    the real writer, handing each job to the pipe at once, or after every 4 or 8, rather
    than once a turn, was within the noise (0.67, 0.80, 0.74 against 0.74; 5 rounds).
  - *Not the disk's interrupts, not the writer's priority* (ad hoc, 5-6 rounds). The
    disk's interrupts all land on CPU 1 here; a client pinned to CPU 0 read 0.78 of off
    on disk, pinned to CPU 1 0.73, free 0.73 (the writer process on both CPUs). A writer
    process under `nice 10` read 0.72 against 0.70.
  - *The noise, measured* (ad hoc). Saving off alone, 8 runs of 10,000 prompts back to
    back: 4,115-5,359 prompts/s, the client's CPU 186-242 µs a prompt; with client and
    server pinned to a CPU each, 3,554-4,540 prompts/s and 219-276 µs. The same work
    costs up to ~30% more CPU from one run to the next, 2 s apart, as much as the gap
    the gate measures.
  - *Where the processes run* (e7d0ef5). On these 2 CPUs the fast server shares the
    client's. A scheduler trace of one disk run of 10,000 prompts (`perf record -a -e
    sched:sched_switch`, ad hoc) had the client preempted 721 times by the server and 81
    times by the writer process, against about none with saving off: while the writer
    is busy on the other CPU, the server's wake-ups land on the client's. `python
    benchmarks/bench_save.py --confine` gives the server the last CPU and the client's
    event loop the others (the writer process and the process writing beside a run get
    both), and runs off and disk unconfined in the same rounds for comparison. Two runs:
    disk 0.84 and 0.71 confined against 0.72 and 0.69 unconfined; tmpfs 0.87 and 0.76;
    the row with files written beside a run without saving 1.06 and 0.95. Ad hoc A/B runs
    (8-10 paired rounds of 10,000 prompts) read confined disk at 0.81 of unconfined off
    where unconfined disk read 0.72, but confined off itself at 0.90 and 0.98 of
    unconfined off: a client that no longer shares a CPU and its caches with the server
    at times loses something too. So neither placement is a remote server's, the gated
    figures stay the unconfined ones, and placement explains a part of the gap that the
    noise does not let us size. A writer process under `SCHED_BATCH` (no wake-up
    preemption) was within the noise (disk 0.73 against 0.77 of off, tmpfs 0.86 against
    0.81; 8 paired rounds).
  - *Workers waiting for a slow flush* (ad hoc, the writer's rounds logged, runs of 10,000
    prompts): a round takes 1.3-2.3 ms on disk at the median, but 2-6 ms at the 90th
    percentile and up to 10-25 ms, against 0.3-0.4 ms and at most 2-5 ms on tmpfs. At
    ~5,000 prompts/s, 64 workers are all waiting for files within ~13 ms, so a long flush
    idles the client: it was on its CPU 86-99% of the time in disk runs against 99-100%
    with saving off. A fixed 2 ms wait for each image alone costs little (the row with a
    writer answering 2 ms later: 0.96 and 0.89 on two earlier pages, 0.84 and 0.82 on the
    last two, where answering at once read 0.79 and 0.88); the tail, and rounds that
    answer many images together, do ("Rounds against the event loop's long turns",
    above). A wider window would hide it, but prompts generated and not yet saved are
    bounded by `concurrency` so that a crash costs at most that many generations, and a
    worker released before its file is durable would make an `ok` in the manifest mean
    less.
  - *The disk's own work, measured.* The row "save_to off, another process writing files to
    disk at the disk run's pace" runs the fan-out without saving while a second process
    writes the same PNG by the same protocol, as many files a second as the disk runs saved:
    0.78 of off on this page, 1.01, 0.86, 0.88 and 0.95 on the pages before, 0.87, 0.88,
    0.90 and 0.92 in four `python benchmarks/bench_save.py` runs, 0.92 ad hoc (8 paired
    rounds of 6,000 prompts; the same process writing to tmpfs: 0.98). That client decodes
    and writes nothing; what it loses is the kernel's and, on this VM, the host's work for
    the disk, on the same 2 cores, which no change to the client can win back (the round of
    e7d0ef5: 0.86, 0.73 and 0.95 unconfined, 1.06 and 0.95 confined; see the item above).
    How much of the disk gap it is, the rows are too noisy to say: tmpfs times that row
    gives 0.61 on this page, where disk read 0.72; 0.67 on the page before, where disk read
    0.79; 1.01, 0.65, 0.71 and 0.94 on pages before those, where disk read 0.84, 0.73, 0.72
    and 0.77.
    Besides the disk's work, a round takes ~1.7 ms on disk against ~0.35 ms on tmpfs, so
    more workers wait for their files at once and more of their objects outlive a young
    collection: `gather_generate` of 10,000 prompts made ~220-250 young and 2 full
    collections on disk, against ~150-180 and 1 on tmpfs and ~90 and 1 with saving off (ad
    hoc).
  - *Where the writer's time goes* (`perf record -a -g`, cpu-clock, one disk run): a
    quarter of the writer process's samples copy each image into fresh page-cache pages
    (`copy_folio_from_iter_atomic`: ~15 µs per 18 KB file, against ~2 µs to overwrite
    pages already cached: first touches of memory are what cost on this VM), the rest is
    spread over ext4's directory and inode work; the client's own kernel share was 4.5%.
  - *The client's own work, counted* (`python benchmarks/bench_save.py --instructions`,
    callgrind, the client alone; within ~1.5% from run to run, where prompts/s moves by
    tens of percent): 930k instructions per prompt with saving off, 983-986k with a writer that
    writes nothing (the event loop's own share of a save: 1.06x) and 1028-1041k saving to
    tmpfs (1.10x-1.12x in two runs: decoding the image and handing it to the writer
    process add the other 45-55k, ~18k of them the image's copy into shared memory, which
    callgrind counts byte by byte). By instructions alone on ÷ off would be about 0.9; in
    time it is lower (next item). The Python part is spread over the saver, the job, its
    future and the path (the largest single item, `directory / name`, is ~2.1-2.8 µs).
  - *The client's own work, in time* (`python benchmarks/bench_save.py --client-cpu --rounds
    7`: one process, a transport that answers at once, no server and no socket; each figure
    the CPU of 6,000 prompts less that of 1,500, per prompt between them, so the writer
    process's start, when a thread writes the images, cancels out; medians of 7 rounds, at
    48e8d75): 44.2 µs of CPU a prompt with saving off, 65.3 with the writer that writes
    nothing, 74.2 saving to tmpfs through the writer process. Saving adds ~30 µs a prompt
    (~27 with the collector off): ~21 the event loop's own share (the saver, the job, its
    future, the path: the saver alone takes ~7 µs in a tight loop, where every object stays
    in cache) and ~9 the handover to the writer process (decoding, the copy into shared
    memory and the job's header take ~4.5 µs of it measured alone; the pipe and the answers
    the rest). A first version of this mode, without the start cancelled, read ~47 µs.
    Against the fast server the client spends ~180-250 µs a prompt, so this alone brings on
    ÷ off to about 0.87-0.89, as the instruction count does. The client's CPU per prompt
    rose ~50 µs there, on disk and on tmpfs alike (per process, below): the other ~20 µs is
    the same work costing more in the real client, beside aiohttp's working set and the
    writer process, and not the disk's own work, as tmpfs rose as much; this VM has no
    performance counters to split it further. Since then the saver saves a prompt's one
    `b64_json` image in one step (035edf7: ~6-10 µs less a prompt in an A/B of the two
    paths, 10 rounds of this setup; the next two `bench_save.py` runs read disk 0.80 and
    0.68, tmpfs 0.84 and 0.79, the second while tmpfs's bare loop ran at a third of its
    speed an hour before: within the noise of the runs before; `--client-cpu` at f5b0dc9
    read the event loop's share at 3-8 µs a prompt and the handover at ~20-23). What is left
    is mostly the handover (~20 µs: the pipe's system calls, the answers, the wake-ups,
    decoding and the copy), where the trims found so far are worth a few µs each (the
    header's directory encoded once, one answer per round rather than per file, the path
    made without parsing it again; not done), and a ring of shared memory that reuses what
    is still in cache was within the noise (ad hoc).
  - *Ruled out, ad hoc* (one process, runs of 6,000 prompts, each disk run between two
    off runs, 12 such triples per arm): the collector. With it disabled for every run,
    disk read 0.70 of off (median), with it on 0.77. And the workers that wait for their
    files: saving off, concurrency 48, 32 and 16 read 0.95, 0.97 and 1.07 of 64 (6 paired
    rounds), so fewer requests in flight do not slow a client bound by its CPU. In blocks
    of off, disk, tmpfs, tmpfs, disk, off (10 blocks of 4,000 prompts) disk read 0.68
    (0.57-0.95) and tmpfs 0.79 (0.51-1.02): the gap is real, and adjacent runs of the same
    code still differ by up to 40%.
  - *The garbage collector, fixed the round before.* A round's answers woke its 20-60 workers
    in one turn of the event loop, each of which started a request (~50 objects the
    collector counts; it collects the young generation once 700 more are allocated than
    freed). That made a young collection in nearly every round: ~450-550 per 10,000
    prompts saved against ~10 (`iter_generate`) or ~90 (`gather_generate`, whose results
    stay) with saving off, and 4-5 full collections instead of 0-1. With the collector
    disabled, saving on tmpfs read 0.99 of off (8 paired fresh processes; 0.84 with it).
    The writers then woke eight per turn (`Wakes`; four now): ~35-50 young collections
    (`iter_generate`, tmpfs) and at most one full one. In back-to-back `bench_save.py`
    runs, tmpfs went from 0.74 to 0.85 and the writer that writes nothing from 0.86 to
    1.01; in the ad hoc runs after it, saving on tmpfs read 0.90-1.0 of off.
  - *The benchmark measured its own removals (fixed earlier).* Each run's files
    were removed before the next run; ext4 without a journal (this VM's disk) does not
    reuse an inode freed in the last minute or so and scans past each on every create
    (`perf`: `recently_deleted()` under `ext4_create`), so a create right after thousands
    of removals cost 300-800 µs of kernel time. A disk run's files now stay until the
    benchmark ends, as a batch's would; the bare loop writes 7,000-16,000 files/s, above
    the fast server's prompts/s, and the gated disk figure is plain on ÷ off. Its removal
    at the end still slows any benchmark writing to the same disk in the minutes after
    it: measured at 3874677, a bare loop wrote 800-1,400 files/s (660-1,080 µs of kernel
    time a file, 70% of it in `recently_deleted()`) for 10-90 s after 20,000-300,000 files
    were removed, against 5,000-6,000 files/s otherwise. `--dir` on a new directory at
    the top of the filesystem (which ext4 places in a block group of its own) seemed to
    avoid it in two runs.
  - *On disk, the filesystem's own work* on the same 2 cores as the client and the
    server. A bare loop by the library's protocol spends 65-115 µs of kernel time per file
    on this disk and 20-37 µs on tmpfs, and 50-130 µs on disk with no flush at all: the
    create and the write cost, not the flush. Ad hoc (`getrusage`, 10,000 prompts) the
    writer process used ~0.37 cores on disk and ~0.22 on tmpfs, the machine ~1.4 cores in
    all, and the client's own CPU per prompt rose ~15% on disk and ~7% on tmpfs over the
    same code path (this VM has no performance counters to say which cache or core it
    lost to). Its event loop ran 96-98% of the time in those runs, idle 1-2%.
  - *Where the client's time goes, per process* (ad hoc, `/proc` and `getrusage`, two sets
    of 6 and 8 paired rounds of 8,000 prompts, `gather_generate`): the client was on its CPU
    100% of the wall time with saving off and 96-97% on disk, so its prompts/s follow its
    CPU per prompt: 177 and 202 µs off, 238 and 246 µs on disk (+20-35%, where its
    instructions grow ~11%; on tmpfs, in an earlier set, 254-294 against 193-242 off). The
    writer process used 110-114 µs per file (84-86 of them in the kernel), kernel threads
    and interrupts another ~32 µs per prompt, the machine 1.66 of its 2 cores. The client's
    rise, ~50 µs a prompt here and as much on tmpfs, is ~30 µs of its own work
    (`--client-cpu`, the item above) and ~20 µs of that work costing more beside the rest;
    the disk's own work is at most what the row with files written beside a run without
    saving shows (0.86-0.92). The two vCPUs are not hyperthreads of one core (a loop
    spinning on one does not slow a loop on the other). Re-tried in the same sets, ad hoc:
    `O_TMPFILE` and `linkat` (the writer's CPU per file -20%; 0.80 of off against 0.76) and
    `POSIX_FADV_DONTNEED` (0.84 against 0.76 in the first set, 0.76 against 0.81 in the
    second): within the noise again.
  - *Tried and not taken:* a writer process that commits a round on a second thread
    while it stages the next (0.93x of the current one on disk, 8 paired rounds, 3 wins);
    `O_TMPFILE` and `linkat` instead of a temporary name and a rename (no kernel time
    saved that the noise let through); a writer process at `nice` 10 (0.995x, 8 paired
    rounds); `sync_file_range` on each file, to start its writeback in the writer rather
    than in the kernel's flusher (the writer's CPU per file +50%; 0.76 of off against
    0.86, 4 rounds); holding each round open until 4 or 8 ms after the one before began,
    for fewer flushes (flushes per 10,000 files from ~1,600 to ~800-1,200, disk writes per
    file from 2.4 to 1.6-2.0, but more workers waiting and more collections: 0.61 and
    0.62 against 0.66 in the same rounds); dropping each file's pages from the page cache
    once it is durable (`POSIX_FADV_DONTNEED`: the writer's CPU per file -15%, 1.02x the
    prompts/s over 14 paired rounds, within the noise); a writer process under
    `SCHED_BATCH` or `SCHED_IDLE`, which do not preempt the client when they wake (the
    client's involuntary switches on disk fell from 0.23-0.51 to 0.03-0.13 per prompt
    under `SCHED_IDLE`): 0.75 and 0.72 of off against 0.70 (6 rounds, within the noise).
    Decoupling a worker from its file's write is ruled out by the crash bound (a worker
    that waits for its file is what keeps prompts generated but not saved within
    `concurrency`).
  - *Noise.* Round by round the same code reads 0.55-1.06 here; the machine's own speed
    swings ±25% between runs a few seconds apart, and a figure from 5 rounds moves by
    ~±0.1 between runs. Against a real model (seconds per image) a save's milliseconds
    are noise: the 0.2 s row reads 0.96.
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
   over fork + exec into the child's `ru_maxrss`.
6. **Import time** (`bench_import.py`): `python -c 'import X'` minus `python -c pass`,
   median of 7 fresh interpreters each, interleaved; `-X importtime` as a cross-check.
   Target ≤ 0.5x openai.
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
   `--tmpfs-dir`); 5 interleaved rounds, each ratio the median of the rounds' own
   ratios. The disk's own ceiling is measured in
   the same rounds: a bare loop writing the same files by the same protocol and doing
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
python benchmarks/run_all.py --write-docs   # everything, about 12 minutes; rewrites this page
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
