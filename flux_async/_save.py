"""Saving generated images: fetch (or decode), check the bytes, write the file atomically.

A ``url`` image is downloaded by a `Downloader`, which each `FluxClient` makes for itself
(`FluxClient.downloader`): the request goes through the client's transport, so through
its connection pool, and is retried as API calls are (`decide_retry` with the client's
`RetryPolicy`: 5xx, 429, connection errors). The API key goes only to the API's own
origin (scheme, host and port of ``base_url``): image URLs usually point at a CDN or a
signed bucket that has no business seeing it. A ``b64_json`` image is decoded.

Whatever the source, the bytes must be a PNG, JPEG or WebP image (sniffed from their
first bytes, never from a header or a URL) and the file's extension is set from what they
are. The file is written under a temporary name in the same directory, made durable and
renamed over the final name (`os.replace`), so no half-written file ever stands under a
final name, even after ``kill -9`` or a power cut; `store_image` returns once the rename
is durable too. The writes never block the event loop and are made durable in groups,
one flush per group, not one per file (the protocol: `_files`): by default on the event
loop's default executor (`ImageWriter`, one per `Downloader`); a fan-out with
``save_to=`` gives its downloader a writer process instead (`Downloader.with_writer`).

This module knows nothing of the models (`Image`, `ImagesResponse` call it), so it sits
below them in the import order.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol, TypeAlias

import attrs
import yarl

from ._config import DEFAULT_TIMEOUT, DOWNLOAD_READ_TIMEOUT, Timeout
from ._exceptions import (
    APIConnectionError,
    APIError,
    ClientClosedError,
    ImageDownloadError,
    RateLimitError,
    ValidationError,
    error_body,
    error_for_status,
)
from ._files import (
    IMAGE_SUFFIXES,
    b64decode,
    find_syncfs,
    fsync_directory,
    image_type,
    rename,
    stage,
    with_suffix,
    write_round,
)
from ._retry import RetryPolicy, decide_retry, parse_retry_after
from ._transport import AsyncTransport, RequestHeaders, TransportRequest
from ._wakes import Wakes

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "IMAGE_SUFFIXES",
    "Downloader",
    "HasDownloader",
    "ImageJob",
    "ImageWriter",
    "Writer",
    "check_directory",
    "check_stem",
    "decode_b64",
    "image_paths",
    "image_type",
    "redact_url",
    "store_image",
    "write_atomic",
]

#: The most bytes one image may have: far above any real picture (a 4096x4096 PNG of
#: noise is about 50 MB), low enough that an endless or wrong body cannot fill memory.
DEFAULT_MAX_IMAGE_BYTES: Final = 100 * 2**20

_ACCEPT = "image/png,image/jpeg,image/webp,image/*;q=0.8"


def redact_url(url: str | None) -> str:
    """``url`` without credentials, query string or fragment, for messages and logs:
    the query of a signed image URL is a credential for as long as it is valid.

    Example::

        redact_url("https://cdn.example/a.png?X-Amz-Signature=abc")
        # 'https://cdn.example/a.png?<redacted>'
    """
    if url is None:
        return "<inline b64_json image>"
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        return "<unparseable url>"
    shown = str(parsed.with_user(None).with_query(None).with_fragment(None))
    return shown + "?<redacted>" if parsed.raw_query_string else shown


def decode_b64(data: str) -> bytes:
    """The bytes of a ``b64_json`` image; `ImageDownloadError` when it is not base64.

    Example::

        decode_b64(image.b64_json)
    """
    try:
        return b64decode(data)
    except (binascii.Error, ValueError) as exc:
        raise ImageDownloadError(
            f"The server's b64_json image is not valid base64 ({exc}); it starts {data[:40]!r}"
        ) from None


def _fspath(field: str, value: object) -> Path:
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            return Path(text)
    raise ValidationError(field, value, "a non-empty path: a str or a pathlib.Path")


def check_directory(field: str, value: object) -> Path:
    """``value`` as a `Path` to save images under; `ValidationError` unless it is a path
    that is a directory or does not exist yet (it is created when the first image is saved).

    Example::

        check_directory("save_to", "out/images")  # PosixPath('out/images')
    """
    path = _fspath(field, value)
    if path.exists() and not path.is_dir():
        raise ValidationError(field, value, "a directory (or a path that does not exist yet)")
    return path


_STEM = re.compile(r"[^/\\\x00]+")


def check_stem(stem: object) -> str:
    """``stem`` if it is a file name without a directory, else a `ValidationError`.

    Example::

        check_stem("fox")  # 'fox'
        check_stem("../fox")  # ValidationError: stem='../fox' is not allowed: ...
    """
    if not isinstance(stem, str) or not _STEM.fullmatch(stem) or stem in (".", ".."):
        raise ValidationError("stem", stem, "a file name without a directory: no '/', '\\\\'")
    return stem


def _names(stem: str, count: int) -> list[str]:
    check_stem(stem)
    if count == 1:
        return [stem]
    return [f"{stem}-{k}" for k in range(count)]


def image_paths(directory: Path, stem: str, count: int) -> list[Path]:
    """Where the ``count`` images of one answer go, without their suffix (set from each
    image's bytes): ``stem`` for one image, ``stem-0`` .. ``stem-{count-1}`` for several
    (the position in ``response.data``).

    Example::

        image_paths(Path("out"), "fox", 2)  # [PosixPath('out/fox-0'), PosixPath('out/fox-1')]
    """
    return [directory / name for name in _names(stem, count)]


def _image_kind(
    data: bytes, path: str, url: str | None, content_type: str | None, max_bytes: int
) -> str:
    """The type of ``data``; `ImageDownloadError` when it is too big or no image."""
    if len(data) > max_bytes:
        raise ImageDownloadError(
            f"The image {'in b64_json' if url is None else 'from ' + redact_url(url)} is "
            f"{len(data)} bytes, over the "
            f"{max_bytes}-byte cap (max_image_bytes)",
            url=url,
            path=path,
            content_type=content_type,
        )
    kind = image_type(data)
    if kind is None:
        source = (
            "The server's b64_json image"
            if url is None
            else f"The body from {redact_url(url)} (Content-Type: {content_type or 'none'})"
        )
        raise ImageDownloadError(
            f"{source} is not a PNG, JPEG or WebP image: {len(data)} bytes starting {data[:16]!r}",
            url=url,
            path=path,
            content_type=content_type,
        )
    return kind


class ImageJob:
    """One image to write: where (a directory, and a name the suffix of its type is
    added to), its bytes or its ``b64_json`` text, its source for error messages, and
    the future its writer awaits (done with the path written)."""

    __slots__ = (
        "content_type",
        "directory",
        "future",
        "loop",
        "max_bytes",
        "name",
        "payload",
        "url",
    )

    def __init__(
        self,
        directory: str,
        name: str,
        payload: bytes | str,
        url: str | None,
        content_type: str | None,
        max_bytes: int,
    ) -> None:
        self.directory = directory
        self.name = name
        self.payload = payload
        self.url = url
        self.content_type = content_type
        self.max_bytes = max_bytes
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[str] = self.loop.create_future()

    def image(self) -> tuple[str, bytes]:
        """Its final path and bytes: decoded, checked (`ImageDownloadError`), and named
        by their type. Decoded here, on the writer's thread, not in the event loop."""
        payload = self.payload
        data = decode_b64(payload) if isinstance(payload, str) else payload
        path = os.path.join(self.directory, self.name)
        kind = _image_kind(data, path, self.url, self.content_type, self.max_bytes)
        return os.path.join(self.directory, with_suffix(self.name, kind)), data


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, its old content, or
    all of ``data``: a temporary file in the same directory, fsync, `os.replace`, then an
    fsync of the directory so the new name survives a power cut too. Blocking (the batch
    command's own small files use it outside the event loop; images go through
    `store_image`, which writes them on a worker thread).

    Example::

        write_atomic(Path("out/batch.json"), b"{}")
    """
    target = os.fspath(path)
    rename(stage(target, data, sync=True), target)
    fsync_directory(os.path.dirname(target) or ".")


class Writer(Protocol):
    """What writes a `Downloader`'s images: an `ImageWriter` (a thread), or in a fan-out
    a ``ProcessWriter`` (a process of its own).

    Example::

        path = await writer.write(ImageJob("out", "fox", png_bytes, None, None, 10**6))
    """

    def write(self, job: ImageJob) -> asyncio.Future[str]:
        """Write ``job``'s image; the future is done, with its path, once it is durable."""
        ...


class ImageWriter:
    """Writes image files atomically and durably, off the event loop, in groups.

    One task on the event loop's default executor writes rounds one after another while
    there are images to write: a round takes every image handed over since the last one
    began, decodes and checks each, creates it under a temporary name beside its final
    one and writes it, makes the group's bytes durable with one syncfs(2) of the
    filesystem (on Linux; elsewhere it fsyncs each file as it writes it), renames each
    over its final name, and makes the renames durable with one fsync of the directory.
    Only then are the round's awaiters woken: when a save returns, the file would survive
    a power cut, name included (what the batch command's manifest relies on), and a
    final name only ever stands over complete bytes.

    The thread starts its next round itself, at once, rather than returning to the event
    loop and being handed it again: a busy event loop holds the interpreter lock, and a
    thread woken to start a round waited for it for a whole switch interval (5 ms) each
    time, a sixth of a disk-bound writer's time. Only when it finds nothing to write does
    the task end, and the event loop (which alone hands images over) starts a new one
    for the next image, so none is ever left behind.

    One thread, not a pool: in a busy event loop a thread waits for the interpreter lock
    each time it wakes, and a saving prompt waits for all of them; one flush per group
    makes parallel fsyncs unnecessary. Decoding ``b64_json`` there keeps that work out of
    the event loop's own turn. The images handed over are a `collections.deque` (whose
    append and popleft are atomic); every other part of its state is touched on the event
    loop's thread only, so it needs no lock. Each `Downloader` has its own.

    Example::

        writer = ImageWriter(find_syncfs())
        path = await writer.write(ImageJob("out", "fox", png_bytes, None, None, 10**6))
    """

    __slots__ = ("_loop", "_pending", "_running", "_syncfs", "_wakes")

    def __init__(self, syncfs: Callable[[int], None] | None) -> None:
        self._syncfs = syncfs
        self._pending: deque[ImageJob] = deque()  # handed over, not yet taken by a round
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakes: Wakes | None = None  # paces the rounds' awaiters on that loop

    def write(self, job: ImageJob) -> asyncio.Future[str]:
        """Write ``job``'s image; the future is done, with its path, once it is durable."""
        if job.loop is not self._loop:
            # A new event loop (the old one's task, if any, ended with it).
            self._loop, self._running, self._pending = job.loop, False, deque()
            self._wakes = Wakes(job.loop)
        self._pending.append(job)
        if not self._running:
            self._start()
        return job.future

    def _start(self) -> None:
        loop, wakes = self._loop, self._wakes
        assert loop is not None
        assert wakes is not None
        self._running = True
        pending = self._pending
        task = loop.run_in_executor(None, _write_rounds, pending, self._syncfs, loop, wakes)
        task.add_done_callback(functools.partial(self._finished, pending))

    def _finished(self, pending: deque[ImageJob], task: asyncio.Future[None]) -> None:
        """On the event loop: the thread found nothing more to write (or the loop's
        executor refused the task: its images fail rather than wait forever)."""
        if pending is not self._pending:
            return  # a task of a former event loop (a new loop gets a new deque)
        self._running = False
        if not task.cancelled() and task.exception() is None:
            if pending:  # handed over after the thread last looked
                self._start()
            return
        error = asyncio.CancelledError() if task.cancelled() else task.exception()
        assert error is not None
        while pending:
            job = pending.popleft()
            if not job.future.done():
                job.future.set_exception(error)


def _write_rounds(
    pending: deque[ImageJob],
    syncfs: Callable[[int], None] | None,
    loop: asyncio.AbstractEventLoop,
    wakes: Wakes,
) -> None:
    """On a worker thread: write rounds of the images in ``pending`` until it is empty,
    waking each round's awaiters on ``loop`` (as ``wakes`` paces them) as soon as the
    round ends."""
    while pending:
        jobs = []
        while pending:
            jobs.append(pending.popleft())
        try:
            outcomes = _write_group(jobs, syncfs)
        except BaseException as exc:  # nobody may wait forever
            outcomes = [(job, exc) for job in jobs]
        try:
            loop.call_soon_threadsafe(_wake, wakes, outcomes)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            return


def _wake(wakes: Wakes, outcomes: list[_Written]) -> None:
    """On the event loop: give each job of a round its path or its error, as ``wakes``
    paces them (one per writer and loop, so rounds that follow each other closely share
    the pace)."""
    for job, outcome in outcomes:
        wakes.add(job.future, outcome)
    wakes.wake()


#: A job and how it ended: the path written, or the error.
_Written: TypeAlias = tuple["ImageJob", "str | BaseException"]


def _write_group(jobs: list[ImageJob], syncfs: Callable[[int], None] | None) -> list[_Written]:
    """On a worker thread: decode and check each job's image, and write them as one
    round (`write_round`); return how each job ended."""
    files: list[tuple[str, bytes] | BaseException] = []
    for job in jobs:
        try:
            files.append(job.image())
        except Exception as exc:
            files.append(exc)
    return list(zip(jobs, write_round(files, syncfs), strict=True))


async def store_image(
    data: bytes,
    path: Path,
    *,
    url: str | None,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Path:
    """Check that ``data`` is a PNG, JPEG or WebP image and write it atomically and
    durably to ``path`` with the matching suffix, on a worker thread (never blocking the
    event loop); return the path written.

    ``url`` (or None for a ``b64_json`` image) and ``content_type`` only name the source
    in the `ImageDownloadError` raised when the bytes are not an image or too many.

    Example::

        await store_image(png_bytes, Path("out/fox"), url=None)  # PosixPath('out/fox.png')
    """
    directory, name = os.path.split(os.fspath(path))
    return await _store(data, directory, name, url, content_type, max_bytes)


async def _store(
    payload: bytes | str,
    directory: str,
    name: str,
    url: str | None,
    content_type: str | None,
    max_bytes: int,
    writer: Writer | None = None,
) -> Path:
    """`store_image` for bytes or ``b64_json`` text, on a path split in two strings
    (pathlib costs as much as the rest of the event loop's share of a save); through
    ``writer`` (a downloader's own, so its saves share flushes) or a writer of its own."""
    job = ImageJob(directory, name, payload, url, content_type, max_bytes)
    return Path(await (writer or ImageWriter(find_syncfs())).write(job))


def _content_type(headers: Mapping[str, str]) -> str | None:
    """The Content-Type, whatever the case of its name (a transport's headers may be a
    plain dict)."""
    value = headers.get("Content-Type")
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    return value


def _origin(url: yarl.URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower(), url.port)


@attrs.frozen
class _Refused:
    """A download attempt that failed: its error, and the answer's status and content
    type when there was an answer."""

    error: APIError
    status: int | None = None
    content_type: str | None = None


def _with_read_limit(timeout: Timeout) -> Timeout:
    """A download's per-attempt limits: ``timeout``, and when it sets no ``read``,
    `DOWNLOAD_READ_TIMEOUT`, so a stall fails its attempt (and is retried) long before
    ``total``."""
    if timeout.read is not None:
        return timeout
    return attrs.evolve(timeout, read=DOWNLOAD_READ_TIMEOUT)


@attrs.frozen(kw_only=True)
class Downloader:
    """What saves images for one client: its transport, retry policy and key rule.

    Made by `FluxClient.downloader`; `Image.save`, `ImagesResponse.save`,
    `FluxClient.save` and the fan-out's ``save_to=`` all use it. ``api_headers`` (the
    client's own, ``Authorization`` included) go only to URLs on ``api_origin``, the
    scheme, host and port of ``base_url``; any other URL gets a ``User-Agent`` and an
    ``Accept`` header, nothing else. ``max_bytes`` caps one image (`DEFAULT_MAX_IMAGE_BYTES`).
    A ``timeout`` that sets no ``read`` gets `DOWNLOAD_READ_TIMEOUT`: a stall fails its
    attempt, which is retried, long before ``total``.

    Example::

        downloader = client.downloader
        path = await downloader.save(image.url, image.b64_json, Path("out/fox"))
    """

    transport: AsyncTransport
    policy: RetryPolicy
    api_origin: str
    api_headers: Mapping[str, str]
    timeout: Timeout = attrs.field(default=DEFAULT_TIMEOUT, converter=_with_read_limit)
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    is_closed: Callable[[], bool] = attrs.field(default=lambda: False, repr=False)
    _api: tuple[str, str, int | None] = attrs.field(init=False, repr=False)
    _plain_headers: Mapping[str, str] = attrs.field(init=False, repr=False)
    # Its saves go through one writer, so the files of a fan-out share their flushes: a
    # thread by default, a process of its own in a fan-out (`with_writer`).
    writer: Writer = attrs.field(repr=False, eq=False, factory=lambda: ImageWriter(find_syncfs()))

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_api", _origin(yarl.URL(self.api_origin)))
        plain = {"Accept": _ACCEPT}
        agent = self.api_headers.get("User-Agent")
        if agent is not None:
            plain["User-Agent"] = agent
        object.__setattr__(self, "_plain_headers", plain)

    def with_policy(self, policy: RetryPolicy, timeout: Timeout | None = None) -> Downloader:
        """This downloader with another retry policy (and per-attempt timeout).

        Example::

            patient = client.downloader.with_policy(RetryPolicy(max_attempts=8))
        """
        return attrs.evolve(
            self, policy=policy, timeout=self.timeout if timeout is None else timeout
        )

    def with_writer(self, writer: Writer) -> Downloader:
        """This downloader, writing its files with ``writer``: what a fan-out with
        ``save_to=`` does, with a writer process of its own.

        Example::

            downloader = client.downloader.with_writer(ImageWriter(find_syncfs()))
        """
        return attrs.evolve(self, writer=writer)

    def _request(self, url: str) -> TransportRequest:
        try:
            parsed = yarl.URL(url)
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise ImageDownloadError(
                f"The image URL {redact_url(url)} is not an http(s) URL; nothing was fetched",
                url=url,
            )
        if _origin(parsed) == self._api:
            # The API's own origin: its headers, as for an API call (the default
            # transport then sends only the Accept over its session's defaults).
            headers: Mapping[str, str] = RequestHeaders(self.api_headers, {"Accept": _ACCEPT})
        else:
            headers = self._plain_headers
        return TransportRequest(
            method="GET",
            url=url,
            headers=headers,
            timeout=self.timeout,
            max_response_bytes=self.max_bytes,
        )

    async def fetch(self, url: str) -> tuple[bytes, str | None, int]:
        """GET ``url`` with retries: (body, content type, attempts made).

        Raises `ImageDownloadError` (with the last error as its ``__cause__``) when the
        download fails for good, or its body is over ``max_bytes``.

        Example::

            body, content_type, attempts = await client.downloader.fetch(image.url)
        """
        request = self._request(url)
        policy = self.policy
        loop = asyncio.get_running_loop()
        deadline_at = None if policy.deadline is None else loop.time() + policy.deadline
        attempts = failures = rate_limited = 0
        while True:
            if self.is_closed():
                raise ClientClosedError("this FluxClient is closed; create a new one")
            attempts += 1
            outcome = await self._attempt(request, attempts)
            if not isinstance(outcome, _Refused):
                body, content_type = outcome
                return body, content_type, attempts
            if isinstance(outcome.error, RateLimitError):
                rate_limited += 1
            else:
                failures += 1
            remaining = None if deadline_at is None else deadline_at - loop.time()
            decision = decide_retry(
                policy,
                outcome.error,
                failures=failures,
                rate_limited=rate_limited,
                remaining=remaining,
            )
            if not decision.retry:
                raise ImageDownloadError(
                    f"Could not download the image at {redact_url(url)} after {attempts} "
                    f"attempt(s): {outcome.error}",
                    url=url,
                    status_code=outcome.status,
                    content_type=outcome.content_type,
                    download_attempts=attempts,
                ) from outcome.error
            await asyncio.sleep(0 if policy.testing else decision.wait)

    async def _attempt(
        self, request: TransportRequest, attempts: int
    ) -> tuple[bytes, str | None] | _Refused:
        """One GET: the body and its content type, or why not (a body over the cap is an
        `ImageDownloadError` at once: another attempt would not shrink it)."""
        try:
            answer = await self.transport.send(request)
        except APIConnectionError as exc:
            return _Refused(exc)
        status = answer.status
        content_type = _content_type(answer.headers)
        if status >= 300:
            json_like = (content_type or "").lower().startswith("application/json")
            error = error_for_status(
                status,
                error_body(answer.body, expect_json=json_like),
                headers=answer.headers,
                retry_after=parse_retry_after(answer.headers),
            )
            return _Refused(error, status, content_type)
        if answer.truncated:
            raise ImageDownloadError(
                f"The image at {redact_url(request.url)} is over the {self.max_bytes}-byte "
                "cap (max_image_bytes); it was not read",
                url=request.url,
                status_code=status,
                content_type=content_type,
                download_attempts=attempts,
            )
        return answer.body, content_type

    async def save(self, url: str | None, b64_json: str | None, path: Path) -> Path:
        """Fetch ``url`` (or decode ``b64_json``), check it is an image and write it to
        ``path`` with the suffix of its type; return the path written.

        Example::

            await client.downloader.save(image.url, image.b64_json, Path("out/fox"))
        """
        directory, name = os.path.split(os.fspath(path))
        return await self._save(url, b64_json, directory, name)

    async def _save(self, url: str | None, b64_json: str | None, directory: str, name: str) -> Path:
        payload: bytes | str
        if b64_json is not None:
            # Decoded on the writer's thread.
            payload, content_type, url = b64_json, None, None
        elif url is not None:
            payload, content_type, _ = await self.fetch(url)
        else:
            raise ImageDownloadError("This image has neither a url nor b64_json: nothing to save")
        try:
            return await _store(
                payload, directory, name, url, content_type, self.max_bytes, self.writer
            )
        except ImageDownloadError as exc:
            exc.url = url
            raise

    async def save_all(
        self, images: Sequence[tuple[str | None, str | None]], directory: Path, stem: str
    ) -> list[Path]:
        """Save several ``(url, b64_json)`` images as ``directory/stem`` (one) or
        ``stem-0``, ``stem-1`` ... (several), concurrently; return the paths in order.

        Example::

            await client.downloader.save_all([(i.url, i.b64_json) for i in r.data], out, "fox")
        """
        names = _names(stem, len(images))
        folder = os.fspath(directory)
        if len(images) == 1:
            ((url, b64),) = images
            if b64 is not None:
                # Without a coroutine per layer: each is an object the garbage collector
                # keeps track of for as long as the write takes.
                job = ImageJob(folder, names[0], b64, None, None, self.max_bytes)
                written = await self.writer.write(job)
                return [directory / os.path.basename(written)]  # half of Path(written)'s cost
            return [await self._save(url, b64, folder, names[0])]
        tasks = [
            asyncio.ensure_future(self._save(url, b64, folder, name))
            for (url, b64), name in zip(images, names, strict=True)
        ]
        try:
            # Not a TaskGroup: its ExceptionGroup would hide the ImageDownloadError.
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


class HasDownloader(Protocol):
    """Anything with a `Downloader`: a `FluxClient` (what `Image.save` takes as ``client``).

    Example::

        def saver(client: HasDownloader) -> Downloader:
            return client.downloader
    """

    @property
    def downloader(self) -> Downloader:
        """The downloader that saves this object's images."""
        ...
