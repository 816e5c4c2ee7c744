"""Shared pieces of the benchmark suite: the emulator subprocess, the contenders, the table.

Every benchmark talks to ``python -m flux_async.emulator`` running in a separate process
(`EmulatorProcess`), so the server never competes with the client for the client's event
loop. The three contenders make the same request, ``POST /v1/images/generations`` with
``{"prompt", "model", "n": 1, "aspect_ratio": "1:1"}``, and read and parse the JSON answer:

* ``flux-async``: ``FluxClient(...).gather_generate(prompts, concurrency=c)``, default retry
  policy and limiter, ``max_connections=c``;
* ``raw aiohttp``: one ``ClientSession`` (connector ``limit=c``), an ``asyncio.Semaphore(c)``
  and ``asyncio.gather``, POST JSON, read the body, ``json.loads`` it;
* ``openai``: ``AsyncOpenAI(...).images.generate(model=..., prompt=...,
  extra_body={"aspect_ratio": "1:1"})`` under an ``asyncio.Semaphore(c)``, default
  ``max_retries`` (2) and pool (1000 connections).

Figures are ratios against peers measured in the same invocation, never absolute targets:
the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DOCS_DIR = REPO_ROOT / "docs"
IMG_DIR = DOCS_DIR / "img"
# The scripts run as `python benchmarks/x.py` from a checkout: make `flux_async` importable.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aiohttp  # noqa: E402

from flux_async import FluxClient  # noqa: E402

API_KEY = "bench"
MODEL = "flux-kontext-pro"
ASPECT_RATIO = "1:1"
FLUX = "flux-async"
RAW = "raw aiohttp"
OPENAI = "openai"
CONTENDERS = (FLUX, RAW, OPENAI)

# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the results table.

    ``ratio`` is the number the ``target`` is checked against (flux-async ÷ peer, or
    flux-async ÷ the ideal / configured value); ``met`` is None when there is no target.
    """

    figure: str
    flux: str
    peer: str
    ratio: str
    target: str
    met: bool | None


TABLE_HEADER = ("figure", "flux-async", "peer", "ratio", "target", "met?")


