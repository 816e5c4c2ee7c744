"""`SyncFluxClient`: the async client run on a private loop in a thread, for plain scripts.

These tests are plain functions (no running loop in the test's thread, as in a script);
the emulator runs on a loop of its own in another thread.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flux_async import (
    AuthenticationError,
    ClientClosedError,
    EventLoopError,
    FluxClient,
    FluxError,
    MockTransport,
    RetryPolicy,
    SyncFluxClient,
    TransportRequest,
    TransportResponse,
    ValidationError,
)
from flux_async._sync import _LoopThread
from flux_async.emulator import Emulator
from flux_async.testing import FLUX_TEST_KEY, FluxMock

THREAD = "flux-async-sync"


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


@pytest.fixture
def server() -> Iterator[Emulator]:
    """An emulator on a loop in a thread of its own, as a server in another process is."""
    loop = _LoopThread()
    emulator = Emulator(api_keys=[FLUX_TEST_KEY])
    loop.run(emulator.start())
    try:
        yield emulator
    finally:
        loop.run(emulator.close())
        loop.stop()


def _client(server: Emulator, **options: object) -> SyncFluxClient:
    return SyncFluxClient(
        api_key=FLUX_TEST_KEY, base_url=server.base_url, retry=RetryPolicy.for_tests(), **options
    )


def test_generate_and_gather_over_real_sockets(server: Emulator) -> None:
    """Blocking calls return what the async client returns; closing stops the thread."""
    before = len(_sync_threads())
    with _client(server) as client:
        assert len(_sync_threads()) == before + 1
        response = client.generate("a fox", n=2, input_images=["https://h/fox.png"])
        assert len(response.urls) == 2
        assert response.data[0].revised_prompt == "a fox"
        results = client.gather_generate(["a", {"prompt": "b", "n": 2}, "c"], concurrency=2)
        assert [len(r.unwrap().data) for r in results] == [1, 2, 1]
        assert client.build_request("x", {"n": 3}).n == 3
    assert client.closed
    assert "closed" in repr(client)
    assert len(_sync_threads()) == before
    assert server.stats.successes == 4
    gc.collect()  # any unclosed session or loop would warn here (warnings are errors)


def test_errors_reach_the_caller(server: Emulator) -> None:
    """A bad field raises before anything is sent; a server's refusal is the same error
    type as from the async client; a closed client refuses calls."""
    with SyncFluxClient(base_url=server.base_url, api_key="sk-wrong") as client:
        with pytest.raises(ValidationError, match="aspect_ratio"):
            client.generate("x", aspect_ratio="5:4")
        with pytest.raises(AuthenticationError):
            client.generate("x")
    with pytest.raises(ClientClosedError):
        client.generate("x")
    with pytest.raises(ClientClosedError), client:
        pass
    client.close()  # twice is fine
    with pytest.raises(ValidationError, match="base_url"):
        SyncFluxClient(base_url="ftp://nowhere")


def test_refuses_to_run_inside_an_event_loop() -> None:
    """In async code it would stall the loop: an EventLoopError (a FluxError and a
    RuntimeError, as asyncio.run's own refusal) pointing to FluxClient."""
    mock = FluxMock()
    client = SyncFluxClient(transport=mock.transport)

    async def inside() -> None:
        with pytest.raises(EventLoopError, match=r"use the async client.*FluxClient") as info:
            SyncFluxClient(transport=mock.transport)
        assert isinstance(info.value, FluxError)
        assert isinstance(info.value, RuntimeError)
        with pytest.raises(FluxError, match="cannot be used inside a running event loop"):
            client.generate("x")

    try:
        asyncio.run(inside())
        assert mock.requests == []
        assert client.generate("x").urls  # fine again outside the loop
    finally:
        client.close()


def test_an_unclosed_client_is_closed_when_collected() -> None:
    """A script that forgets close() leaves no thread and no warning behind."""
    before = len(_sync_threads())
    client = SyncFluxClient(transport=FluxMock().transport)
    client.generate("x")
    del client
    gc.collect()
    assert len(_sync_threads()) == before


def test_calls_from_several_threads_share_one_client(server: Emulator) -> None:
    """Threads may call at once: their calls run concurrently on the client's loop."""
    with _client(server) as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: client.generate(f"p{i}"), range(8)))
    assert all(r.urls for r in responses)
    assert server.stats.successes == 8


