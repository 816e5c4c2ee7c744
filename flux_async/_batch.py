"""The bulk job behind ``flux-async batch``: input, output directory, manifest, resume.

A batch directory holds::

    DIR/batch.json       the input's fingerprint, its size and the file-name width
    DIR/manifest.jsonl   JSON records, appended as prompts are generated and finished
    DIR/images/          the images, named <index>-<slug of the prompt>.<png|jpg|webp>
    DIR/gallery.html     every saved image with its prompt, failures with their error

The manifest is the truth, and its last record of a prompt is the one that counts: a
prompt is done when that record says ``"ok"`` and its files exist. Images are written
atomically before their record, and a record is one ``write`` of a whole line, so after
a ``kill -9`` at any moment the manifest holds complete records of complete files (a
torn last line is ignored and fenced off with a newline before anything is appended).

Every generation is paid for, so one whose images come as URLs is recorded
``"generated"``, with them, before they are fetched. Rerunning resumes: prompts done are
skipped; a prompt generated but not saved (``generated``, or ``failed`` with its URLs) is
fetched from its URLs first, and generated again only when they no longer work; the rest
run. The prompts generated twice are those in progress at the kill and not recorded
(at most ``concurrency``: answers on their way, ``b64_json`` images being written) and
those whose URLs had expired.

A file input is read twice: once before anything is sent (every line validated into a
request, the fingerprint computed), then lazily while the batch runs, so memory stays
O(concurrency) for any input size. Stdin is read once and validated as it is read.

This module is the command's engine and knows nothing of click or tqdm; ``_cli.py``
parses the options and draws the progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
import unicodedata
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeAlias

import attrs

from ._exceptions import (
    APIStatusError,
    BatchStoppedError,
    DeadlineExceededError,
    FluxError,
    ImageDownloadError,
    ImageSaveError,
    ValidationError,
    short_repr,
    shorten,
)
from ._fanout import BuildRequest, Fanout, GenerationResult, to_request
from ._fanout_save import not_saved
from ._models import ImageRequest, ImagesResponse
from ._save import Downloader, write_atomic
from ._writer_process import ProcessWriter

__all__ = [
    "GALLERY",
    "GENERATED",
    "IMAGES",
    "MANIFEST",
    "STATE",
    "BatchDirectory",
    "BatchError",
    "MakeFanout",
    "Plan",
    "Source",
    "effective_records",
    "request_key",
    "run_batch",
    "slug",
    "thread_lines",
]

STATE: Final = "batch.json"
#: The status of a prompt generated, its images (URLs) not yet saved.
GENERATED: Final = "generated"
MANIFEST: Final = "manifest.jsonl"
IMAGES: Final = "images"
GALLERY: Final = "gallery.html"
_STATE_VERSION: Final = 1
# Lines read ahead of the fan-out; bounds memory however long the input is.
_READ_AHEAD: Final = 1024
_SLUG_LENGTH: Final = 40

logger = logging.getLogger("flux_async")


class BatchError(Exception):
    """Bad input or a refused directory: one line, exit status 2, nothing sent.

    Example::

        raise BatchError("prompts.txt:40: line 40 is not JSON (Expecting value)")
    """


def slug(prompt: str) -> str:
    """A short, file-name-safe form of ``prompt``: ASCII lower-case words joined by ``-``.

    Example::

        slug("A red fox, in fresh snow!")  # 'a-red-fox-in-fresh-snow'
    """
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return text[:_SLUG_LENGTH].rstrip("-") or "prompt"


def _canonical(request: ImageRequest) -> bytes:
    return json.dumps(
        request.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    ).encode()


def request_key(request: ImageRequest) -> str:
    """What a request asks for, as 16 hex digits: the same prompt and fields, the same key.

    Every manifest record carries it, so a rerun can tell that prompt #i is still the
    prompt the directory was made from.

    Example::

        request_key(ImageRequest(prompt="a fox"))  # '3f0c...'
    """
    return hashlib.sha256(_canonical(request)).hexdigest()[:16]


# -- input -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Source:
    """Where the prompts come from: a file (``path``), stdin (``path="-"``) or, for the
    demo, ``lines`` in memory; ``jsonl`` when each line is a JSON object of fields.

    Example::

        Source(path="prompts.txt", jsonl=False)
    """

    path: str
    jsonl: bool
    lines: list[bytes] | None = None

    @property
    def name(self) -> str:
        """How messages name the input.

        Example::

            Source(path="-", jsonl=False).name  # '<stdin>'
        """
        return "<stdin>" if self.path == "-" else self.path

    @property
    def streaming(self) -> bool:
        """True for stdin: read once, validated as read, no fingerprint up front.

        Example::

            Source(path="-", jsonl=True).streaming  # True
        """
        return self.path == "-" and self.lines is None

    def open_lines(self) -> Iterator[bytes]:
        """The input's lines (files and in-memory inputs only), read blocking.

        Example::

            for raw in Source(path="prompts.txt", jsonl=False).open_lines(): ...
        """
        if self.lines is not None:
            yield from self.lines
            return
        with open(self.path, "rb") as stream:
            yield from stream


def _item(raw: bytes, number: int, jsonl: bool, where: str) -> Any:
    """One line as a prompt item, None for a blank or ``#`` line; `BatchError` when bad."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not prompt text.
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise BatchError(f"{where}:{number}: the line is not UTF-8 ({exc.reason})") from None
    if not text or text.startswith("#"):
        return None
    if not jsonl:
        return text
    try:
        item = json.loads(text)
    except ValueError as exc:
        raise BatchError(f"{where}:{number}: the line is not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise BatchError(
            f'{where}:{number}: a JSON line must be an object such as {{"prompt": "a fox"}}, '
            f"not {type(item).__name__}"
        )
    return item


