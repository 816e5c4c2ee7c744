"""Saving generated images: fetch (or decode), check the bytes, write the file atomically.

A ``url`` image is downloaded by a `Downloader`, which each `FluxClient` makes for itself
(`FluxClient.downloader`): the request goes through the client's transport, so through
its connection pool, and is retried as API calls are (`decide_retry` with the client's
`RetryPolicy`: 5xx, 429, connection errors). The API key goes only to the API's own
origin (scheme, host and port of ``base_url``): image URLs usually point at a CDN or a
signed bucket that has no business seeing it. A ``b64_json`` image is decoded.

Whatever the source, the bytes must be a PNG, JPEG or WebP image (sniffed from their
first bytes, never from a header or a URL) and the file's extension is set from what they
are. The file is written under a temporary name in the same directory, fsynced and
renamed over the final name (`os.replace`), so no half-written file ever stands under a
final name, even after ``kill -9``. The writes run in a worker thread: a batch writing
hundreds of files a second never blocks the event loop.

This module knows nothing of the models (`Image`, `ImagesResponse` call it), so it sits
below them in the import order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

import attrs
import yarl

from ._config import DEFAULT_TIMEOUT, Timeout
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
from ._retry import RetryPolicy, decide_retry, parse_retry_after
from ._transport import AsyncTransport, RequestHeaders, TransportRequest

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "IMAGE_SUFFIXES",
    "Downloader",
    "HasDownloader",
    "check_directory",
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

#: The suffix a file of each sniffed type gets.
IMAGE_SUFFIXES: Final[Mapping[str, str]] = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
# Suffixes replaced (rather than appended to) when the caller's path has one.
_REPLACED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".img", ".image"})
_ACCEPT = "image/png,image/jpeg,image/webp,image/*;q=0.8"


def image_type(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from the first bytes of ``data``, else None.

    Example::

        image_type(b"\\x89PNG\\r\\n\\x1a\\n...")  # 'png'
        image_type(b"<html>")  # None
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


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
        return base64.b64decode(data, validate=True)
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


def image_paths(directory: Path, stem: str, count: int) -> list[Path]:
    """Where the ``count`` images of one answer go, without their suffix (set from each
    image's bytes): ``stem`` for one image, ``stem-0`` .. ``stem-{count-1}`` for several
    (the position in ``response.data``).

    Example::

        image_paths(Path("out"), "fox", 2)  # [PosixPath('out/fox-0'), PosixPath('out/fox-1')]
    """
    if not isinstance(stem, str) or not _STEM.fullmatch(stem) or stem in (".", ".."):
        raise ValidationError("stem", stem, "a file name without a directory: no '/', '\\\\'")
    if count == 1:
        return [directory / stem]
    return [directory / f"{stem}-{k}" for k in range(count)]


def _with_suffix(path: Path, kind: str) -> Path:
    suffix = IMAGE_SUFFIXES[kind]
    if path.suffix.lower() in _REPLACED_SUFFIXES:
        return path.with_suffix(suffix)
    return path.with_name(path.name + suffix)


def _stage(path: Path, data: bytes, *, sync: bool) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (fsynced when ``sync``);
    return its name. Nothing stands under ``path`` yet."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # A dot-name that no final file can have, unique per call: two writers of the same
    # path never share a temporary file.
    temporary = directory / f".{path.name}.{os.urandom(6).hex()}.part"
    # os.open with 0o666 (not mkstemp's 0o600): the image gets the caller's umask, like
    # any file they write.
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
    )
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if sync:
                os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, its old content, or
    all of ``data``: a temporary file in the same directory, fsync, `os.replace`, then an
    fsync of the directory so the new name survives a power cut too. Blocking (the batch
    command's own small files use it outside the event loop; images go through
    `store_image`, which writes them in groups on a thread of its own).

    Example::

        write_atomic(Path("out/batch.json"), b"{}")
    """
    temporary = _stage(path, data, sync=True)
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _syncfs() -> Callable[[int], None] | None:
    """Linux's syncfs(2), which flushes one filesystem in one call, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return syncfs


class _GroupSync:
    """syncfs(2) with group commit: callers that arrive while a sync runs share the next.

    A flush of the disk's cache costs the same (0.1 to several ms) for one small file as
    for many, and a batch against a fast server finishes thousands of images a second.
    A caller takes a ticket after its file is written; a sync started after that covers
    it. One thread runs a sync while the others wait; when it ends, every ticket it
    covered returns together, and the next waiter starts the next sync for the rest.
    """

    def __init__(self, syncfs: Callable[[int], None]) -> None:
        self._syncfs = syncfs
        self._cond = threading.Condition()
        self._next = 0  # the last ticket handed out
        self._synced = 0  # every ticket up to this one is durable
        self._busy = False

    def sync(self, path: Path) -> None:
        """Return once a sync of ``path``'s filesystem started after this call has ended."""
        with self._cond:
            self._next += 1
            ticket = self._next
            while self._synced < ticket:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                upto = self._next
                self._cond.release()
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        self._syncfs(fd)
                    finally:
                        os.close(fd)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
                self._synced = upto


class _ImageWriter:
    """Writes image files atomically and durably on a pool of threads of its own.

    Each file: a temporary file beside its final name, made durable, then renamed over
    the final name, so a final name only ever stands over complete bytes. On Linux the
    durability step is a shared syncfs(2) (`_GroupSync`: one flush for every file that
    is ready, instead of one fsync each); elsewhere an fsync per file. The rename itself
    is not flushed per file: a power cut may lose the newest renames (never expose a
    partial file), and the batch command redoes a prompt whose file is missing.
    File creation and renames run in parallel: on a busy disk each costs a journal
    write, and one thread alone would cap a batch at a few hundred images a second.
    """

    _THREADS = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._syncs: dict[int, _GroupSync] = {}
        self._syncfs: Callable[[int], None] | None = None

    def submit(self, path: Path, data: bytes) -> concurrent.futures.Future[None]:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._syncfs = _syncfs()
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        self._THREADS, thread_name_prefix="flux-async-image-writer"
                    )
                pool = self._pool
        return pool.submit(self._write, path, data)

    def _group(self, directory: Path) -> _GroupSync | None:
        syncfs = self._syncfs
        if syncfs is None:
            return None
        device = os.stat(directory).st_dev
        group = self._syncs.get(device)
        if group is None:
            with self._lock:
                group = self._syncs.setdefault(device, _GroupSync(syncfs))
        return group

    def _write(self, path: Path, data: bytes) -> None:
        group = self._group(path.parent) if path.parent.is_dir() else None
        temporary = _stage(path, data, sync=self._syncfs is None)
        try:
            if self._syncfs is not None:
                if group is None:
                    group = self._group(path.parent)
                assert group is not None
                group.sync(path.parent)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


