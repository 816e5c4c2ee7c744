"""Tests for flux_async.redis against a real redis-server (no mock, no fakeredis).

A fixture starts ``redis-server`` on a free port in a temporary directory, with a
password, so every test also checks that the password never shows. Without
``redis-server`` on PATH (or the ``redis`` package) these tests skip, unless
``FLUX_REQUIRE_REDIS=1`` (CI sets it), which makes them fail instead.

Several processes are real OS processes: `WORKER` below, run with ``python -c``. All of
them log ``time.monotonic()``, which on Linux is one clock for every process on the
machine, so their timestamps can be merged; a worker with a skewed clock patches
``time.monotonic`` and ``time.time`` after saving the real one for its log.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flux_async import FluxClient, RetryPolicy, ValidationError
from flux_async.emulator import Emulator

from .conftest import API_KEY

if TYPE_CHECKING:
    import redis.asyncio

    from flux_async.redis import RedisRateLimiter

PASSWORD = "s3cret-pw"
REQUIRE = os.environ.get("FLUX_REQUIRE_REDIS") == "1"
HOW = (
    "install redis-server (apt-get install redis-server, brew install redis) and "
    "pip install 'flux-async[redis]' to run them; CI sets FLUX_REQUIRE_REDIS=1"
)


def _missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH"
    try:
        importlib.import_module("redis")
    except ImportError:
        return "the redis package is not installed"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None and not REQUIRE, reason=f"Redis tests skipped: {MISSING}; {HOW}"
)


@pytest.fixture(autouse=True, scope="module")
def _require_redis() -> None:
    """Fail (never skip) every test when FLUX_REQUIRE_REDIS=1 and Redis is missing."""
    if MISSING is not None:
        pytest.fail(f"FLUX_REQUIRE_REDIS=1 but {MISSING}")


def _limiter_class() -> type[RedisRateLimiter]:
    # Imported here, not at the top: tests/test_exported_members.py checks that the
    # top-level package has no unexpected attributes, and importing the subpackage adds
    # `flux_async.redis` to it.
    module = importlib.import_module("flux_async.redis")
    cls: type[RedisRateLimiter] = module.RedisRateLimiter
    return cls


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``redis-server`` on a free port, no persistence, with a password."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # the server's readiness is only visible on its socket
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
                if b"PONG" in sock.recv(100) or b"PONG" in sock.recv(100):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the module; each test uses names of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of its own, for a test that stops and restarts it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def busiest_window(times: list[float], width: float = 1.0) -> int:
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width, lo=i) - i for i, t in enumerate(ordered)),
        default=0,
    )


def aggregate_rate(times: list[float]) -> float:
    ordered = sorted(times)
    return (len(ordered) - 1) / (ordered[-1] - ordered[0])


# -- worker processes ------------------------------------------------------------------

WORKER = r"""
import asyncio, json, sys, time

cfg = json.loads(sys.argv[1])
real_monotonic = time.monotonic
if cfg.get("skew"):
    skew, real_time = cfg["skew"], time.time
    time.monotonic = lambda: real_monotonic() + skew
    time.time = lambda: real_time() + skew

import redis.asyncio
from flux_async.redis import RedisRateLimiter


async def main():
    client = redis.asyncio.Redis.from_url(cfg["url"])
    await client.ping()
    limiter = RedisRateLimiter(client, name=cfg["name"], **cfg.get("options", {}))
    print("READY", flush=True)
    sys.stdin.readline()  # GO
    times = []
    if cfg["mode"] == "rate":
        start = real_monotonic()
        deadline = start + cfg["duration"]

        async def one():
            while real_monotonic() < deadline:
                await limiter.acquire()
                times.append(real_monotonic())
                limiter.on_success()

        async def pause():
            await asyncio.sleep(cfg["pause_at"])
            times.append(-real_monotonic())  # logged as a negative time: when it paused
            limiter.on_rate_limited(cfg["pause_for"])

        jobs = [one() for _ in range(cfg.get("tasks", 4))]
        if cfg.get("pause_at") is not None:
            jobs.append(pause())
        await asyncio.gather(*jobs)
    else:  # hold: take in-flight slots and keep them until killed
        held = asyncio.Event()
        count = 0

        async def hold():
            nonlocal count
            await limiter.acquire()
            count += 1
            if count == cfg["hold"]:
                held.set()
            await asyncio.Event().wait()

        tasks = [asyncio.ensure_future(hold()) for _ in range(cfg["hold"])]
        await held.wait()
        print("HELD", flush=True)
        await asyncio.gather(*tasks)
    await limiter.aclose()
    await client.aclose()
    print(json.dumps(times), flush=True)