def _request(item: Any, number: int, where: str, build: BuildRequest, fields: Any) -> ImageRequest:
    try:
        return to_request(build, item, fields)
    except ValidationError as exc:
        problem = _as_json(exc, item) if isinstance(item, dict) else str(exc)
        raise BatchError(f"{where}:{number}: {problem}") from None


def _as_json(exc: ValidationError, item: Mapping[str, Any]) -> str:
    """A JSONL line's bad field in the line's own terms (``"n": true``, ``null``), not
    Python's (``n=True``, ``None``)."""
    allowed = exc.allowed.replace("or None to omit it", "or null to omit it")
    if exc.value is None and exc.field not in item:
        return f'"{exc.field}" is missing: {allowed}'
    try:
        value = shorten(json.dumps(exc.value, ensure_ascii=False))
    except (TypeError, ValueError):
        value = short_repr(exc.value)
    return f'"{exc.field}": {value} is not allowed: {allowed}'


@dataclass(frozen=True, kw_only=True)
class _Scan:
    total: int
    fingerprint: str


def _scan(
    source: Source,
    build: BuildRequest,
    fields: Mapping[str, Any],
    records: Mapping[int, Mapping[str, Any]],
    changed: str,
) -> _Scan:
    """Pass 1 over a file: every line checked, the fingerprint computed, nothing kept.

    A line whose prompt differs from the one a record of the directory was made from is
    refused here too, before anything is sent.
    """
    digest = hashlib.sha256(b"flux-async batch 1\n")
    index = 0
    for number, raw in enumerate(source.open_lines(), 1):
        item = _item(raw, number, source.jsonl, source.name)
        if item is None:
            continue
        request = _request(item, number, source.name, build, fields)
        canonical = _canonical(request)
        digest.update(canonical + b"\n")
        key = hashlib.sha256(canonical).hexdigest()[:16]
        _check_key(records, index, key, request.prompt, changed, source, number)
        index += 1
    return _Scan(total=index, fingerprint=digest.hexdigest())


def _check_key(
    records: Mapping[int, Mapping[str, Any]],
    index: int,
    key: str,
    prompt: str,
    changed: str,
    source: Source,
    number: int,
) -> None:
    """`BatchError` when prompt ``index`` asks for something else than its record says:
    another prompt, or the same one with other fields (``changed``: the options that
    differ from the run that made the directory, as `_changed_options` says)."""
    record = records.get(index)
    if record is None or record.get("key") in (None, key):
        return
    where = f"{source.name}:{number}: prompt #{index}"
    if changed:
        raise BatchError(
            f"{where} is not what this directory was made with: the options differ from "
            f"the run that made it ({changed}); rerun with its options, or use another --out"
        )
    if record.get("prompt") == prompt:
        raise BatchError(
            f"{where} has the text of the one this directory was made from but other "
            "request fields (a JSONL field changed); restore them, or use another --out"
        )
    raise BatchError(
        f"{where} is not the one this directory was made from ({record.get('prompt')!r}): "
        "use another --out for another input"
    )