def _hanging_transport() -> tuple[MockTransport, threading.Event, threading.Event]:
    """A transport whose calls hang (the prompt "after" answers at once), and the events
    set when a call starts hanging and when it is cancelled."""
    started = threading.Event()
    cancelled = threading.Event()

    async def hang(request: TransportRequest) -> TransportResponse:
        if request.json()["prompt"] != "after":
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return TransportResponse(200, json={"created": 1, "data": [{"url": "u"}]})

    return MockTransport(hang), started, cancelled


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_ctrl_c_cancels_the_call() -> None:
    """KeyboardInterrupt while waiting cancels the call in the client's loop before it
    reaches the caller: nothing keeps running behind its back."""
    assert threading.current_thread() is threading.main_thread()
    hang, started, cancelled = _hanging_transport()

    def interrupt() -> None:
        # Only once the call is surely waiting: a stray SIGINT would stop the test run.
        if started.wait(10):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # Python's own Ctrl-C handler, whatever the runner left: a shell that starts the test
    # run in the background has it inherit SIGINT ignored, and the call would then run on.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with SyncFluxClient(transport=hang) as client:
            killer = threading.Thread(target=interrupt)
            killer.start()
            with pytest.raises(KeyboardInterrupt):
                client.generate("x")
            killer.join()
            assert cancelled.is_set()
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("when", ["scheduled", "started"])
def test_ctrl_c_the_moment_a_call_is_handed_over_still_cancels_it(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Ctrl-C can land between handing the call to the client's loop and waiting for it
    (a signal is raised at any bytecode of the main thread): the call is cancelled all
    the same, whether it has started there or not. Simulated here by raising it right
    after the hand-over, once the call has begun or before it may."""
    hang, started, cancelled = _hanging_transport()

    import flux_async._sync as sync_module

    real = asyncio.run_coroutine_threadsafe
    gate = threading.Event()
    handed: list[Any] = []

    def hand_over(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        if handed:  # the interrupted call now waits for it to unwind: that is real
            gate.set()  # ("scheduled": the interrupt has been seen, the loop may go on)
            return real(coro, loop)
        handed.append(coro)
        if when == "scheduled":
            # The loop is held until the interrupt has landed: the call has not begun.
            loop.call_soon_threadsafe(gate.wait, 10)
        real(coro, loop)
        if when == "started":
            assert started.wait(10)
        raise KeyboardInterrupt

    with SyncFluxClient(transport=hang) as client:
        monkeypatch.setattr(sync_module.asyncio, "run_coroutine_threadsafe", hand_over)
        try:
            with pytest.raises(KeyboardInterrupt):
                client.generate("x")
        finally:
            monkeypatch.setattr(sync_module.asyncio, "run_coroutine_threadsafe", real)
            gate.set()
        # A call made afterwards runs after whatever the loop had queued before it.
        assert client.generate("after").data[0].url == "u"
        if when == "started":
            assert cancelled.is_set()
        else:
            assert not started.is_set()  # it never began


def test_save_writes_the_images(server: Emulator, tmp_path: Path) -> None:
    """save() downloads through the client (the emulator serves its image URLs)."""
    with _client(server) as client:
        response = client.generate("a fox", n=2)
        paths = client.save(response, tmp_path, stem="fox")
        one = client.save(response.data[0], tmp_path / "best")
    assert [p.name for p in paths] == ["fox-0.png", "fox-1.png"]
    assert one.name == "best.png"
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in [*paths, one])


@pytest.mark.parametrize("name", ["generate", "gather_generate", "save", "build_request"])
def test_the_blocking_methods_take_the_async_ones_arguments(name: str) -> None:
    """Each method has the async client's parameters, defaults included: one added there
    and not here fails this test."""

    def parameters(function: object) -> list[tuple[str, object, object]]:
        signature = inspect.signature(function)  # type: ignore[arg-type]
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    assert parameters(getattr(SyncFluxClient, name)) == parameters(getattr(FluxClient, name))


def test_the_quickstart_example_runs(server: Emulator) -> None:
    """The quickstart's plain-script example is real code: run it against the emulator."""
    guide = (Path(__file__).parent.parent / "docs" / "quickstart.md").read_text("utf-8")
    section = guide.split("## Plain scripts", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'api_key="sk-..."' in code
    assert 'base_url="https://gateway.example/v1"' in code
    code = code.replace('"sk-..."', repr(FLUX_TEST_KEY)).replace(
        '"https://gateway.example/v1"', repr(server.base_url)
    )
    exec(compile(code, "quickstart.md", "exec"), {})
    assert server.stats.successes == 3