asyncio.run(main())
"""


class Workers:
    """Worker processes: started together, told to go together, their logs collected."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *configs: dict[str, Any]) -> None:
        for cfg in configs:
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    WORKER,
                    json.dumps(cfg),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.startswith(b"READY"), line

    async def go(self) -> float:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
            await proc.stdin.drain()
        return time.monotonic()

    async def line(self, i: int) -> bytes:
        stdout = self.procs[i].stdout
        assert stdout is not None
        return await asyncio.wait_for(stdout.readline(), 60)

    async def logs(self) -> list[list[float]]:
        logs = []
        for i, proc in enumerate(self.procs):
            logs.append(json.loads(await self.line(i)))
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        return logs

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    w = Workers()
    yield w
    w.kill_all()
    for proc in w.procs:
        await proc.wait()


# -- the package -----------------------------------------------------------------------


def test_import_flux_async_does_not_import_redis() -> None:
    code = "import sys, flux_async; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_are_documented_with_an_example() -> None:
    module = importlib.import_module("flux_async.redis")
    assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj):
            assert obj.__doc__
            assert "Example" in obj.__doc__, name
    cls = module.RedisRateLimiter
    for method in (cls.from_url, cls.aclose):
        assert method.__doc__
        assert "Example" in method.__doc__


@pytest.mark.parametrize(
    ("field", "options"),
    [
        ("name", {"name": ""}),
        ("rate", {"rate": 0}),
        ("per", {"rate": 1, "per": -1}),
        ("burst", {"burst": 0}),
        ("max_in_flight", {"max_in_flight": 0}),
        ("lease", {"lease": 0}),
        ("key_ttl", {"lease": 20, "key_ttl": 10}),
        ("on_redis_error", {"on_redis_error": "ignore"}),
        ("local_share", {"on_redis_error": "local"}),
        ("local_share", {"on_redis_error": "local", "local_share": 1.5}),
        ("local_share", {"local_share": 0.5}),
        ("prefix", {"prefix": "a{b}"}),
        ("decrease_factor", {"decrease_factor": 1.5}),
        ("url", {"url": "http://example.com"}),
    ],
)
def test_bad_settings_name_the_field(field: str, options: dict[str, Any]) -> None:
    options = {"name": "x", **options}
    url = options.pop("url", "redis://localhost:6379/0")
    with pytest.raises(ValidationError) as info:
        _limiter_class().from_url(url, **options)
    assert info.value.field == field


async def test_keys_are_hash_tagged_and_never_hold_the_name(
    redis_server: RedisServer, admin: redis.asyncio.Redis
) -> None:
    secret_name = f"sk-live-{uuid.uuid4().hex}"
    limiter = _limiter_class().from_url(
        redis_server.url, name=secret_name, rate=100, max_in_flight=2
    )
    assert PASSWORD not in repr(limiter)
    assert PASSWORD not in str(limiter.settings)
    async with limiter:
        await limiter.acquire()  # stays in flight until aclose()
        state, leases = limiter.keys
        tags = {key.split("{")[1].split("}")[0] for key in limiter.keys}
        assert len(tags) == 1  # one Redis Cluster slot
        assert state.startswith("flux-async:{")
        assert leases.startswith("flux-async:{")
        stored = await admin.keys("flux-async:*")
        assert {k.decode() for k in stored} == {state, leases}
        values = await admin.hgetall(state)
        everything = repr((stored, values, await admin.zrange(leases, 0, -1)))
        assert secret_name not in everything
        assert secret_name[:12] not in everything
        assert await admin.ttl(state) > 0
        assert await admin.ttl(leases) > 0
    assert await admin.zcard(leases) == 0  # aclose() gave the slot back