_WRITER = _ImageWriter()


async def store_image(
    data: bytes,
    path: Path,
    *,
    url: str | None,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Path:
    """Check that ``data`` is a PNG, JPEG or WebP image and write it atomically and
    durably to ``path`` with the matching suffix, on a writer thread (never blocking the
    event loop); return the path written.

    ``url`` (or None for a ``b64_json`` image) and ``content_type`` only name the source
    in the `ImageDownloadError` raised when the bytes are not an image or too many.

    Example::

        await store_image(png_bytes, Path("out/fox"), url=None)  # PosixPath('out/fox.png')
    """
    if len(data) > max_bytes:
        raise ImageDownloadError(
            f"The image {'in b64_json' if url is None else 'from ' + redact_url(url)} is "
            f"{len(data)} bytes, over the "
            f"{max_bytes}-byte cap (max_image_bytes)",
            url=url,
            path=str(path),
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
            path=str(path),
            content_type=content_type,
        )
    target = _with_suffix(path, kind)
    # Off the event loop, on the writer's threads; see _ImageWriter.
    await asyncio.wrap_future(_WRITER.submit(target, data))
    return target


def _content_type(headers: Mapping[str, str]) -> str | None:
    """The Content-Type, whatever the case of its name (a transport's headers may be a
    plain dict)."""
    value = headers.get("Content-Type")
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    return value


def _origin(url: yarl.URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower(), url.port)


@attrs.frozen(kw_only=True)
class Downloader:
    """What saves images for one client: its transport, retry policy and key rule.

    Made by `FluxClient.downloader`; `Image.save`, `ImagesResponse.save`,
    `FluxClient.save` and the fan-out's ``save_to=`` all use it. ``api_headers`` (the
    client's own, ``Authorization`` included) go only to URLs on ``api_origin``, the
    scheme, host and port of ``base_url``; any other URL gets a ``User-Agent`` and an
    ``Accept`` header, nothing else. ``max_bytes`` caps one image (`DEFAULT_MAX_IMAGE_BYTES`).

    Example::

        downloader = client.downloader
        path = await downloader.save(image.url, image.b64_json, Path("out/fox"))
    """

    transport: AsyncTransport
    policy: RetryPolicy
    api_origin: str
    api_headers: Mapping[str, str]
    timeout: Timeout = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    is_closed: Callable[[], bool] = attrs.field(default=lambda: False, repr=False)
    _api: tuple[str, str, int | None] = attrs.field(init=False, repr=False)
    _plain_headers: Mapping[str, str] = attrs.field(init=False, repr=False)

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
            error: APIError
            status: int | None = None
            content_type: str | None = None
            try:
                answer = await self.transport.send(request)
            except APIConnectionError as exc:
                error = exc
            else:
                status = answer.status
                content_type = _content_type(answer.headers)
                if status < 300:
                    if answer.truncated:
                        raise ImageDownloadError(
                            f"The image at {redact_url(url)} is over the {self.max_bytes}-byte "
                            "cap (max_image_bytes); it was not read",
                            url=url,
                            status_code=status,
                            content_type=content_type,
                            download_attempts=attempts,
                        )
                    return answer.body, content_type, attempts
                json_like = (content_type or "").lower().startswith("application/json")
                error = error_for_status(
                    status,
                    error_body(answer.body, expect_json=json_like),
                    headers=answer.headers,
                    retry_after=parse_retry_after(answer.headers),
                )
            if isinstance(error, RateLimitError):
                rate_limited += 1
            else:
                failures += 1
            remaining = None if deadline_at is None else deadline_at - loop.time()
            decision = decide_retry(
                policy, error, failures=failures, rate_limited=rate_limited, remaining=remaining
            )
            if not decision.retry:
                raise ImageDownloadError(
                    f"Could not download the image at {redact_url(url)} after {attempts} "
                    f"attempt(s): {error}",
                    url=url,
                    status_code=status,
                    content_type=content_type,
                    download_attempts=attempts,
                ) from error
            await asyncio.sleep(0 if policy.testing else decision.wait)

    async def save(self, url: str | None, b64_json: str | None, path: Path) -> Path:
        """Fetch ``url`` (or decode ``b64_json``), check it is an image and write it to
        ``path`` with the suffix of its type; return the path written.

        Example::

            await client.downloader.save(image.url, image.b64_json, Path("out/fox"))
        """
        if b64_json is not None:
            data = decode_b64(b64_json)
            content_type = None
            url = None
        elif url is not None:
            data, content_type, _ = await self.fetch(url)
        else:
            raise ImageDownloadError("This image has neither a url nor b64_json: nothing to save")
        try:
            return await store_image(
                data, path, url=url, content_type=content_type, max_bytes=self.max_bytes
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
        paths = image_paths(directory, stem, len(images))
        if len(images) == 1:
            ((url, b64),) = images
            return [await self.save(url, b64, paths[0])]
        tasks = [
            asyncio.ensure_future(self.save(url, b64, path))
            for (url, b64), path in zip(images, paths, strict=True)
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
