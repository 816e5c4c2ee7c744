"""Faults: do retries hold when the server fails in the ways real servers do?

Setup: the fault server of the test suite (``python -m tests.faultserver --scenario
NAME``), written from the contract and independent of the emulator, in its own process;
it counts every request per ``Idempotency-Key`` from its side. Each scenario sends its
prompts through ``FluxClient(...).gather_generate(prompts)`` with default settings (the
slow-answer scenario also sets ``timeout=Timeout(total=1)``; the every-attempt-429 one
``RetryPolicy(max_rate_limited_attempts=5)``; the 429 scenarios a ``batch_deadline`` as
a guard). The server answers after ``--latency`` seconds (0.025).

Scenarios (the same as ``tests/test_faults.py``):

* ``ok``: fault-free, the baseline for wall time (run for each prompt count used);
* ``html500-first``: a 500 with an HTML body on each prompt's first attempt;
* ``outage``: the server goes down 0.5 s into the batch and comes back 2.3 s later;
* ``drop-mid-body-2``: the connection closed mid-body on the first 2 attempts;
* ``slow-first``: the first attempt answered after 3 s, against ``Timeout(total=1)``;
* ``429-ra1-2``: 429 with ``Retry-After: 1`` on the first 2 attempts;
* ``429-always``: 429 with ``Retry-After: 1`` on every attempt (ends in RateLimitError);
* ``flaky-30``: 30 % 5xx (500 HTML, 502, 503 JSON; seeded) for 10 s, then healthy;
* ``garbage-retry-after``: one 429 whose Retry-After is garbage (5 kinds);
* ``bucket-40-ra5``: a token bucket of 40/s (40 at once) whose 429s say Retry-After: 5,
  which pauses every caller: the client must come under its rate in few pauses;
* ``storm-ra2``: every request refused with Retry-After: 2 for 10 s, then all served:
  the rate must not collapse over the storm;
* ``quota-spent``: every request refused with Retry-After: 3600 (a spent quota): the
  fan-out must stop at once, not fail a prompt a minute.

Figures, per scenario: prompts lost (not exactly one result), duplicates (prompts the
server answered 200 twice), failed, attempts per prompt counted by the client
(``result.attempts``) and by the server (which must agree, except that attempts
refused during an outage never reach the server), retry amplification (server attempts
÷ prompts) and wall time ÷ the fault-free run's (same prompt count, same invocation).

Targets (issue #6): 0 lost, 0 duplicates, counts agree, and 0 failed (``429-always``:
every prompt a RateLimitError after 5 attempts); ``html500-first`` at most 2.2 attempts
per prompt; ``outage`` wall <= fault-free + 2.3 + 5 s; the 429 scenarios done in 30 s;
``bucket-40-ra5`` wall <= 2 x prompts / 40 s; ``storm-ra2`` wall <= the storm + 10 s;
``quota-spent`` every prompt a RateLimitError or BatchStoppedError, at most 16 + 2
requests, in 5 s.

    python benchmarks/bench_faults.py [--quick] [--only outage] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import (
    API_KEY,
    BenchOutput,
    EmulatorProcess,
    Row,
    run_main,
)

from flux_async import FluxClient, RetryPolicy, Timeout

OUTAGE = 2.3
OUTAGE_SLACK = 5.0
MAX_ATTEMPTS_HTML500 = 2.2
MAX_WALL_429 = 30.0
BUCKET_RATE = 40.0
STORM_SLACK = 10.0
MAX_WALL_QUOTA = 5.0


# -- the fault server in its own process -------------------------------------------------


class FaultServerProcess(EmulatorProcess):
    """``python -m tests.faultserver --scenario NAME --port 0 ARGS...``; its counts come
    from the JSON it prints on SIGTERM (`finish`), which works even mid-outage."""

    def __init__(self, scenario: str, *args: str) -> None:
        super().__init__("--scenario", scenario, "--keys", *args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.faultserver", *self.args]

    def finish(self) -> dict[str, Any]:
        """SIGTERM the server and return the counts it prints as it exits."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise RuntimeError("the fault server is not running")
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            self.stop()
        lines = out.decode().strip().splitlines()
        if not lines:
            raise RuntimeError("the fault server printed no counts")
        data: dict[str, Any] = json.loads(lines[-1])
        return data


