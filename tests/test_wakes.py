"""`Wakes`: a round of writes' awaiters woken a few per turn of the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
