"""Saving images (Image.save, ImagesResponse.save, FluxClient.save, save_to=) and stopping a
fan-out on an answer every prompt would get (stop_on=).

Downloads are driven two ways: through `MockTransport` (every status, body and header the
test wants, no sockets) and over real sockets against the emulator, plus a tiny image
server on another port, which is another origin: the one that must never see the key.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import flux_async._files as files_module
import flux_async._save as save_module
from flux_async import (
    DEFAULT_MAX_IMAGE_BYTES,
    DOWNLOAD_FAILURES_TO_STOP,
    DOWNLOAD_READ_TIMEOUT,
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchStoppedError,
    FluxClient,
    ImageDownloadError,
    ImageSaveError,
    ImagesResponse,
    MockTransport,
    NotFoundError,
    RetryPolicy,
    Timeout,
    TransportRequest,
    TransportResponse,
    ValidationError,
)
from flux_async.emulator import Emulator

from .conftest import API_KEY, serving

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
WEBP = b"RIFF\x40\x00\x00\x00WEBPVP8 " + b"\x00" * 64
API = "https://api.example/v1"


def answer(*urls: str, b64: bytes | None = None) -> TransportResponse:
    if b64 is not None:
        return TransportResponse(
            200, json={"created": 1, "data": [{"b64_json": base64.b64encode(b64).decode()}]}
        )
    return TransportResponse(200, json={"created": 1, "data": [{"url": u} for u in urls]})


def image(body: bytes, content_type: str = "image/png") -> TransportResponse:
    return TransportResponse(200, headers={"Content-Type": content_type}, body=body)


def mock_client(handler: Any, **options: Any) -> FluxClient:
    return FluxClient(
        api_key=API_KEY,
        base_url=API,
        transport=MockTransport(handler),
        retry=options.pop("retry", RetryPolicy.for_tests()),
        **options,
    )


def names(directory: Path, pattern: str = "*") -> list[str]:
    """The sorted names in ``directory`` (a plain function: tests call it between awaits)."""
    return sorted(p.name for p in directory.glob(pattern))


def leftovers(directory: Path) -> list[str]:
    """Temporary files an atomic write may leave behind: none, ever."""
    return [p.name for p in directory.rglob("*") if p.name.endswith(".part")]


# -- saving one image -----------------------------------------------------------------------


async def test_url_image_is_downloaded_through_the_client_and_named_by_its_type(
    tmp_path: Path, client: FluxClient, emulator: Emulator
) -> None:
    """A url image from the emulator: a real PNG on disk, its suffix from the bytes."""
    response = await client.generate("a red fox", n=2)
    paths = await response.save(tmp_path / "out", stem="fox", client=client)
    assert [p.name for p in paths] == ["fox-0.png", "fox-1.png"]
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The caller's suffix is replaced by the real one; the same through client.save.
    one = await client.save(response.data[0], tmp_path / "best.jpg")
    assert one == tmp_path / "best.png"
    assert one.read_bytes() == paths[0].read_bytes()
    assert await client.save(response, tmp_path / "again") == [
        tmp_path / "again" / "image-0.png",
        tmp_path / "again" / "image-1.png",
    ]
    assert leftovers(tmp_path) == []


async def test_b64_image_is_decoded_without_a_client(tmp_path: Path, client: FluxClient) -> None:
    """b64_json needs no download: Image.save works with no client at all."""
    response = await client.generate("a crow", response_format="b64_json")
    [path] = await response.save(tmp_path, stem="crow")
    assert path == tmp_path / "crow.png"
    assert path.read_bytes() == response.data[0].decode()


async def test_url_image_without_a_client_is_a_validation_error(
    tmp_path: Path, client: FluxClient
) -> None:
    """The URL needs a transport: the error names client and shows both ways to pass one."""
    response = await client.generate("a fox")
    with pytest.raises(ValidationError, match=r"client=None.*client\.save\(image, path\)"):
        await response.data[0].save(tmp_path / "fox")


@pytest.mark.parametrize(("body", "suffix"), [(PNG, ".png"), (JPEG, ".jpg"), (WEBP, ".webp")])
async def test_type_is_sniffed_from_the_bytes_not_the_header(
    tmp_path: Path, body: bytes, suffix: str
) -> None:
    """PNG, JPEG and WebP are told apart by their first bytes, whatever the header says."""

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            return answer("https://cdn.example/a")
        return image(body, "application/octet-stream")

    async with mock_client(handler) as client:
        response = await client.generate("x")
        path = await client.save(response.data[0], tmp_path / "a.png")
    assert path == tmp_path / f"a{suffix}"
    assert path.read_bytes() == body


async def test_a_body_that_is_no_image_names_the_url_without_its_query(tmp_path: Path) -> None:
    """An HTML page instead of an image: the error names the URL (query redacted) and type."""
    signed = "https://cdn.example/img/a.png?X-Amz-Signature=secret123"

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            return answer(signed)
        return image(b"<html>login</html>", "text/html; charset=utf-8")

    async with mock_client(handler) as client:
        response = await client.generate("x")
        with pytest.raises(ImageDownloadError) as caught:
            await client.save(response.data[0], tmp_path / "a")
    message = str(caught.value)
    assert "https://cdn.example/img/a.png?<redacted>" in message
    assert "secret123" not in message
    assert "text/html; charset=utf-8" in message
    assert caught.value.url == signed  # the whole URL stays on the error
    assert names(tmp_path) == []


async def test_downloads_retry_5xx_and_connection_errors_like_api_calls(tmp_path: Path) -> None:
    """503, a dropped connection, then the image: saved, after three GETs."""
    gets: list[str] = []

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            return answer("https://cdn.example/a.png")
        gets.append(request.url)
        if len(gets) == 1:
            return TransportResponse(503, body=b"busy")
        if len(gets) == 2:
            raise APIConnectionError("Connection error: reset")
        return image(PNG)

    async with mock_client(handler) as client:
        response = await client.generate("x")
        path = await client.save(response.data[0], tmp_path / "a")
    assert path.read_bytes() == PNG
    assert len(gets) == 3


async def test_a_404_is_not_retried_and_the_retry_policy_bounds_the_rest(tmp_path: Path) -> None:
    """404 ends the download at once; endless 500s end after max_attempts."""
    gets: list[str] = []

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            return answer("https://cdn.example/gone.png", "https://cdn.example/busy.png")
        gets.append(request.url)
        if request.url.endswith("gone.png"):
            return TransportResponse(404, json={"error": {"message": "no such key"}})
        return TransportResponse(500, body=b"oops")

    async with mock_client(handler, retry=RetryPolicy.for_tests(max_attempts=3)) as client:
        response = await client.generate("x", n=2)
        with pytest.raises(ImageDownloadError) as gone:
            await client.save(response.data[0], tmp_path / "a")
        with pytest.raises(ImageDownloadError) as busy:
            await client.save(response.data[1], tmp_path / "b")
    assert (gone.value.status_code, gone.value.download_attempts) == (404, 1)
    assert (busy.value.status_code, busy.value.download_attempts) == (500, 3)
    assert "after 3 attempt(s)" in str(busy.value)
    assert gets.count("https://cdn.example/gone.png") == 1


async def test_the_key_goes_to_the_api_origin_only(tmp_path: Path) -> None:
    """Same scheme, host and port as base_url: Authorization; anything else: none."""
    seen: dict[str, dict[str, str]] = {}

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            return answer(
                "https://api.example/files/a.png",
                "https://cdn.example/b.png",
                "http://api.example/files/c.png",
                "https://api.example:8443/d.png",
            )
        seen[request.url] = dict(request.headers)
        return image(PNG)

    async with mock_client(handler, default_headers={"X-Org": "mine"}) as client:
        response = await client.generate("x", n=4)
        await client.save(response, tmp_path)
    auth = {url: "Authorization" in headers for url, headers in seen.items()}
    assert auth == {
        "https://api.example/files/a.png": True,
        "https://cdn.example/b.png": False,
        "http://api.example/files/c.png": False,
        "https://api.example:8443/d.png": False,
    }
    # Nothing of the caller's own headers leaves for another origin either.
    assert "X-Org" not in seen["https://cdn.example/b.png"]
    assert seen["https://cdn.example/b.png"]["Accept"].startswith("image/png")


@pytest.fixture
async def cdn() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An image server on its own port (so another origin), recording request headers."""
    seen: list[dict[str, str]] = []

    async def serve(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    async with serving(app) as root:
        yield root, seen


async def test_the_default_transport_sends_no_key_to_another_origin(
    tmp_path: Path, emulator: Emulator, cdn: tuple[str, list[dict[str, str]]]
) -> None:
    """Over real sockets: the pool's session carries the key by default; a download to
    another origin goes out without it (and without the JSON content headers)."""
    base, seen = cdn
    async with FluxClient(api_key=API_KEY, base_url=emulator.base_url) as client:
        await client.generate("warm the pool up")  # the session exists, with its defaults
        own = await client.generate("a fox")
        await client.save(own, tmp_path / "own")  # the emulator's URL: the API's origin
        foreign = ImagesResponse.from_json({"created": 1, "data": [{"url": f"{base}/x.png"}]})
        [path] = await client.save(foreign, tmp_path / "cdn")
    assert path.read_bytes() == PNG
    [headers] = seen
    assert "Authorization" not in headers
    assert "Content-Type" not in headers
    assert headers["Accept"].startswith("image/png")
    assert API_KEY not in str(headers)


async def test_a_stalled_download_fails_its_attempt_on_the_read_timeout(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A CDN that sends its headers and a few bytes, then nothing: each attempt ends on
    the download's read timeout (30 s by default; API calls have none, as a generation
    sends nothing until its image is made) and is retried, not held until ``total``."""
    gets = 0
    stalled = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        nonlocal gets
        gets += 1
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = len(PNG) * 10
        await response.prepare(request)
        await response.write(PNG)
        await stalled.wait()  # set at the end of the test: the server then lets go
        return response

    app = web.Application()
    app.router.add_get("/{name}", stall)
    async with (
        serving(app) as root,
        FluxClient(api_key=API_KEY, base_url=emulator.base_url) as client,
    ):
        url = f"{root}/x.png"
        try:
            assert client.timeout.read is None
            assert client.downloader.timeout.read == DOWNLOAD_READ_TIMEOUT == 30.0
            impatient = client.downloader.with_policy(
                RetryPolicy.for_tests(max_attempts=2), Timeout(read=0.2)
            )
            # A hang guard, not a timing: without the read timeout each attempt would
            # wait for the 300 s total.
            async with asyncio.timeout(20):
                with pytest.raises(ImageDownloadError, match=r"x\.png") as caught:
                    await impatient.save(url, None, tmp_path / "x")
        finally:
            stalled.set()
    assert gets == 2  # the stall was retried once, as a dropped connection is
    assert isinstance(caught.value.__cause__, APITimeoutError)
    assert names(tmp_path) == []


async def test_size_cap_stops_an_endless_body(tmp_path: Path) -> None:
    """A body over the client's max_image_bytes is not read into memory, and a b64_json
    image over it is not written, alone or inside a fan-out: errors name the cap."""
    big = PNG + b"\x00" * 5000

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            if request.json().get("response_format") == "b64_json":
                return answer(b64=big)
            return answer("https://cdn.example/huge.png")
        return image(big)

    async with mock_client(handler, max_image_bytes=1024) as client:
        assert client.downloader.max_bytes == 1024
        response = await client.generate("x")
        with pytest.raises(ImageDownloadError, match="over the 1024-byte cap"):
            await client.save(response, tmp_path)
        encoded = await client.generate("x", response_format="b64_json")
        with pytest.raises(ImageDownloadError, match="over the 1024-byte cap"):
            await client.save(encoded, tmp_path)
        [result] = await client.gather_generate(
            [{"prompt": "x", "response_format": "b64_json"}], save_to=tmp_path
        )
        assert isinstance(result.error, ImageSaveError)
        assert "over the 1024-byte cap" in str(result.error)
    assert names(tmp_path) == []
    async with mock_client(handler) as client:
        assert client.downloader.max_bytes == DEFAULT_MAX_IMAGE_BYTES
        [path] = await client.save(await client.generate("x"), tmp_path)
    assert path.read_bytes() == big
    for bad in (0, 1023, 2.5e6, "1MB", True, None):
        with pytest.raises(ValidationError, match=r"max_image_bytes=.*an integer >= 1024"):
            FluxClient(api_key=API_KEY, base_url=API, max_image_bytes=bad)


async def test_writes_are_atomic_and_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write runs on a worker thread, not the event loop's; a failed write leaves
    neither the file nor its temporary file; an old file is replaced whole or not at all."""
    threads: list[str] = []
    real = files_module.stage

    def spy(path: str, data: bytes, *, sync: bool, tag: str | None = None) -> str:
        threads.append(threading.current_thread().name)
        return real(path, data, sync=sync, tag=tag)

    monkeypatch.setattr(files_module, "stage", spy)
    await save_module.store_image(PNG, tmp_path / "a", url=None)
    assert threads[0] != threading.current_thread().name  # not the event loop's thread

    old = tmp_path / "a.png"
    assert old.read_bytes() == PNG

    def no_space(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        await save_module.store_image(PNG + b"new", tmp_path / "a", url=None)
    assert old.read_bytes() == PNG  # the old file, untouched
    assert leftovers(tmp_path) == []


async def test_bad_b64_and_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    """Not base64, not an image, a directory as a file path, a stem with a slash."""
    bad = ImagesResponse.from_json({"created": 1, "data": [{"b64_json": "!!notbase64"}]})
    with pytest.raises(ImageDownloadError, match="not valid base64"):
        await bad.save(tmp_path)
    text = base64.b64encode(b"hello").decode()
    not_image = ImagesResponse.from_json({"created": 1, "data": [{"b64_json": text}]})
    with pytest.raises(ImageDownloadError, match="b64_json image is not a PNG, JPEG or WebP"):
        await not_image.save(tmp_path)
    with pytest.raises(ValidationError, match=r"path=.*not a directory"):
        await not_image.data[0].save(tmp_path)
    with pytest.raises(ValidationError, match="stem="):
        await not_image.save(tmp_path, stem="a/b")
    (tmp_path / "x").touch()
    with pytest.raises(ValidationError, match="directory="):
        await not_image.save(tmp_path / "x")


# -- saving inside a fan-out ----------------------------------------------------------------


async def test_save_to_writes_each_prompts_images_as_it_succeeds(
    tmp_path: Path, client: FluxClient
) -> None:
    """gather_generate(save_to=): one file per image, named by index, listed in files."""
    results = await client.gather_generate(["a fox", "a crow", "a cat"], save_to=tmp_path)
    assert [r.files for r in results] == [
        (tmp_path / "000000.png",),
        (tmp_path / "000001.png",),
        (tmp_path / "000002.png",),
    ]
    two = await client.gather_generate(
        [{"prompt": "a whale", "n": 2}],
        save_to=tmp_path / "named",
        save_stem=lambda index, prompt: f"{index}-{prompt.replace(' ', '_')}",
    )
    assert [p.name for p in two[0].files] == ["0-a_whale-0.png", "0-a_whale-1.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for r in [*results, *two] for p in r.files)


@pytest.mark.parametrize("n", [1, 2])
async def test_save_to_keeps_paths_not_images_in_the_results(tmp_path: Path, n: int) -> None:
    """Once a b64_json image is in its file, the result's response no longer carries its
    text (a gathered batch of real images would hold them all in memory): the rest of
    the answer stays, and using the image for its bytes says where they went."""

    def handler(request: TransportRequest) -> TransportResponse:
        item = {"b64_json": base64.b64encode(PNG).decode(), "revised_prompt": "a fox, oil"}
        return TransportResponse(
            200, json={"created": 7, "data": [item] * n}, headers={"x-request-id": "req_1"}
        )

    async with mock_client(handler) as client:
        results = await client.gather_generate(["a fox"] * 3, n=n, save_to=tmp_path)
    for result in results:
        assert result.ok
        assert [path.read_bytes() for path in result.files] == [PNG] * n
        response = result.response
        assert response is not None
        assert response.created == 7
        assert response.request_id == "req_1"
        assert [(i.b64_json, i.url, i.revised_prompt) for i in response.data] == [
            (None, None, "a fox, oil")
        ] * n
    image = results[0].response.data[0] if results[0].response else None
    assert image is not None
    with pytest.raises(ValueError, match="save_to= drops an image's b64_json"):
        image.decode()
    with pytest.raises(ValueError, match="read the file in the result's files"):
        await image.save(tmp_path / "again")
    with pytest.raises(ValueError, match="save_to= drops"):
        await results[0].response.save(tmp_path / "again")  # type: ignore[union-attr]
    assert not (tmp_path / "again").exists()


async def test_urls_that_expire_soon_are_still_saved(tmp_path: Path) -> None:
    """URLs valid for 2 s: each is fetched right after its generation, so all are saved
    although the batch takes longer than that; one fetched late is refused (403)."""
    async with (
        Emulator(url_ttl=2.0, rate_limit=20, burst=1) as emu,
        FluxClient(base_url=emu.base_url) as client,
    ):
        prompts = [f"prompt {i}" for i in range(60)]  # ~3 s at 20/s
        results = await client.gather_generate(prompts, concurrency=8, save_to=tmp_path)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        assert len(names(tmp_path, "*.png")) == 60
        late = results[0].response
        assert late is not None
        with pytest.raises(ImageDownloadError) as expired:
            await client.save(late, tmp_path / "late")
    assert expired.value.status_code == 403


async def test_a_failed_download_fails_the_prompt_but_keeps_the_generation(
    tmp_path: Path,
) -> None:
    """The generation succeeded, the image could not be fetched: the result says both,
    keeps the response and the URL, and the other prompts are saved."""

    def handler(request: TransportRequest) -> TransportResponse:
        if request.method == "POST":
            prompt = request.json()["prompt"]
            return answer(f"https://cdn.example/{prompt}.png?sig=s3cr3t")
        if "expired" in request.url:
            return TransportResponse(403, body=b"<Error>Request has expired</Error>")
        return image(PNG)

    async with mock_client(handler) as client:
        results = await client.gather_generate(["ok", "expired", "fine"], save_to=tmp_path)
    ok, bad, fine = results
    assert ok.ok
    assert fine.ok
    assert not bad.ok
    error = bad.error
    assert isinstance(error, ImageDownloadError)
    assert str(error).startswith("The generation succeeded but its image could not be fetched")
    assert "https://cdn.example/expired.png?<redacted>" in str(error)
    assert "s3cr3t" not in str(error)
    assert error.url == "https://cdn.example/expired.png?sig=s3cr3t"
    assert error.status_code == 403
    assert error.response is bad.response is not None
    assert bad.attempts == 1
    assert names(tmp_path) == ["000000.png", "000002.png"]


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_a_failed_write_fails_the_prompt_with_image_save_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """A write that fails (the save directory turned into a file while the batch ran):
    ImageSaveError saying the generation succeeded, with the OSError as its cause, from
    the writer process and from the thread alike."""
    import flux_async._writer_process as writer_process

    monkeypatch.setattr(writer_process, "can_start", lambda: writer == "process")
    out = tmp_path / "out"

    def handler(request: Any) -> TransportResponse:
        out.write_bytes(b"not a directory")
        return answer(b64=PNG)

    async with mock_client(handler) as client:
        [result] = await client.gather_generate(["x"], save_to=out)
    assert isinstance(result.error, ImageSaveError)
    assert not isinstance(result.error, ImageDownloadError)
    assert "generation succeeded but writing its image failed" in str(result.error)
    assert isinstance(result.error.__cause__, NotADirectoryError)
    assert result.error.__cause__.filename is not None
    assert str(out) in result.error.__cause__.filename
    assert result.response is not None
    assert result.response.data[0].b64_json is not None  # not saved: kept whole


@pytest.mark.parametrize("stop_on", [None, ()])
async def test_a_full_disk_stops_the_fan_out_after_the_first_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_on: tuple[int, ...] | None
) -> None:
    """Every write fails with ENOSPC: by default the fan-out stops on the first image
    (at most ``concurrency`` generations are paid for), the error says to free space, and
    the rest end unsent; with ``stop_on=()`` every prompt is generated and fails."""
    import errno

    import flux_async._writer_process as writer_process

    monkeypatch.setattr(writer_process, "can_start", lambda: False)  # the thread writes

    def full(path: str, data: bytes, **_: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(files_module, "stage", full)
    posts = 0

    def handler(request: TransportRequest) -> TransportResponse:
        nonlocal posts
        posts += 1
        return answer(b64=PNG)

    options: dict[str, Any] = {} if stop_on is None else {"stop_on": stop_on}
    async with mock_client(handler) as client:
        fanout = client.iter_generate(
            [f"p{i}" for i in range(100)], concurrency=4, save_to=tmp_path, **options
        )
        results = [r async for r in fanout]
    unsaved = [r for r in results if isinstance(r.error, ImageSaveError)]
    stopped = [r for r in results if isinstance(r.error, BatchStoppedError)]
    if stop_on == ():
        assert posts == 100
        assert len(unsaved) == 100
        assert fanout.stopped_by is None
        return
    assert posts <= 4
    assert 1 <= len(unsaved) <= 4
    assert len(unsaved) + len(stopped) == 100
    reason = fanout.stopped_by
    assert isinstance(reason, ImageSaveError)
    assert "No space left on device" in str(reason)
    assert "free space on that disk" in " ".join(reason.__notes__)
    error = stopped[-1].error
    assert isinstance(error, BatchStoppedError)
    assert error.reason is reason
    assert "could not save its images for a reason every prompt would share" in str(error)


async def test_an_image_host_that_fails_every_download_stops_the_fan_out(
    tmp_path: Path,
) -> None:
    """Every URL answers with an HTML page: the fan-out stops once the images of
    DOWNLOAD_FAILURES_TO_STOP prompts in a row could not be fetched. A host that fails
    every other prompt's image never stops it: a saved prompt ends the row."""
    for every in (1, 2):
        posts = gets = 0

        def handler(request: TransportRequest, every: int = every) -> TransportResponse:
            nonlocal posts, gets
            if request.method == "POST":
                posts += 1
                return answer(f"https://cdn.example/{posts}.png")
            gets += 1
            number = int(request.url.rsplit("/", 1)[1].split(".")[0])
            if number % every == 0:
                return TransportResponse(200, headers={"Content-Type": "text/html"}, body=b"<h1>")
            return image(PNG)

        async with mock_client(handler) as client:
            fanout = client.iter_generate(
                [f"p{i}" for i in range(60)], concurrency=2, save_to=tmp_path / str(every)
            )
            results = [r async for r in fanout]
        fetched = [r for r in results if isinstance(r.error, ImageDownloadError)]
        if every == 2:
            assert fanout.stopped_by is None
            assert posts == 60
            assert len(fetched) == 30
            continue
        assert posts <= DOWNLOAD_FAILURES_TO_STOP + 2
        assert isinstance(fanout.stopped_by, ImageDownloadError)
        assert "could not be fetched" in " ".join(fanout.stopped_by.__notes__)
        assert all(r.error.url for r in fetched if isinstance(r.error, ImageDownloadError))
        assert len(fetched) + sum(isinstance(r.error, BatchStoppedError) for r in results) == 60


async def test_a_caller_that_saves_itself_gets_the_same_stop_through_report_save(
    tmp_path: Path,
) -> None:
    """Without save_to=, the caller saves each image and reports how it went: failures
    from an image host that fails them all stop the fan-out once DOWNLOAD_FAILURES_TO_STOP
    prompts in a row failed; a save reported as done (None) ends a row."""
    posts = 0

    def handler(request: TransportRequest) -> TransportResponse:
        nonlocal posts
        if request.method == "POST":
            posts += 1
            return answer(f"https://cdn.example/{posts}.png")
        if request.url.endswith("/1.png"):
            return image(PNG)  # the first image saves: the row starts after it
        return TransportResponse(200, headers={"Content-Type": "text/html"}, body=b"<h1>")

    async with mock_client(handler) as client:
        fanout = client.iter_generate([f"p{i}" for i in range(100)], concurrency=1)
        async for result in fanout:
            if result.response is None:
                continue
            try:
                await result.response.save(tmp_path, stem=f"{result.index}", client=client)
            except ImageSaveError as exc:
                fanout.report_save(result.index, exc)
            else:
                fanout.report_save(result.index, None)
    assert isinstance(fanout.stopped_by, ImageDownloadError)
    # One saved, then the row of failures; beyond it only what was generated ahead of the
    # loop: the prompt in flight and the results queue (4 x concurrency) when it stopped.
    assert 1 + DOWNLOAD_FAILURES_TO_STOP <= posts <= 1 + DOWNLOAD_FAILURES_TO_STOP + 4 + 1
    assert posts < 100
    assert names(tmp_path) == ["0.png"]


async def test_save_options_are_validated_before_anything_is_sent(
    tmp_path: Path, client: FluxClient
) -> None:
    """save_to a file, save_stem not callable or without save_to, a bad stop_on."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for options, field in [
        ({"save_to": a_file}, "save_to"),
        ({"save_to": 42}, "save_to"),
        ({"save_to": tmp_path, "save_stem": "x"}, "save_stem"),
        ({"save_stem": lambda i, p: "x"}, "save_stem"),
        ({"stop_on": "401"}, "stop_on"),
        ({"stop_on": {401, 200}}, "stop_on"),
    ]:
        with pytest.raises(ValidationError, match=f"^{field}="):
            client.iter_generate(["x"], **options)


# -- stopping on fatal answers ----------------------------------------------------------------


async def test_a_wrong_key_stops_the_batch_after_at_most_concurrency_answers(
    emulator: Emulator,
) -> None:
    """500 prompts, concurrency 8, a key the server refuses: at most 8 requests; every
    other prompt ends at once, unsent, with the reason and the library's hint."""
    async with FluxClient(
        api_key="sk-wrong", base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as client:
        fanout = client.iter_generate([f"p{i}" for i in range(500)], concurrency=8)
        results = [r async for r in fanout]
    assert emulator.stats.requests <= 8
    assert len(results) == 500
    refused = [r for r in results if isinstance(r.error, AuthenticationError)]
    stopped = [r for r in results if isinstance(r.error, BatchStoppedError)]
    assert 1 <= len(refused) <= 8
    assert len(refused) + len(stopped) == 500
    assert isinstance(fanout.stopped_by, AuthenticationError)
    error = stopped[-1].error
    assert isinstance(error, BatchStoppedError)
    assert error.reason is fanout.stopped_by
    assert error.attempts == 0
    assert str(error).startswith("This prompt was not sent: the batch stopped")
    assert "The API key was refused" in str(error)


@pytest.mark.parametrize(
    ("suffix", "hint"),
    [
        ("", "OpenAI-style base URLs end in /v1"),
        ("/api/v1", "which this server does not serve (is its path prefix right"),
    ],
)
async def test_a_wrong_base_url_stops_with_the_base_url_hint(
    emulator: Emulator, suffix: str, hint: str
) -> None:
    """404 on the endpoint: stopped; the hint says to check base_url, and what in it: the
    /v1 where it lacks one, the path prefix (or the model) where it has one."""
    wrong = emulator.base_url.removesuffix("/v1") + suffix  # every call is a 404
    async with FluxClient(base_url=wrong, retry=RetryPolicy.for_tests()) as client:
        results = await client.gather_generate([f"p{i}" for i in range(100)], concurrency=4)
    assert isinstance(results[0].error, NotFoundError)
    assert isinstance(results[-1].error, BatchStoppedError)
    assert "Check base_url" in str(results[-1].error)
    assert hint in str(results[-1].error)


def _refusing(answer_first: int = 0) -> tuple[MockTransport, list[int]]:
    """A transport whose server answers the first ``answer_first`` requests, then is
    never reached again (every attempt a connection error); it counts the attempts."""
    sent = [0]

    def handler(request: TransportRequest) -> TransportResponse:
        sent[0] += 1
        if sent[0] <= answer_first:
            return answer("https://cdn.example/x.png")
        raise APIConnectionError("Cannot connect to host api.example:443 [refused]")

    return MockTransport(handler), sent


@pytest.mark.looptime
async def test_a_server_that_never_answered_stops_the_batch_with_the_hint() -> None:
    """A wrong host or port (default retries): the batch stops after its first prompts
    fail, the rest unsent, the error saying to check base_url, instead of each of 200
    prompts spending its own retries."""
    transport, sent = _refusing()
    async with FluxClient(api_key=API_KEY, base_url=API, transport=transport) as client:
        results = await client.gather_generate([f"p{i}" for i in range(200)], concurrency=8)
    failed = [r for r in results if isinstance(r.error, APIConnectionError)]
    stopped = [r for r in results if isinstance(r.error, BatchStoppedError)]
    assert 1 <= len(failed) <= 8
    assert len(failed) + len(stopped) == 200
    # At most 4 x concurrency prompts under way (stand-ins for those in backoff), each
    # with at most max_attempts (4); without the stop: 200 x 4.
    assert sent[0] <= 4 * 8 * 4
    assert "Check base_url: nothing has answered this client there" in str(stopped[-1].error)
    assert "has never answered" in str(stopped[-1].error)


@pytest.mark.looptime
async def test_an_outage_after_answers_or_with_stop_on_off_stops_nothing() -> None:
    """A server that has answered once is down, not wrong: every prompt spends its own
    retries (no stop); with stop_on=() a server never reached does not stop it either."""
    transport, _ = _refusing(answer_first=1)
    async with FluxClient(api_key=API_KEY, base_url=API, transport=transport) as client:
        results = await client.gather_generate([f"p{i}" for i in range(12)], concurrency=4)
    assert results[0].ok
    assert all(isinstance(r.error, APIConnectionError) for r in results[1:])
    transport, _ = _refusing()
    async with FluxClient(api_key=API_KEY, base_url=API, transport=transport) as client:
        results = await client.gather_generate(
            [f"p{i}" for i in range(12)], concurrency=4, stop_on=()
        )
    assert all(isinstance(r.error, APIConnectionError) for r in results)


async def test_stop_on_can_be_turned_off_and_a_400_never_stops(emulator: Emulator) -> None:
    """stop_on=() sends every prompt; one prompt's 400 leaves the others alone."""
    async with FluxClient(
        api_key="sk-wrong", base_url=emulator.base_url, retry=RetryPolicy.for_tests()
    ) as client:
        results = await client.gather_generate(["a", "b", "c", "d"], stop_on=())
    assert all(isinstance(r.error, AuthenticationError) for r in results)
    assert emulator.stats.requests == 4

    def handler(request: TransportRequest) -> TransportResponse:
        if request.json()["prompt"] == "bad":
            return TransportResponse(400, json={"error": {"message": "content policy"}})
        return answer("https://cdn.example/a.png")

    async with mock_client(handler) as client:
        results = await client.gather_generate(["a", "bad", *"bcdefgh"], concurrency=1)
    assert isinstance(results[1].error, BadRequestError)
    assert sum(r.ok for r in results) == 8


async def test_a_call_waiting_to_retry_is_not_sent_after_the_stop() -> None:
    """A prompt backing off after a 503 when another gets a 401: its retry is not sent."""
    posts: list[str] = []

    async def handler(request: TransportRequest) -> TransportResponse:
        prompt = request.json()["prompt"]
        posts.append(prompt)
        if prompt == "busy":
            return TransportResponse(503, headers={"retry-after-ms": "300"}, body=b"busy")
        await asyncio.sleep(0.05)
        return TransportResponse(401, json={"error": {"message": "bad key"}})

    async with mock_client(handler, retry=RetryPolicy()) as client:
        busy, refused = await client.gather_generate(["busy", "refused"], concurrency=2)
    assert posts == ["busy", "refused"]
    assert isinstance(refused.error, AuthenticationError)
    assert isinstance(busy.error, BatchStoppedError)
    assert busy.error.attempts == busy.attempts == 1
    assert "was not retried after 1 attempt(s)" in str(busy.error)


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
async def test_group_commit_wakes_a_writer_after_a_flush_that_followed_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    """30 files at once, flushes made slow: far fewer flushes than files, every file
    whole under its name, and each writer woken only after a flush (syncfs, or an fsync
    of the directory) that started once its file was renamed: its name is durable."""
    import time

    flushes: list[tuple[float, float]] = []

    def slow(flush: Any) -> Any:
        def timed(target: Any) -> None:
            started = time.monotonic()
            time.sleep(0.05)  # a disk's flush, so that files pile up meanwhile
            flush(target)
            flushes.append((started, time.monotonic()))

        return timed

    renamed: dict[str, float] = {}
    real_rename = files_module.rename

    def rename(temporary: str, path: str) -> None:
        real_rename(temporary, path)
        renamed[path] = time.monotonic()

    monkeypatch.setattr(files_module, "rename", rename)
    monkeypatch.setattr(files_module, "fsync_directory", slow(files_module.fsync_directory))
    writer = save_module.ImageWriter(slow(lambda fd: None) if syncfs else None)
    returned: dict[str, float] = {}

    async def write(i: int) -> None:
        job = save_module.ImageJob(str(tmp_path), f"{i:02d}", PNG + bytes([i]), None, None, 10**6)
        path = await writer.write(job)
        returned[path] = time.monotonic()

    await asyncio.gather(*(write(i) for i in range(30)))
    assert len(returned) == 30
    assert 1 <= len(flushes) <= 10
    for path, woken in returned.items():
        assert any(renamed[path] <= start and end <= woken for start, end in flushes), path
    assert names(tmp_path) == [f"{i:02d}.png" for i in range(30)]
    assert all((tmp_path / f"{i:02d}.png").read_bytes() == PNG + bytes([i]) for i in range(30))
    assert leftovers(tmp_path) == []


async def test_the_writer_thread_starts_its_next_round_without_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image handed over while a round runs is written by the same thread as soon as
    that round ends, even while the event loop is busy: a round that waited for the event
    loop to start it waited for the interpreter lock (5 ms each time under load). The
    event loop is blocked here on purpose until the second round has begun."""
    first_round = threading.Event()
    release = threading.Event()
    second_round = threading.Event()
    threads: list[int] = []
    real = save_module._write_group

    def write_group(jobs: list[Any], syncfs: Any) -> Any:
        threads.append(threading.get_ident())
        if len(threads) == 1:
            first_round.set()
            release.wait(10)
        else:
            second_round.set()
        return real(jobs, syncfs)

    monkeypatch.setattr(save_module, "_write_group", write_group)
    writer = save_module.ImageWriter(None)
    loop = asyncio.get_running_loop()

    def job(name: str) -> Any:
        return save_module.ImageJob(str(tmp_path), name, PNG, None, None, 10**6)

    first = writer.write(job("a"))
    assert await loop.run_in_executor(None, first_round.wait, 10)
    second = writer.write(job("b"))
    release.set()
    # Blocks the event loop: only the writer's own thread can start the second round.
    assert second_round.wait(10), "the second round waited for the event loop"
    assert await first == str(tmp_path / "a.png")
    assert await second == str(tmp_path / "b.png")
    assert len(threads) == 2
    assert threads[0] == threads[1]
    assert names(tmp_path) == ["a.png", "b.png"]


async def test_a_writer_thread_that_fails_fails_its_images_and_the_next_one_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that raises (a bug, not a disk error: those are per image) fails the
    images it took, never leaves them waiting, and the next image gets a working writer."""
    calls = 0
    real = save_module._write_group

    def write_group(jobs: list[Any], syncfs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the writer")
        return real(jobs, syncfs)

    monkeypatch.setattr(save_module, "_write_group", write_group)
    writer = save_module.ImageWriter(None)
    job = save_module.ImageJob(str(tmp_path), "a", PNG, None, None, 10**6)
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        await writer.write(job)
    job = save_module.ImageJob(str(tmp_path), "b", PNG, None, None, 10**6)
    assert await writer.write(job) == str(tmp_path / "b.png")
    assert names(tmp_path) == ["b.png"]


async def test_a_failed_flush_fails_its_writers_and_leaves_nothing(tmp_path: Path) -> None:
    """A flush that fails (EIO): the writers waiting on it get the error, not a hang,
    and no file, final or temporary, is left."""

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    writer = save_module.ImageWriter(broken)
    jobs = [save_module.ImageJob(str(tmp_path), str(i), PNG, None, None, 10**6) for i in range(3)]
    results = await asyncio.gather(*(writer.write(job) for job in jobs), return_exceptions=True)
    assert [str(r) for r in results] == ["[Errno 5] Input/output error"] * 3
    assert names(tmp_path) == []


_B64_CASES = [
    base64.b64encode(PNG).decode(),  # valid
    base64.b64encode(PNG).decode().rstrip("="),  # padding missing
    "iVBORw0KGgo!" + base64.b64encode(PNG).decode()[12:],  # a character outside base64
    base64.b64encode(PNG).decode()[:40] + "\n" + base64.b64encode(PNG).decode()[40:],  # newline
    "",  # empty: no bytes (then "not an image" when saved)
    "QUJD====",  # padding in excess
]


@pytest.mark.parametrize("text", _B64_CASES)
def test_the_fast_b64_decoder_accepts_and_refuses_what_the_standard_one_does(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pybase64 (installed with the `fast` and `cli` extras) is used when present; a
    user without it must see exactly the same images and the same refusals."""
    pytest.importorskip("pybase64")

    def outcome() -> bytes | str:
        try:
            return save_module.decode_b64(text)
        except ImageDownloadError:
            return "refused"

    files_module._fast_b64decode.cache_clear()
    try:
        decoder = files_module.simd_b64decode()
        assert decoder is not None
        assert decoder.__module__.startswith("pybase64")
        fast = outcome()
        files_module._fast_b64decode.cache_clear()
        monkeypatch.setitem(__import__("sys").modules, "pybase64", None)  # not installed
        assert files_module.simd_b64decode() is None
        assert outcome() == fast
    finally:
        files_module._fast_b64decode.cache_clear()