class _CountErrors(logging.Handler):
    """Counts the client's error log records (a prompt that failed unexpectedly logs its
    traceback) instead of printing hundreds of them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.first = f"{type(exc).__name__}: {exc}"


# -- one scenario ------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    prompts: int
    latency: float
    server_args: tuple[str, ...] = ()
    client: dict[str, Any] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # client and server attempts must agree prompt by prompt
    storm: float = 0.0  # storm-ra2: seconds of refusals


@dataclass
class Outcome:
    scenario: Scenario
    wall: float
    lost: int
    duplicates: int
    failed: int
    errors: Counter[str]
    client_attempts: int
    server_attempts: int
    disagree: int
    attempts_each: Counter[int]
    clean_wall: float | None = None
    error: str | None = None
    logged: int = 0
    logged_first: str | None = None

    @property
    def n(self) -> int:
        return self.scenario.prompts

    @property
    def wall_ratio(self) -> float | None:
        if not self.clean_wall:
            return None
        return self.wall / self.clean_wall


def prompts(n: int, tag: str) -> list[str]:
    return [f"{tag}-{i:06d}" for i in range(n)]


def run_scenario(scenario: Scenario, guard: float) -> Outcome:
    """Run one scenario against a fresh fault server process and count both sides."""
    sent = prompts(scenario.prompts, scenario.name)
    args = ("--latency", f"{scenario.latency:g}", *scenario.server_args)
    results: list[Any] = []
    failure: str | None = None
    with FaultServerProcess(scenario.name, *args) as server:

        async def go() -> float:
            async with FluxClient(
                api_key=API_KEY, base_url=server.base_url, **scenario.client
            ) as client:
                started = time.perf_counter()
                async with asyncio.timeout(guard):
                    results.extend(await client.gather_generate(sent, **scenario.batch))
                return time.perf_counter() - started

        logger = logging.getLogger("flux_async")
        errors_logged = _CountErrors()
        logger.addHandler(errors_logged)
        try:
            wall = asyncio.run(go())
        except TimeoutError:
            wall, failure = guard, f"no answer within the {guard:g} s guard"
        finally:
            logger.removeHandler(errors_logged)
        counts = server.finish()
    by_prompt: Counter[str] = Counter()
    oks: Counter[str] = Counter()
    for record in counts["keys"].values():
        by_prompt[record["prompt"]] += record["attempts"]
        oks[record["prompt"]] += sum(
            1 for o in record["outcomes"] if isinstance(o, int) and 200 <= o < 300
        )
    seen = Counter(r.prompt for r in results)
    lost = sum(1 for p in sent if seen[p] != 1)
    failed = [r for r in results if not r.ok]
    if scenario.exact:
        disagree = sum(1 for r in results if r.attempts != by_prompt[r.prompt])
    else:
        disagree = sum(1 for r in results if r.attempts < by_prompt[r.prompt])
    return Outcome(
        scenario=scenario,
        wall=wall,
        lost=lost,
        duplicates=sum(1 for p in sent if oks[p] > 1),
        failed=len(failed),
        errors=Counter(type(r.error).__name__ for r in failed),
        client_attempts=sum(r.attempts for r in results),
        server_attempts=sum(by_prompt[p] for p in sent),
        disagree=disagree,
        attempts_each=Counter(r.attempts for r in results),
        error=failure,
        logged=errors_logged.count,
        logged_first=errors_logged.first,
    )


# -- targets -----------------------------------------------------------------------------


def target_text(name: str) -> str:
    base = "0 lost/dup, counts agree"
    extra = {
        "html500-first": f"0 failed, <= {MAX_ATTEMPTS_HTML500} att.",
        "outage": f"0 failed, wall <= clean + {OUTAGE:g} + {OUTAGE_SLACK:g} s",
        "429-ra1-2": f"0 failed, wall <= {MAX_WALL_429:g} s",
        "429-always": f"all RateLimitError at 5 att., wall <= {MAX_WALL_429:g} s",
        "bucket-40-ra5": f"0 failed, wall <= 2 x n / {BUCKET_RATE:g}",
        "storm-ra2": f"0 failed, wall <= storm + {STORM_SLACK:g} s",
        "quota-spent": f"stopped: <= 18 requests, wall <= {MAX_WALL_QUOTA:g} s",
    }
    return f"{base}, {extra.get(name, '0 failed')}"


def misses(o: Outcome) -> list[str]:
    """What this outcome misses of its targets (empty: all met)."""
    out = []
    name = o.scenario.name
    if o.error:
        out.append(o.error)
    if o.lost:
        out.append(f"{o.lost} lost")
    if o.duplicates:
        out.append(f"{o.duplicates} duplicated")
    if o.disagree:
        out.append(f"attempts disagree for {o.disagree} prompts")
    if name == "quota-spent":
        if set(o.errors) - {"RateLimitError", "BatchStoppedError"}:
            out.append(f"errors {dict(o.errors)}")
        if o.server_attempts > 18:
            out.append(f"{o.server_attempts} requests")
        if o.wall > MAX_WALL_QUOTA:
            out.append(f"wall {o.wall:.1f} s")
    elif name == "429-always":
        if o.errors != Counter({"RateLimitError": o.n}):
            out.append(f"errors {dict(o.errors)}")
        if set(o.attempts_each) != {5}:
            out.append(f"attempts {dict(o.attempts_each)}")
    elif o.failed:
        out.append(f"{o.failed} failed {dict(o.errors.most_common(3))}")
    if name == "html500-first" and o.client_attempts / o.n > MAX_ATTEMPTS_HTML500:
        out.append(f"{o.client_attempts / o.n:.2f} attempts/prompt")
    limit = None if o.clean_wall is None else o.clean_wall + OUTAGE + OUTAGE_SLACK
    if name == "outage" and limit is not None and o.wall > limit:
        out.append(f"wall {o.wall:.1f} s > fault-free {o.clean_wall:.1f} + {OUTAGE + OUTAGE_SLACK}")
    if name in ("429-ra1-2", "429-always") and o.wall > MAX_WALL_429:
        out.append(f"wall {o.wall:.1f} s")
    if name == "bucket-40-ra5" and o.wall > 2 * o.n / BUCKET_RATE:
        out.append(f"wall {o.wall:.1f} s > {2 * o.n / BUCKET_RATE:g}")
    storm = o.scenario.storm
    if name == "storm-ra2" and o.wall > storm + STORM_SLACK:
        out.append(f"wall {o.wall:.1f} s > {storm + STORM_SLACK:g}")
    return out


# -- the tables --------------------------------------------------------------------------

COLUMNS = (
    "scenario",
    "prompts",
    "lost",
    "dup",
    "failed",
    "att/prompt client",
    "att/prompt server",
    "agree",
    "amplification",
    "wall s",
    "wall ÷ fault-free",
    "met?",
)


def table_cells(outcomes: Sequence[Outcome]) -> list[tuple[str, ...]]:
    cells = []
    for o in outcomes:
        ratio = o.wall_ratio
        cells.append(
            (
                o.scenario.name,
                str(o.n),
                str(o.lost),
                str(o.duplicates),
                str(o.failed),
                f"{o.client_attempts / o.n:.2f}",
                f"{o.server_attempts / o.n:.2f}",
                agree_text(o),
                f"{o.server_attempts / o.n:.2f}x",
                f"{o.wall:.2f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                "yes" if not misses(o) else "NO",
            )
        )
    return cells


def agree_text(o: Outcome) -> str:
    if o.disagree:
        return f"NO ({o.disagree})"
    # An outage: attempts refused while the server was down never reach it.
    return "yes" if o.scenario.exact else "yes (>=)"


def text_table(outcomes: Sequence[Outcome]) -> str:
    cells = [COLUMNS, *table_cells(outcomes)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(outcomes: Sequence[Outcome]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(c) + " |" for c in table_cells(outcomes)]
    return "\n".join(out)


def to_row(o: Outcome) -> Row:
    ratio = o.wall_ratio
    agree = ("=" if o.scenario.exact else ">=") if not o.disagree else "!="
    wall = f"wall {o.wall:.1f} s" + ("" if ratio is None else f" = {ratio:.2f}x fault-free")
    return Row(
        figure=f"faults: {o.scenario.name} (n={o.n})",
        flux=f"failed {o.failed}, lost {o.lost}, dup {o.duplicates}",
        peer=(
            f"attempts/prompt client {o.client_attempts / o.n:.2f} {agree} "
            f"server {o.server_attempts / o.n:.2f}"
        ),
        ratio=f"amplification {o.server_attempts / o.n:.2f}x; {wall}",
        target=target_text(o.scenario.name),
        met=not misses(o),
    )


# -- the run -----------------------------------------------------------------------------

SCENARIOS = (
    "html500-first",
    "outage",
    "drop-mid-body-2",
    "slow-first",
    "429-ra1-2",
    "429-always",
    "flaky-30",
    "garbage-retry-after",
    "bucket-40-ra5",
    "storm-ra2",
    "quota-spent",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer prompts, scaled-down waits (smoke)"
    )
    parser.add_argument("--latency", type=float, default=0.025, help="server s per answer")
    parser.add_argument(
        "--only", action="append", choices=SCENARIOS, help="run only these scenarios"
    )
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    return parser.parse_args(argv)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    quick = args.quick
    big, mid, small = (300, 100, 20) if quick else (1000, 300, 50)
    slow, total = (0.75, 0.25) if quick else (3.0, 1.0)
    storm = 3.0 if quick else 10.0
    guard = 30 if quick else 60
    lat = args.latency
    # The outage must hit a running batch: fault-free, the batch lasts ~1.6 s.
    outage_latency = max(lat, 1.6 * 16 / big)
    table = {
        "html500-first": Scenario("html500-first", big, lat),
        "outage": Scenario("outage", big, outage_latency, exact=False),
        "drop-mid-body-2": Scenario("drop-mid-body-2", mid, lat),
        "slow-first": Scenario(
            "slow-first",
            mid,
            lat,
            server_args=("--slow", f"{slow:g}"),
            batch={"timeout": Timeout(total=total)},
        ),
        "429-ra1-2": Scenario("429-ra1-2", mid, lat, batch={"batch_deadline": guard}),
        "429-always": Scenario(
            "429-always",
            small,
            lat,
            client={"retry": RetryPolicy(max_rate_limited_attempts=5)},
            batch={"batch_deadline": guard},
        ),
        "flaky-30": Scenario(
            "flaky-30", big, lat, server_args=("--window", "3" if quick else "10", "--seed", "6")
        ),
        "garbage-retry-after": Scenario(
            "garbage-retry-after", mid, lat, batch={"batch_deadline": guard}
        ),
        "bucket-40-ra5": Scenario("bucket-40-ra5", mid if quick else big, lat),
        "storm-ra2": Scenario(
            "storm-ra2",
            mid,
            lat,
            server_args=("--window", f"{storm:g}"),
            storm=storm,
        ),
        "quota-spent": Scenario("quota-spent", mid, lat, batch={"batch_deadline": guard}),
    }
    return [table[name] for name in (args.only or SCENARIOS)]


def run(args: argparse.Namespace) -> BenchOutput:
    chosen = scenarios(args)
    guard = 120.0
    print(
        f"faults: {len(chosen)} scenarios, default client settings, fault server in its own "
        f"process (latency {args.latency:g} s)"
    )
    clean: dict[tuple[int, float], float] = {}
    outcomes: list[Outcome] = []
    for scenario in chosen:
        key = (scenario.prompts, scenario.latency)
        if key not in clean:
            base = run_scenario(Scenario("ok", scenario.prompts, scenario.latency), guard)
            clean[key] = base.wall
            print(
                f"  fault-free n={scenario.prompts} latency {scenario.latency:g}: "
                f"wall {base.wall:.2f} s, failed {base.failed}"
            )
        outcome = run_scenario(scenario, guard)
        outcome.clean_wall = clean[key]
        outcomes.append(outcome)
        missed = misses(outcome)
        print(
            f"  {scenario.name:<20} n={scenario.prompts:<5} wall {outcome.wall:6.2f} s  "
            f"failed {outcome.failed:<4} attempts client {outcome.client_attempts} "
            f"server {outcome.server_attempts}"
            + (f"  MISSED: {'; '.join(missed)}" if missed else "  ok"),
            flush=True,
        )
    print()
    print(text_table(outcomes))
    if args.markdown:
        print()
        print(markdown_table(outcomes))
    notes = [
        "fault server: tests/faultserver.py in its own process (independent of the "
        "emulator), counting per Idempotency-Key; "
        + "; ".join(
            f"{o.scenario.name}: {dict(o.errors.most_common(3)) or 'no errors'}"
            + (f" ({'; '.join(misses(o))})" if misses(o) else "")
            for o in outcomes
        )
    ]
    logged = [o for o in outcomes if o.logged]
    if logged:
        notes.append(
            "the client logged unexpected errors: "
            + "; ".join(f"{o.scenario.name}: {o.logged} x {o.logged_first}" for o in logged)
        )
    if any(not o.scenario.exact for o in outcomes):
        notes.append(
            "outage: client attempts include those refused while the server was down, "
            "which never reach it (client >= server)"
        )
    return BenchOutput("faults", [to_row(o) for o in outcomes], notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