# -- many processes --------------------------------------------------------------------


async def test_four_processes_share_one_rate(
    redis_server: RedisServer, name: str, workers: Workers
) -> None:
    rate, duration = 200.0, 2.0
    cfg = {"url": redis_server.url, "name": name, "options": {"rate": rate}, "mode": "rate"}
    await workers.start(*[{**cfg, "duration": duration} for _ in range(4)])
    await workers.go()
    logs = await workers.logs()
    times = [t for log in logs for t in log]
    assert all(len(log) > rate * duration / 4 * 0.5 for log in logs)  # everyone took part
    assert aggregate_rate(times) == pytest.approx(rate, rel=0.04)
    assert busiest_window(times) <= rate * 1.04 + 1


async def test_pause_gate_crosses_processes(
    redis_server: RedisServer, name: str, workers: Workers
) -> None:
    rate, pause_for = 50.0, 1.2
    await workers.start(
        {
            "url": redis_server.url,
            "name": name,
            "options": {"rate": rate},
            "mode": "rate",
            "duration": 2.8,
        }
    )
    limiter = _limiter_class().from_url(redis_server.url, name=name, rate=rate)
    async with limiter:
        await workers.go()
        await asyncio.sleep(0.8)  # let the worker send for a while first
        await limiter.acquire()  # this process takes part, then gets a 429
        paused_at = time.monotonic()
        limiter.on_rate_limited(pause_for)  # longer than a window: pauses everyone
        assert limiter.statistics().paused_for > 1.0
        (times,) = await workers.logs()
    before = [t for t in times if t < paused_at]
    during = [t for t in times if paused_at + 0.3 < t < paused_at + pause_for - 0.05]
    after = [t for t in times if t >= paused_at + pause_for - 0.05]
    # Slots booked before the pause (at most the horizon, 0.25 s) may still go.
    assert len(before) > 20
    assert during == []
    assert len(after) > 20
    assert min(after) < paused_at + pause_for + 0.5  # resumed when the pause ended


async def test_skewed_client_clocks_change_nothing(
    redis_server: RedisServer, name: str, workers: Workers
) -> None:
    rate, duration, pause_for = 100.0, 2.6, 1.1
    cfg = {"url": redis_server.url, "name": name, "options": {"rate": rate}, "mode": "rate"}
    await workers.start(
        # One clock an hour ahead, one an hour behind; the second pauses everyone at 1 s.
        {**cfg, "duration": duration, "skew": 3600.0},
        {**cfg, "duration": duration, "skew": -3600.0, "pause_at": 1.0, "pause_for": pause_for},
    )
    await workers.go()
    ahead, behind = await workers.logs()
    paused_at = -min(behind)
    times = [t for t in ahead + behind if t > 0]
    before = [t for t in times if t < paused_at]
    after = [t for t in times if t >= paused_at + pause_for - 0.05]
    assert aggregate_rate(before) == pytest.approx(rate, rel=0.05)
    # The lone 429 that paused everyone cut the rate once, by PAUSE_DECREASE_FACTOR (0.75),
    # as such a 429 does; nobody cut it over the pause: the clock ahead slept through it
    # and heard of the 429 only afterwards, yet knew when the gate had opened (a
    # regression: it used to measure its send rate across the pause and cut the shared
    # rate to a quarter).
    assert aggregate_rate(after) == pytest.approx(0.75 * rate, rel=0.08)
    assert busiest_window(times) <= rate * 1.05 + 1
    # The pause from the clock an hour behind held the clock an hour ahead for its length.
    assert not [t for t in ahead if paused_at + 0.3 < t < paused_at + pause_for - 0.05]
    assert min(t for t in ahead if t > paused_at) < paused_at + pause_for + 0.5