def _jsonable(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` as batch.json stores them (tuples as lists), for comparing runs."""
    value = json.loads(json.dumps(dict(fields), default=str))
    return value if isinstance(value, dict) else {}


def _changed_options(state: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> str:
    """The request options of this run that differ from the run that made the directory
    (``--aspect-ratio '1:1' then, '16:9' now``), or "" (none, or a directory made before
    batch.json recorded them)."""
    before = None if state is None else state.get("fields")
    if not isinstance(before, dict):
        return ""
    now = _jsonable(fields)
    return "; ".join(
        f"--{name.replace('_', '-')} {_shown(before.get(name))} then, {_shown(now.get(name))} now"
        for name in sorted(before.keys() | now.keys())
        if before.get(name) != now.get(name)
    )


def _shown(value: object) -> str:
    return "not given" if value is None else repr(value)


async def thread_lines(opener: Callable[[], Iterable[bytes]]) -> AsyncIterator[bytes]:
    """The lines ``opener()`` gives, read by a daemon thread: a pipe blocks for as long
    as its writer likes, and the loop (requests in flight, Ctrl-C) must never wait on it.
    A daemon thread, not the executor: a thread stuck on a read would hold up the exit.

    Example::

        async for raw in thread_lines(lambda: open("prompts.txt", "rb")): ...
    """
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    lines: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_READ_AHEAD)

    def put(item: bytes | BaseException | None) -> None:
        lines.put(item)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(ready.set)

    def pump() -> None:
        try:
            for line in opener():
                put(line)
        except BaseException as exc:  # handed to the reader, which raises it
            put(exc)
            return
        put(None)

    threading.Thread(target=pump, name="flux-async-batch-input", daemon=True).start()
    while True:
        ready.clear()
        try:
            item = lines.get_nowait()
        except queue.Empty:
            await ready.wait()
            continue
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _stdin_lines() -> Iterator[bytes]:
    # The raw descriptor, not sys.stdin.buffer: a daemon thread stuck inside a buffered
    # reader's lock aborts the interpreter's exit.
    fd = 0
    pending = b""
    while chunk := os.read(fd, 65536):
        *complete, pending = (pending + chunk).split(b"\n")
        yield from complete
    if pending:
        yield pending


# -- the directory ---------------------------------------------------------------------------


def effective_records(path: Path) -> dict[int, dict[str, Any]]:
    """The last record of each prompt in a manifest (a torn or foreign line is skipped).

    Example::

        records = effective_records(Path("out/manifest.jsonl"))
        ok = sum(r["status"] == "ok" for r in records.values())
    """
    records: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return records
    with open(path, "rb") as stream:
        for raw in stream:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # the torn last line of a run killed mid-write
            if isinstance(record, dict) and type(record.get("index")) is int:
                records[record["index"]] = record
    return records


@dataclass(kw_only=True)
class BatchDirectory:
    """``DIR`` of one batch: its state file, manifest, images and gallery.

    Example::

        directory = BatchDirectory(Path("out"))
        directory.manifest  # PosixPath('out/manifest.jsonl')
    """

    root: Path

    @property
    def state(self) -> Path:
        """``DIR/batch.json``."""
        return self.root / STATE

    @property
    def manifest(self) -> Path:
        """``DIR/manifest.jsonl``."""
        return self.root / MANIFEST

    @property
    def images(self) -> Path:
        """``DIR/images``."""
        return self.root / IMAGES

    @property
    def gallery(self) -> Path:
        """``DIR/gallery.html``."""
        return self.root / GALLERY

    def read_state(self) -> dict[str, Any] | None:
        """The state of an earlier run, or None for a new directory.

        Example::

            BatchDirectory(root=Path("out")).read_state()  # {'fingerprint': ..., ...}
        """
        try:
            state = json.loads(self.state.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            raise BatchError(f"{self.state} is not a batch state file (not JSON)") from None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise BatchError(f"{self.state} was not written by this version of flux-async")
        return state

    def claim(self) -> IO[bytes] | None:
        """Make the directory and lock it for this process (held until the returned file
        is closed, or the process ends, ``kill -9`` included); then sweep the temporary
        files of writes a killed run left half-done. `BatchError` when another batch is
        writing here. None where file locks do not exist (Windows): no lock, no sweep.

        Example::

            lock = directory.claim()
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        lock = open(self.root / ".lock", "ab")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise BatchError(
                f"{self.root} is being written by another flux-async batch right now; "
                "wait for it to end, or use another --out"
            ) from None
        if self.images.is_dir():
            # Only a dead run's: no other process writes here while we hold the lock.
            for part in self.images.glob(".*.part"):
                part.unlink(missing_ok=True)
        return lock

    def done(self, records: Mapping[int, Mapping[str, Any]]) -> set[int]:
        """The prompts finished for good: last record ``ok`` and every file present.

        Example::

            directory.done(effective_records(directory.manifest))  # {0, 1, 3}
        """
        return {
            index
            for index, record in records.items()
            if record.get("status") == "ok"
            and record.get("files")
            and all((self.root / name).is_file() for name in record["files"])
        }


class _ManifestWriter:
    """Appends records from the loop without blocking it: a thread does the writes.

    One ``write`` per line, flushed at once: after a ``kill -9`` every record handed
    over a moment earlier is in the file (the kernel keeps what was written; fsync
    matters only for a power cut, and the images, which are fsynced, are the costly part).
    The first write that fails (a full disk) is handed to ``on_error`` on the event loop
    at once, not kept for `close`: a run that cannot record what it generates must stop.
    """

    def __init__(
        self,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[OSError], None],
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        if self._file.tell() > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    # A run killed mid-line: fence the torn line off so the next record
                    # starts on a line of its own.
                    self._file.write(b"\n")
                    self._file.flush()
        self._loop = loop
        self._on_error = on_error
        self._lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump, name="flux-async-manifest")
        self._thread.start()
        #: Records handed over that are not in the file (the first failed write's and
        #: every later one's: a line after a lost one could be read as torn).
        self.lost = 0

    def write(self, record: Mapping[str, Any]) -> None:
        self._lines.put(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def _pump(self) -> None:
        failed = False
        while (line := self._lines.get()) is not None:
            if failed:
                self.lost += 1
                continue
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                failed = True
                self.lost += 1
                with contextlib.suppress(RuntimeError):  # the loop has closed: close() says
                    self._loop.call_soon_threadsafe(self._on_error, exc)

    def close(self) -> None:
        """Write what is queued, then close (blocking: call it in a thread). A failed
        write was reported to ``on_error``; the file's own close cannot fail on top."""
        self._lines.put(None)
        self._thread.join()
        with contextlib.suppress(OSError):  # what it could not flush was counted lost
            self._file.close()


# -- the run ---------------------------------------------------------------------------------


def _read_input(
    source: Source,
    build: BuildRequest,
    fields: Mapping[str, Any],
    records: Mapping[int, Any],
    changed: str,
) -> _Scan | None:
    """Pass 1 over a file input (None for stdin, checked as it is read instead)."""
    if source.streaming:
        return None
    try:
        scan = _scan(source, build, fields, records, changed)
    except OSError as exc:
        raise BatchError(f"cannot read {source.name}: {exc.strerror or exc}") from None
    if scan.total == 0:
        raise BatchError(f"{source.name} holds no prompt (only blank or # lines)")
    return scan


def _check_made_from(
    state: Mapping[str, Any] | None, scan: _Scan | None, source: Source, root: Path, changed: str
) -> None:
    """Refuse a directory whose batch.json names another input than ``source``."""
    if state is None or scan is None:
        return
    made_from = state.get("fingerprint")
    if made_from is None or made_from == scan.fingerprint:
        return
    if changed:
        raise BatchError(
            f"{root} was made with other options ({changed}); rerun with its options, or "
            "use another --out"
        )
    raise BatchError(
        f"{root} was made from another input ({state.get('input')}, "
        f"{state.get('prompts')} prompts, fingerprint {str(made_from)[:12]}); "
        f"{source.name} has fingerprint {scan.fingerprint[:12]}: use another --out"
    )


def _recorded_urls(record: Mapping[str, Any]) -> list[str] | None:
    """The image URLs of a prompt generated but not saved, from its last record
    (``generated``, or ``failed`` with the URLs of its answer); else None."""
    urls = record.get("urls")
    if record.get("status") not in (GENERATED, "failed") or not isinstance(urls, list):
        return None
    if not urls or not all(isinstance(url, str) for url in urls):
        return None
    return urls if isinstance(record.get("prompt"), str) else None


def _error_info(error: BaseException) -> dict[str, Any]:
    """A record's ``error``: its type, message, status and whether it was sent."""
    info: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    status = getattr(error, "status_code", None)
    if isinstance(error, APIStatusError) or isinstance(status, int):
        info["status_code"] = status
    if isinstance(error, APIStatusError) and error.code is not None:
        info["code"] = error.code  # the provider's, e.g. "content_policy_violation"
    if isinstance(error, BatchStoppedError):
        info["not_sent"] = error.attempts == 0
    return info


@dataclass(kw_only=True)
class Plan:
    """One run of a batch: what to read, where to write, what to skip.

    Built by `Plan.prepare` before anything is sent (that is where bad input and a
    directory made from another input are refused); `run_batch` then runs it.

    Example::

        plan = Plan.prepare(source, directory, build=client.build_request, fields={},
                            retry_failed=False)
        print(plan.total, len(plan.done))
    """

    source: Source
    directory: BatchDirectory
    build: BuildRequest
    fields: Mapping[str, Any]
    retry_failed: bool
    total: int | None
    fingerprint: str | None
    width: int
    records: dict[int, dict[str, Any]]
    done: set[int]
    run: int
    #: Filled in while running: prompts read, prompts finished (ok or failed), the
    #: input's first bad line (stdin), the fan-out (for its statistics).
    read: int = 0
    recorded: int = 0
    input_error: BatchError | None = None
    fanout: Fanout | None = None
    lock: IO[bytes] | None = None
    started: float = field(default_factory=time.monotonic)
    #: Prompts an earlier run generated but did not save that this run took from the
    #: URLs it recorded (not sent again), and how many of them it saved.
    refetched: set[int] = field(default_factory=set)
    resumed: int = 0
    #: The options that differ from the run that made the directory (`_changed_options`).
    changed: str = ""
    #: The first write of the manifest that failed (the run stopped taking prompts), and
    #: how many records are not in it because of it.
    manifest_error: OSError | None = None
    lost_records: int = 0

    @classmethod
    def prepare(
        cls,
        source: Source,
        directory: BatchDirectory,
        *,
        build: BuildRequest,
        fields: Mapping[str, Any],
        retry_failed: bool,
    ) -> Plan:
        """Check the input and the directory; `BatchError` (exit 2) when either is bad.

        Blocking (it reads the whole file once): call it before the event loop starts.

        Example::

            Plan.prepare(Source(path="p.txt", jsonl=False), BatchDirectory(root=Path("out")),
                         build=client.build_request, fields={}, retry_failed=False)
        """
        root = directory.root
        if root.exists() and not root.is_dir():
            raise BatchError(f"--out {root} is a file, not a directory")
        state = directory.read_state()
        changed = _changed_options(state, fields)
        records = effective_records(directory.manifest)
        scan = _read_input(source, build, fields, records, changed)
        _check_made_from(state, scan, source, root, changed)
        lock = directory.claim()
        if state is not None:
            width = int(state.get("width", 6))
            run = int(state.get("runs", 0)) + 1
        else:
            width = 6 if scan is None else max(4, len(str(scan.total - 1)))
            run = 1
        return cls(
            source=source,
            directory=directory,
            build=build,
            fields=fields,
            retry_failed=retry_failed,
            total=None if scan is None else scan.total,
            fingerprint=None if scan is None else scan.fingerprint,
            width=width,
            records=records,
            done=directory.done(records),
            run=run,
            lock=lock,
            changed=changed,
        )

    def save_state(self) -> None:
        """Write ``DIR/batch.json`` (atomically; blocking) before the first prompt is sent.

        Example::

            plan.save_state()
        """
        state = {
            "version": _STATE_VERSION,
            "input": self.source.name,
            "prompts": self.total,
            "fingerprint": self.fingerprint,
            "width": self.width,
            "fields": _jsonable(self.fields),
            "runs": self.run,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomic(self.directory.state, json.dumps(state, indent=2).encode() + b"\n")

    def wanted(self, index: int) -> bool:
        """Whether prompt ``index`` runs this time.

        Example::

            [i for i in range(plan.total) if plan.wanted(i)]
        """
        if index in self.done or index in self.refetched:
            return False
        if self.retry_failed:
            record = self.records.get(index)
            return record is not None
        return True

    def resumable(self) -> list[tuple[int, list[str]]]:
        """The prompts to run that an earlier run generated but did not save, with the
        image URLs it recorded: a rerun fetches these before generating anything.

        Example::

            plan.resumable()  # [(7, ['https://cdn.example/7.png?sig=...'])]
        """
        found = []
        for index, record in sorted(self.records.items()):
            urls = _recorded_urls(record)
            if urls is not None and self.wanted(index):
                found.append((index, urls))
        return found

    def stem(self, index: int, prompt: str) -> str:
        """The file name of prompt ``index``'s images, without suffix.

        Example::

            plan.stem(7, "a red fox")  # '0007-a-red-fox'
        """
        return f"{index:0{self.width}d}-{slug(prompt)}"

    async def items(self, origin: dict[int, int]) -> AsyncGenerator[ImageRequest, None]:
        """Pass 2: the requests to run, read as the fan-out asks; ``origin`` maps the
        fan-out's index of each to the prompt's index in the input."""
        source = self.source
        if source.lines is not None:
            lines: AsyncIterator[bytes] = _memory_lines(source.lines)
        elif source.streaming:
            lines = thread_lines(_stdin_lines)
        else:
            lines = thread_lines(source.open_lines)
        index = 0
        number = 0
        taken = 0
        async for raw in lines:
            number += 1
            try:
                item = _item(raw, number, source.jsonl, source.name)
                if item is None:
                    continue
                if not self.wanted(index) and not source.streaming:
                    index += 1
                    continue
                request = _request(item, number, source.name, self.build, self.fields)
                if source.streaming:
                    key = request_key(request)
                    _check_key(
                        self.records, index, key, request.prompt, self.changed, source, number
                    )
            except BatchError as exc:
                # Stdin is validated as read: the prompts before this line still finish.
                self.input_error = exc
                return
            current = index
            index += 1
            self.read = index
            if source.streaming and not self.wanted(current):
                continue
            origin[taken] = current
            taken += 1
            yield request
        self.read = index

    def record(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The manifest record of one finished prompt (``ok`` or ``failed``).

        Example::

            plan.record(7, result)  # {'index': 7, 'status': 'ok', 'files': [...], ...}
        """
        root = self.directory.root
        response, request = result.response, result.request
        record: dict[str, Any] = {
            "index": index,
            "prompt": result.prompt,
            "status": "ok" if result.ok else "failed",
            "files": [p.relative_to(root).as_posix() for p in result.files],
            "attempts": result.attempts,
            "elapsed": round(result.elapsed, 3),
            # A failed call's id is on its error (the server sent one with its answer).
            "request_id": getattr(result.error, "request_id", None)
            if response is None
            else response.request_id,
            "key": None if request is None else request_key(request),
            "run": self.run,
        }
        if result.ok and request is not None and len(result.files) < request.n:
            # The server sent fewer images than asked: ok (they are paid and saved), but
            # said, here and in the summary; --retry-failed does not redo it.
            record["missing"] = request.n - len(result.files)
        if result.error is not None:
            record["error"] = _error_info(result.error)
            response = result.response
            if response is not None and len(response.urls) == len(response.data):
                # Generated but not saved: the URLs, while they last (a rerun tries
                # them before generating again).
                record["urls"] = response.urls
        return record

    def generated(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The record of a prompt whose images came as URLs, written before they are
        fetched: what a rerun fetches them from if this run dies before saving them.

        Example::

            plan.generated(7, result)  # {'index': 7, 'status': 'generated', 'urls': [...]}
        """
        record = self.record(index, result)
        assert result.response is not None
        record["status"] = GENERATED
        record["urls"] = result.response.urls
        return record

    def refetch_record(
        self,
        index: int,
        earlier: Mapping[str, Any],
        elapsed: float,
        outcome: Sequence[Path] | BaseException,
    ) -> dict[str, Any]:
        """The record of a prompt saved from the URLs an earlier run recorded, without
        generating it again: ``outcome`` is its files, or the error that kept them from
        being written (the URLs are then kept for the next run).

        Example::

            plan.refetch_record(7, plan.records[7], 0.2, [Path("out/images/0007-a-fox.png")])
        """
        files = [] if isinstance(outcome, BaseException) else outcome
        record: dict[str, Any] = {
            "index": index,
            "prompt": earlier.get("prompt"),
            "status": "failed" if isinstance(outcome, BaseException) else "ok",
            "files": [p.relative_to(self.directory.root).as_posix() for p in files],
            "attempts": earlier.get("attempts"),
            "elapsed": round(elapsed, 3),
            "request_id": earlier.get("request_id"),
            "key": earlier.get("key"),
            "run": self.run,
            "resumed": True,
        }
        if isinstance(outcome, BaseException):
            record["urls"] = earlier["urls"]
            record["error"] = _error_info(outcome)
        return record


async def _memory_lines(lines: list[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


#: Makes the fan-out of a run from its requests and the seconds left of --batch-deadline
#: (None: no deadline): the caller's client and options, without ``save_to``.
MakeFanout: TypeAlias = Callable[[AsyncIterator[ImageRequest], float | None], Fanout]


def _not_saved(
    exc: BaseException, response: ImagesResponse, attempts: int, count: int
) -> BaseException:
    """The error of a prompt generated but not saved, as a fan-out's with ``save_to=``
    (`not_saved`), or the batch deadline's if that passed first: each says the
    generation succeeded."""
    if not isinstance(exc, TimeoutError):
        return not_saved(exc, response, attempts, count)
    images = "its image" if count == 1 else f"one of its {count} images"
    where = f" (request_id {response.request_id})" if response.request_id else ""
    return DeadlineExceededError(
        f"The generation succeeded{where} but the batch deadline passed before {images} was saved"
    )


class _Run:
    """One run of a plan: the manifest, the bound on prompts in progress, the saving.

    The fan-out runs without ``save_to``: this saves each generated prompt itself, so
    that a prompt whose images come as URLs is recorded ``generated`` (with them) before
    they are fetched, and ``ok`` once its files are written. A prompt holds a place from
    the moment it is read until its last record is written, so at most ``concurrency``
    prompts are ever in progress: generating, or generated and being saved.
    """

    def __init__(
        self,
        plan: Plan,
        writer: _ManifestWriter,
        downloader: Downloader,
        concurrency: int,
        on_record: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.plan = plan
        self.writer = writer
        self.downloader = downloader
        self.on_record = on_record
        self.places = asyncio.Semaphore(concurrency)
        self.origin: dict[int, int] = {}
        self.saves: set[asyncio.Task[None]] = set()
        self.deadline_at: float | None = None

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        self.plan.records[record["index"]] = record
        if record["status"] != GENERATED:
            self.plan.recorded += 1
        if self.on_record is not None:
            self.on_record(record)

    async def save_images(
        self, images: Sequence[tuple[str | None, str | None]], index: int, prompt: str
    ) -> list[Path]:
        """Save one prompt's images under its stem; TimeoutError at --batch-deadline."""
        stem = self.plan.stem(index, prompt)
        # timeout_at(None) never expires.
        async with asyncio.timeout_at(self.deadline_at):
            return await self.downloader.save_all(images, self.plan.directory.images, stem)

    async def refetch(self, index: int, urls: list[str]) -> None:
        """Save prompt ``index`` from the URLs an earlier run recorded. URLs that no longer
        work (expired, gone) leave it to be generated again; a write that fails records
        it failed, URLs kept, and it is not generated again this run."""
        earlier = self.plan.records[index]
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self.places:
            try:
                paths = await self.save_images(
                    [(url, None) for url in urls], index, earlier["prompt"]
                )
            except (ImageDownloadError, TimeoutError) as exc:
                logger.info(
                    "prompt #%d: the image URLs recorded by run %s could not be fetched (%s); "
                    "it is generated again",
                    index,
                    earlier.get("run"),
                    exc,
                )
                return
            except (ImageSaveError, OSError) as exc:
                outcome: list[Path] | BaseException = exc
            else:
                outcome = paths
                self.plan.resumed += 1
            self.plan.refetched.add(index)
            self.write(self.plan.refetch_record(index, earlier, loop.time() - started, outcome))

    async def requests(self) -> AsyncIterator[ImageRequest]:
        """The plan's requests, each handed over once it has a place."""
        async with contextlib.aclosing(self.plan.items(self.origin)) as requests:
            while True:
                await self.places.acquire()
                if self.plan.manifest_error is not None:
                    self.places.release()
                    return
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    self.places.release()
                    return
                except BaseException:
                    self.places.release()
                    raise
                yield request

    def sink(self, result: GenerationResult) -> None:
        """A generation has ended: record a failure; save what succeeded."""
        index = self.origin.pop(result.index)
        response = result.response
        if result.error is not None or response is None:
            self.write(self.plan.record(index, result))
            self.places.release()
            return
        if len(response.urls) == len(response.data):
            # Handed to the manifest before the first byte is fetched: if this run dies
            # before the files are written, a rerun fetches them instead of paying again.
            self.write(self.plan.generated(index, result))
        task = asyncio.get_running_loop().create_task(self.save(index, result, response))
        self.saves.add(task)
        task.add_done_callback(self.saves.discard)

    async def save(self, index: int, result: GenerationResult, response: ImagesResponse) -> None:
        images = [(image.url, image.b64_json) for image in response.data]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            try:
                paths = await self.save_images(images, index, result.prompt or "")
            except (ImageSaveError, OSError, TimeoutError) as exc:
                error = _not_saved(exc, response, result.attempts, len(images))
                saved = attrs.evolve(result, error=error)
            except Exception as exc:
                # A bug must not stall a long batch: the prompt ends with it, and its
                # place is freed for the next.
                logger.exception("prompt #%d: saving its images failed unexpectedly", index)
                saved = attrs.evolve(result, error=exc)
            else:
                saved = attrs.evolve(result, files=tuple(paths))
            fanout = self.plan.fanout
            if fanout is not None and (saved.error is None or isinstance(saved.error, FluxError)):
                # A full disk or a broken image host stops the fan-out, as with save_to=.
                fanout.report_save(result.index, saved.error)
            elapsed = result.elapsed + loop.time() - started
            self.write(self.plan.record(index, attrs.evolve(saved, elapsed=elapsed)))
        finally:
            self.places.release()

    async def run(self, fanout: MakeFanout, batch_deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        if batch_deadline is not None:
            self.deadline_at = loop.time() + batch_deadline
        left = batch_deadline
        resumable = self.plan.resumable()
        if resumable:
            await asyncio.gather(*(self.refetch(i, urls) for i, urls in resumable))
            left = None if self.deadline_at is None else self.deadline_at - loop.time()
            if left is not None and left <= 0:
                return
        # Without images to fetch first, the fan-out gets the deadline as given, so the
        # errors it gives prompts cut off by it name the user's figure (1.2 s, not 1.19998).
        self.plan.fanout = fanout(self.requests(), left)
        cancelled = False
        try:
            await self.plan.fanout.drain(self.sink)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # Every prompt generated is saved, or recorded as not saved, before the run
            # ends; only an interrupt cuts the saves short (their URLs are recorded).
            if cancelled:
                for task in self.saves:
                    task.cancel()
            await asyncio.gather(*self.saves, return_exceptions=True)


async def run_batch(
    plan: Plan,
    fanout: MakeFanout,
    downloader: Downloader,
    *,
    concurrency: int,
    batch_deadline: float | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run ``plan``: first save what an earlier run generated but did not save, from the
    URLs it recorded; then ``fanout(requests, seconds_left)`` makes the fan-out (the
    caller's client and options, without ``save_to``), and each generated prompt's images
    are saved with ``downloader``. At most ``concurrency`` prompts are in progress; each
    record is handed to ``on_record`` too.

    Example::

        await run_batch(
            plan,
            lambda requests, left: client.iter_generate(requests, batch_deadline=left),
            client.downloader,
            concurrency=16,
        )
    """

    def broken(exc: OSError) -> None:
        # No prompt is taken any more (`_Run.requests`): what it would generate could
        # not be recorded, so a rerun would pay for it again.
        if plan.manifest_error is None:
            plan.manifest_error = exc
            logger.info("writing the manifest failed (%s): no more prompts are taken", exc)

    loop = asyncio.get_running_loop()
    writer = await asyncio.to_thread(_ManifestWriter, plan.directory.manifest, loop, broken)
    # Images are written from a process of its own, as a fan-out's with save_to= are.
    images = ProcessWriter()
    try:
        await _Run(plan, writer, downloader.with_writer(images), concurrency, on_record).run(
            fanout, batch_deadline
        )
    finally:
        try:
            await images.aclose()
        finally:
            # Shielded: an interrupted run still writes every record it handed over.
            await asyncio.shield(asyncio.to_thread(writer.close))
            plan.lost_records = writer.lost