def _met_text(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a fixed-width text table (what the scripts print)."""
    cells = [TABLE_HEADER] + [
        (r.figure, r.flux, r.peer, r.ratio, r.target, _met_text(r.met)) for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(c) for c in cells[1:])])


def markdown_table(rows: Sequence[Row]) -> str:
    """Render rows as a GitHub-flavoured Markdown table (what the docs embed)."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in rows:
        values = (r.figure, r.flux, r.peer, r.ratio, r.target, _met_text(r.met))
        out.append("| " + " | ".join(esc(v) for v in values) + " |")
    return "\n".join(out)


def print_rows(title: str, rows: Sequence[Row]) -> None:
    print()
    print(f"== {title} ==")
    print(format_table(rows))


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_revision() -> str:
    """The checkout's commit, flagged when flux_async/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "flux_async"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown commit", ""
    tree = f"flux_async/ digest {code_digest()}"
    return f"{head} ({tree}{', with uncommitted changes' if dirty else ''})"


def code_digest() -> str:
    """A digest of flux_async/'s code itself, so an edit made while the benchmarks run
    shows up even when nothing is committed (and a commit of anything else does not)."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "flux_async").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def machine_info() -> dict[str, str]:
    """What the docs say about where the figures came from."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "aiohttp": aiohttp.__version__,
        "openai": _version("openai"),
    }


# -- process hygiene ---------------------------------------------------------------------

_LIVE: set[EmulatorProcess] = set()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into the same unwinding as Ctrl-C, so every `with` stops its emulator.
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_all() -> None:
    for emulator in list(_LIVE):
        emulator.stop()


atexit.register(_stop_all)


def run_main(main: Callable[[], int]) -> None:
    """Run a script's ``main``: SIGTERM unwinds like Ctrl-C, and Ctrl-C exits 130 cleanly."""
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _on_sigterm)
        # Started in the background by a script, SIGINT arrives ignored: listen anyway.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main()
    except KeyboardInterrupt:
        _stop_all()
        print("\ninterrupted; emulator stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


def _die_with_parent() -> None:
    # Linux: if this benchmark is SIGKILLed, the emulator gets SIGTERM instead of lingering.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


# -- the emulator in its own process -----------------------------------------------------


class EmulatorProcess:
    """``python -m flux_async.emulator --port 0 ARGS...`` as a context manager.

    Starts on ``__enter__`` (waits for its ``READY`` line), stops on every exit path
    (SIGTERM, then SIGKILL after a grace period), and reads ``/_emulator/stats``.

    Example::

        with EmulatorProcess("--latency", "0.1", "--no-record") as emu:
            print(emu.base_url, emu.stats()["successes"])
    """

    def __init__(self, *args: str, ready_timeout: float = 30.0) -> None:
        self.args = ["--port", "0", *args]
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        if self._base_url is None:
            raise RuntimeError("the emulator is not running")
        return self._base_url

    @property
    def root(self) -> str:
        """``http://127.0.0.1:PORT`` (where the control endpoints live)."""
        return self.base_url.removesuffix("/v1")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the emulator is not running")
        return self._proc.pid

    #: A server that exits when its stdin closes (so it dies with us) gets a pipe that is
    #: never written; others get /dev/null.
    stdin_pipe = False

    def command(self) -> list[str]:
        """The server's command line; subclasses start other servers the same way."""
        return [sys.executable, "-m", "flux_async.emulator", *self.args]

    def start(self) -> EmulatorProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        # Kept open for the process's life (closed in stop()), so no `with` here.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            # Its own session: a Ctrl-C reaches only us, and we stop it in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        _LIVE.add(self)
        try:
            line = self._read_ready_line()
        except BaseException:
            self.stop()
            raise
        self._base_url = line.split(maxsplit=1)[1].strip()
        return self

    def _read_ready_line(self) -> str:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        buffer = b""
        fd = proc.stdout.fileno()
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the emulator did not print READY in {self.ready_timeout}s")
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"the emulator exited early:\n{self._stderr_text()}")
                buffer += chunk
            elif proc.poll() is not None:
                raise RuntimeError(
                    f"the emulator exited with {proc.returncode}:\n{self._stderr_text()}"
                )
        line = buffer.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"unexpected first line from the emulator: {line!r}")
        return line

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return str(self._stderr.read().decode("utf-8", "replace"))[-4000:]

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Safe to call twice."""
        proc, self._proc = self._proc, None
        self._base_url = None
        _LIVE.discard(self)
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- control endpoints --

    def _get_json(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(self.root + path, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (requests, successes, rate_limited, ...)."""
        return self._get_json("/_emulator/stats")

    def request_log(self) -> list[tuple[float, str, int | None]]:
        """Every generation request seen: (server monotonic time, outcome, status)."""
        data = self._get_json("/_emulator/stats?requests=1")
        return [(float(t), str(outcome), status) for t, outcome, status in data["requests"]]

    def reset(self) -> None:
        """Zero the counters, the request log and the rate-limit state."""
        self._get_json("/_emulator/reset", method="POST")

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the emulator process has used so far (Linux only)."""
        if self._proc is None:
            return None
        try:
            text = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = text.rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the contenders ----------------------------------------------------------------------


def prompts(n: int) -> list[str]:
    return [f"bench prompt {i}: a lighthouse at dusk, oil on canvas" for i in range(n)]


def iter_prompts(n: int) -> Iterator[str]:
    """The same prompts as `prompts`, made one at a time (nothing held in a list)."""
    for i in range(n):
        yield f"bench prompt {i}: a lighthouse at dusk, oil on canvas"


@dataclass
class RunResult:
    """One contender's run: counts, wall time, and this process's CPU time."""

    contender: str
    n: int
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    cpu: float = 0.0
    server_cpu: float | None = None

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.n / self.wall if self.wall > 0 else float("nan")

    @property
    def busy(self) -> float:
        """Share of the wall time this process spent on the CPU (1.0: client-bound)."""
        return self.cpu / self.wall if self.wall > 0 else float("nan")

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu / self.n if self.n else float("nan")

    def summary(self) -> str:
        lost = f", FAILED {self.failed} {dict(self.errors)}" if self.failed else ""
        server = (
            f", emulator CPU {100 * self.server_cpu / self.wall:.0f}%"
            if self.server_cpu is not None and self.wall > 0
            else ""
        )
        return (
            f"{self.contender:<12} n={self.n:<6} wall={self.wall:7.3f}s  {self.rps:8.1f} req/s  "
            f"client CPU {self.cpu_us_per_request:6.0f} us/req (busy {100 * self.busy:3.0f}%)"
            f"{server}{lost}"
        )


class Contender(Protocol):
    async def __call__(
        self, base_url: str, items: Iterable[str], concurrency: int, result: RunResult
    ) -> None: ...


async def run_flux(
    base_url: str, items: Iterable[str], concurrency: int, result: RunResult
) -> None:
    """flux-async: ``gather_generate(prompts, concurrency=c)`` with every default."""
    async with FluxClient(
        base_url=base_url, api_key=API_KEY, max_connections=concurrency
    ) as client:
        results = await client.gather_generate(items, concurrency=concurrency)
        for r in results:
            if r.ok:
                result.ok += 1
            else:
                result.errors[type(r.error).__name__] += 1


async def run_raw(base_url: str, items: Iterable[str], concurrency: int, result: RunResult) -> None:
    """The hand-written baseline: one session, a semaphore, gather, json.loads."""
    url = base_url + "/images/generations"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str) -> None:
            body = {"prompt": prompt, "model": MODEL, "n": 1, "aspect_ratio": ASPECT_RATIO}
            async with semaphore:
                try:
                    async with session.post(url, json=body, headers=headers) as response:
                        raw = await response.read()
                        status = response.status
                except aiohttp.ClientError as exc:
                    result.errors[type(exc).__name__] += 1
                    return
            if status == 200 and "data" in json.loads(raw):
                result.ok += 1
            else:
                result.errors[f"HTTP {status}"] += 1

        await asyncio.gather(*(one(p) for p in items))


async def run_openai(
    base_url: str, items: Iterable[str], concurrency: int, result: RunResult
) -> None:
    """The openai package: ``AsyncOpenAI.images.generate`` under a semaphore."""
    # Imported here, not at the top: the memory benchmark's children must not pay for it.
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with semaphore:
            try:
                await client.images.generate(
                    model=MODEL, prompt=prompt, extra_body={"aspect_ratio": ASPECT_RATIO}
                )
            except openai.OpenAIError as exc:
                result.errors[type(exc).__name__] += 1
                return
        result.ok += 1

    try:
        await asyncio.gather(*(one(p) for p in items))
    finally:
        await client.close()


RUNNERS: dict[str, Contender] = {FLUX: run_flux, RAW: run_raw, OPENAI: run_openai}


def measure(
    contender: str,
    emulator: EmulatorProcess,
    n: int,
    concurrency: int,
    *,
    items: Iterable[str] | None = None,
) -> RunResult:
    """Run one contender over ``n`` prompts in a fresh event loop; time and count it."""
    runner = RUNNERS[contender]
    result = RunResult(contender, n)
    work = prompts(n) if items is None else items
    gc.collect()
    server_before = emulator.cpu_seconds()

    async def timed() -> None:
        cpu0, t0 = time.process_time(), time.perf_counter()
        await runner(emulator.base_url, work, concurrency, result)
        result.wall = time.perf_counter() - t0
        result.cpu = time.process_time() - cpu0

    asyncio.run(timed())
    server_after = emulator.cpu_seconds()
    if server_before is not None and server_after is not None:
        result.server_cpu = server_after - server_before
    return result


def interleaved_rounds(
    contenders: Sequence[str],
    rounds: int,
    run_one: Callable[[str], RunResult],
    *,
    warmup: Callable[[str], RunResult] | None = None,
    rounds_for: dict[str, int] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[RunResult]]:
    """Warm every contender up once, then run ``rounds`` rounds of all of them in turn.

    The order rotates each round, so no contender always runs right after the same
    neighbour (connection teardown, GC and CPU frequency leave traces on the next run).
    ``rounds_for`` lets a slow contender sit out the later rounds.
    """
    limits = rounds_for or {}
    if warmup is not None:
        for name in contenders:
            r = warmup(name)
            log(f"  warm-up   {r.summary()}")
    out: dict[str, list[RunResult]] = {name: [] for name in contenders}
    order = list(contenders)
    for i in range(rounds):
        for name in order:
            if i >= limits.get(name, rounds):
                continue
            r = run_one(name)
            out[name].append(r)
            log(f"  round {i + 1}/{rounds} {r.summary()}")
        order = order[1:] + order[:1]
    return out


def callgrind_counts(
    script_and_arguments: Sequence[str], *, branch_sim: bool = False
) -> dict[str, int]:
    """Run ``python SCRIPT ARGUMENTS...`` under valgrind's callgrind; the events it counted
    (``Ir``, the instructions; with ``branch_sim`` also ``Bc``/``Bcm``/``Bi``/``Bim``,
    branches and their mispredictions). Only that process is counted, not its children.

    Example::

        callgrind_counts([__file__, "--child", "flux", "500", url])["Ir"]
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError(
            "counting instructions needs valgrind on the PATH (Debian: apt install valgrind)"
        )
    command = [
        valgrind,
        "--tool=callgrind",
        *(["--branch-sim=yes"] if branch_sim else []),
        "--callgrind-out-file=/dev/null",
        sys.executable,  # the interpreter itself, not a wrapper script
        *script_and_arguments,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    events = re.search(r"Events\s*:\s*(.+)", done.stderr)
    found = re.search(r"Collected\s*:\s*(.+)", done.stderr)
    if done.returncode != 0 or events is None or found is None:
        raise RuntimeError(f"callgrind run failed:\n{done.stderr[-2000:]}")
    return dict(zip(events.group(1).split(), map(int, found.group(1).split()), strict=True))


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}x"


@dataclass
class BenchOutput:
    """What one benchmark hands to `run_all`: table rows and a few notes for the docs."""

    title: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        print_rows(self.title, self.rows)
        for note in self.notes:
            print(f"  note: {note}")