async def test_a_lease_outlives_a_killed_process_only_until_it_expires(
    redis_server: RedisServer, name: str, workers: Workers
) -> None:
    lease = 0.6
    options = {"max_in_flight": 2, "lease": lease}
    await workers.start(
        {"url": redis_server.url, "name": name, "options": options, "mode": "hold", "hold": 2}
    )
    await workers.go()
    assert await workers.line(0) == b"HELD\n"
    limiter = _limiter_class().from_url(redis_server.url, name=name, **options)
    async with limiter:
        # Both slots stay taken for longer than a lease: the live worker renews them.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limiter.acquire(), 2 * lease)
        workers.procs[0].send_signal(signal.SIGKILL)
        await workers.procs[0].wait()
        killed = time.monotonic()
        async with asyncio.timeout(5):
            await limiter.acquire()
        assert time.monotonic() - killed < lease + 0.5  # no longer than the lease (+ poll)
        assert limiter.statistics().in_flight == 1


async def test_in_flight_slots_are_given_back(redis_server: RedisServer, name: str) -> None:
    limiter = _limiter_class().from_url(redis_server.url, name=name, max_in_flight=1)
    order: list[str] = []
    first_in = asyncio.Event()
    report = asyncio.Event()

    async def reporting() -> None:
        await limiter.acquire()
        order.append("a")
        first_in.set()
        await report.wait()
        limiter.on_success()  # gives the slot back
        await asyncio.sleep(3600)  # the task lives on: the report alone freed the slot

    async def silent() -> None:
        await limiter.acquire()
        order.append("b")  # ends without a report: the task's end frees the slot

    async def last() -> None:
        await limiter.acquire()
        order.append("c")

    async with limiter:
        a = asyncio.ensure_future(reporting())
        await first_in.wait()
        b = asyncio.ensure_future(silent())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(b), 0.2)
        report.set()
        await asyncio.wait_for(b, 5)
        await asyncio.wait_for(last(), 5)
        assert order == ["a", "b", "c"]
        a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a


# -- Redis failing ---------------------------------------------------------------------


async def _prompts_through(limiter: RedisRateLimiter, emulator: Emulator, n: int) -> list[Any]:
    async with FluxClient(
        api_key=API_KEY, base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as client:
        return await client.gather_generate([f"p{i}" for i in range(n)], limiter=limiter)


async def test_redis_restarted_with_on_redis_error_fail(
    own_server: RedisServer, name: str, emulator: Emulator
) -> None:
    from flux_async.redis import RedisLimiterError

    limiter = _limiter_class().from_url(own_server.url, name=name, rate=1)
    async with limiter:
        await limiter.acquire()
        waiting = [asyncio.ensure_future(limiter.acquire()) for _ in range(4)]
        await asyncio.sleep(0.1)  # they queue: one permit a second, none within reach
        own_server.stop()
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)
        assert all(isinstance(r, RedisLimiterError) for r in results), results
        error = results[-1]
        assert isinstance(error, RedisLimiterError)
        assert error.url == f"redis://127.0.0.1:{own_server.port}/0"
        assert error.url in str(error)
        assert PASSWORD not in str(error)
        # A batch sent while Redis is down: every prompt ends with the error, none lost.
        batch = await _prompts_through(limiter, emulator, 3)
        assert [type(r.error) for r in batch] == [RedisLimiterError] * 3
        assert emulator.stats.snapshot()["requests"] == 0
        own_server.start()
        await asyncio.wait_for(limiter.acquire(), 5)  # shared again, on a fresh state
        assert limiter.statistics().mode == "shared"


