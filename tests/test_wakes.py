"""`Wakes`: a round of writes' awaiters woken a few per turn of the event loop."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import random
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flux_async import FluxClient
from flux_async._files import find_syncfs
from flux_async._save import ImageJob, ImageWriter
from flux_async._wakes import WAKES_PER_TURN, Wakes
from flux_async._writer_process import ProcessWriter, can_start

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


async def one_turn() -> None:
    """Let the event loop run the callbacks scheduled so far, once."""
    await asyncio.sleep(0)


async def test_a_round_is_woken_a_few_per_turn_in_the_order_handed_over() -> None:
    loop = asyncio.get_running_loop()
    wakes = Wakes(loop)
    futures = [loop.create_future() for _ in range(2 * WAKES_PER_TURN + 3)]
    for number, future in enumerate(futures):
        wakes.add(future, f"out/{number:06d}.png")

    wakes.wake()
    done_per_turn = [sum(f.done() for f in futures)]
    while done_per_turn[-1] < len(futures):
        await one_turn()
        done_per_turn.append(sum(f.done() for f in futures))

    assert done_per_turn == [WAKES_PER_TURN, 2 * WAKES_PER_TURN, len(futures)]
    assert [f.result() for f in futures] == [f"out/{n:06d}.png" for n in range(len(futures))]


async def test_errors_are_given_as_exceptions_and_a_cancelled_awaiter_is_skipped() -> None:
    loop = asyncio.get_running_loop()
    wakes = Wakes(loop)
    cancelled, failed, written = (loop.create_future() for _ in range(3))
    cancelled.cancel()
    wakes.add(cancelled, "out/a.png")
    wakes.add(failed, OSError(28, "No space left on device"))
    wakes.add(written, "out/c.png")

    wakes.wake()

    assert cancelled.cancelled()
    with pytest.raises(OSError, match="No space left"):
        failed.result()
    assert written.result() == "out/c.png"


async def test_outcomes_added_while_turns_are_scheduled_wait_their_turn() -> None:
    loop = asyncio.get_running_loop()
    wakes = Wakes(loop)
    first = [loop.create_future() for _ in range(WAKES_PER_TURN + 1)]
    for future in first:
        wakes.add(future, "x")
    wakes.wake()
    late = loop.create_future()
    wakes.add(late, "late")
    wakes.wake()  # the next turn is already scheduled: it wakes nothing more now

    assert sum(f.done() for f in first) == WAKES_PER_TURN
    assert not late.done()
    await one_turn()
    assert all(f.done() for f in first)
    assert late.result() == "late"


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_a_writers_round_wakes_its_awaiters_a_few_per_turn(tmp_path: Path, kind: str) -> None:
    """Images handed over in one turn are written as one round and answered together;
    their awaiters are still woken at most `WAKES_PER_TURN` per turn (a done callback runs
    in the turn after its future's, so the first one sees the first turn's count)."""
    writer: ProcessWriter | ImageWriter
    if kind == "process":
        if not can_start():
            pytest.skip("no writer process here")
        writer = ProcessWriter()
        assert await writer.ready()
    else:
        writer = ImageWriter(find_syncfs())
        # One executor thread, held until every image is handed over: they make one round.
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        gate = threading.Event()
        held = loop.run_in_executor(None, gate.wait)
    count = 3 * WAKES_PER_TURN
    try:
        futures = [
            writer.write(ImageJob(str(tmp_path), f"{i:06d}", PNG, None, None, 10**6))
            for i in range(count)
        ]
        if kind == "thread":
            gate.set()
            await held
        seen: list[int] = []
        for future in futures:
            future.add_done_callback(lambda _: seen.append(sum(f.done() for f in futures)))
        paths = await asyncio.gather(*futures)
    finally:
        if isinstance(writer, ProcessWriter):
            await writer.aclose()
    assert paths == [str(tmp_path / f"{i:06d}.png") for i in range(count)]
    assert all((tmp_path / f"{i:06d}.png").read_bytes() == PNG for i in range(count))
    assert seen[0] <= WAKES_PER_TURN


#: `_FastAnswers`'s answer: one 18 KB ``b64_json`` image.
_B64_BODY = json.dumps(
    {
        "created": 1,
        "data": [
            {"b64_json": base64.b64encode(PNG[:8] + random.Random(0).randbytes(18_000)).decode()}
        ],
    }
).encode()
_B64_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(_B64_BODY)
    + _B64_BODY
)


class _FastAnswers(asyncio.Protocol):
    """Keep-alive HTTP/1.1 answering every request at once with `_B64_ANSWER`: a server
    faster than the client, in its event loop. Not `FaultServer`: the objects it makes
    per request are counted by the same collector, and beside them the test's margins
    shrank (young collections 19-21 woken four per turn, 35-50 woken eight, against 22
    with saving off) and it took half as long again."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(_B64_ANSWER)


async def _young_collections(prompts: int, save_to: Path | None) -> int:
    """Young collections during a fan-out of ``prompts`` against `_FastAnswers`."""
    server = await asyncio.get_running_loop().create_server(_FastAnswers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    young = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal young
        young += phase == "start" and info["generation"] == 0

    async with server, FluxClient(base_url=f"http://127.0.0.1:{port}/v1") as client:
        gc.collect()
        gc.callbacks.append(count)
        try:
            done = [
                r.ok
                async for r in client.iter_generate(
                    [f"p{i}" for i in range(prompts)], concurrency=64, save_to=save_to
                )
            ]
        finally:
            gc.callbacks.remove(count)
    assert done == [True] * prompts
    return young


def test_saving_does_not_make_the_collector_run_more_often() -> None:
    """A worker's wake from its save makes more objects the collector counts than it frees
    (its next request's): woken eight per turn, a fan-out of 2,000 prompts saving its
    images to tmpfs made up to 33 young collections here against 11 with saving off (each
    promoting every prompt's objects still waiting for a file, and the promoted ones
    bringing full collections); woken `WAKES_PER_TURN` (4) per turn, 6-14. On a plain
    event loop, as a user's: the suite's (looptime's subclass) makes objects of its own
    every turn."""
    if not gc.isenabled():
        pytest.skip("the collector is disabled")

    memory = Path("/dev/shm")
    if not memory.is_dir():
        pytest.skip("no memory-backed directory here")
    scratch = Path(tempfile.mkdtemp(dir=memory, prefix="flux-test-wakes-"))

    async def measure() -> tuple[int, list[int]]:
        await _young_collections(200, scratch / "warm-up")
        off = await _young_collections(2000, None)
        # Three times: how a round's answers fall into turns varies, and eight a turn
        # stayed near saving off's count in about one fan-out in three.
        return off, [await _young_collections(2000, scratch / f"run{i}") for i in range(3)]

    try:
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            off, saving = runner.run(measure())
        assert [len(list((scratch / f"run{i}").iterdir())) for i in range(3)] == [2000] * 3
    finally:
        shutil.rmtree(scratch)
    assert max(saving) <= off + off // 2 + 5, (saving, off)