async def test_redis_restarted_with_on_redis_error_local(
    own_server: RedisServer, name: str, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_async.redis")
    limiter = _limiter_class().from_url(
        own_server.url, name=name, rate=40, on_redis_error="local", local_share=0.5
    )
    async with limiter:
        await limiter.acquire()
        own_server.stop()
        batch = await _prompts_through(limiter, emulator, 6)
        assert all(r.ok for r in batch)
        stats = limiter.statistics()
        assert stats.mode == "local"
        assert stats.rate == 20.0
        assert stats.fallbacks == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once, not once per permit
        assert "local_share=0.5" in warnings[0].getMessage()
        assert PASSWORD not in caplog.text
        own_server.start()
        deadline = time.monotonic() + 10
        while limiter.statistics().mode != "shared":  # the background ping's backoff
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert all(r.ok for r in await _prompts_through(limiter, emulator, 4))
        assert limiter.statistics().fallbacks == 1


async def test_lua_scripts_are_reloaded_after_script_flush(
    redis_server: RedisServer, name: str, admin: redis.asyncio.Redis
) -> None:
    limiter = _limiter_class().from_url(redis_server.url, name=name, rate=1000)
    async with limiter:
        await limiter.acquire()
        await admin.script_flush()
        await limiter.acquire()
        limiter.on_rate_limited(5.0)  # the feedback script, loaded again too
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limiter.acquire(), 0.3)  # shut: the pause went through
        assert limiter.statistics().redis_errors == 0


# -- the shared adaptive rate ----------------------------------------------------------


async def test_cuts_from_several_processes_apply_once_per_window(
    redis_server: RedisServer, name: str
) -> None:
    cls = _limiter_class()
    a = cls.from_url(redis_server.url, name=name, rate=200, burst=20, tolerance=0)
    b = cls.from_url(redis_server.url, name=name, rate=200, burst=20, tolerance=0)
    async with a, b:
        for _ in range(10):
            await a.acquire()
            await b.acquire()
        a.on_rate_limited(None)  # each controller sees overload and proposes a cut
        b.on_rate_limited(None)
        deadline = time.monotonic() + 5
        while a.statistics().cuts + b.statistics().cuts < 2:  # both answers are in
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await a.acquire()
        await b.acquire()
        sa, sb = a.statistics(), b.statistics()
        assert sa.cuts == sb.cuts == 1  # two proposals, one cut
        assert sa.rate == sb.rate
        assert sa.rate is not None
        assert sa.rate < 200


async def test_acl_user_limited_to_the_documented_commands(
    redis_server: RedisServer, name: str, admin: redis.asyncio.Redis
) -> None:
    # The ACL rule in docs/guides/many-processes.md, word for word.
    user = f"flux-{uuid.uuid4().hex[:6]}"
    rule = (
        "+evalsha +script|load +zrem +ping +time +hmget +hset +pexpire +zremrangebyscore "
        "+zcard +zrange +zadd"
    )
    await admin.acl_setuser(
        user, enabled=True, passwords=["+pw"], keys=["flux-async:*"], commands=rule.split()
    )
    url = f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"
    limiter = _limiter_class().from_url(url, name=name, rate=1000, max_in_flight=4)
    async with limiter:
        for _ in range(3):
            await limiter.acquire()
            limiter.on_success()
        limiter.on_rate_limited(2.0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limiter.acquire(), 0.3)
        assert limiter.statistics().redis_errors == 0


def test_batch_command_shares_its_quota_through_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`flux-async batch --redis URL --limiter-name NAME` paces through the shared limiter."""
    import redis as sync_redis
    from click.testing import CliRunner

    from flux_async._cli import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a fox, take {i}\n" for i in range(12)))
    name = f"cli-{uuid.uuid4().hex}"
    result = CliRunner().invoke(
        cli,
        [
            "batch", str(prompts), "--out", str(tmp_path / "run"), "--emulator",
            "--redis", redis_server.url, "--limiter-name", name, "--rate-limit", "40",
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()
    # A url image's prompt gets a "generated" line before its "ok" one.
    done = [json.loads(line) for line in lines if json.loads(line)["status"] == "ok"]
    assert sorted(record["index"] for record in done) == list(range(12))
    state_key = _limiter_class().from_url(redis_server.url, name=name).keys[0]
    admin = sync_redis.Redis.from_url(redis_server.url)
    try:
        assert admin.hgetall(state_key), "this name's shared state is in Redis"
    finally:
        admin.close()
