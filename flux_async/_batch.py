"""The bulk job behind ``flux-async batch``: input, output directory, manifest, resume.

A batch directory holds::

    DIR/batch.json       the input's fingerprint, its size and the file-name width
    DIR/manifest.jsonl   one JSON object per finished prompt, appended as each ends
    DIR/images/          the images, named <index>-<slug of the prompt>.<png|jpg|webp>
    DIR/gallery.html     every saved image with its prompt, failures with their error

The manifest is the truth: a prompt is done when its last record says ``"ok"`` and its
files exist. Images are written atomically before their record, and a record is one
``write`` of a whole line, so after a ``kill -9`` at any moment the manifest holds
complete records of complete files (a torn last line is ignored and fenced off with a
newline before anything is appended). Rerunning resumes: prompts done are skipped, the
rest run; the only prompts generated twice are those in flight at the kill.

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
import os
import queue
import re
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from ._exceptions import APIStatusError, BatchStoppedError, ValidationError
from ._fanout import BuildRequest, Fanout, GenerationResult, to_request
from ._models import ImageRequest
from ._save import write_atomic

__all__ = [
    "GALLERY",
    "IMAGES",
    "MANIFEST",
    "STATE",
    "BatchDirectory",
    "BatchError",
    "Plan",
    "Source",
    "effective_records",
    "request_key",
    "run_batch",
    "slug",
    "thread_lines",
]

STATE: Final = "batch.json"
MANIFEST: Final = "manifest.jsonl"
IMAGES: Final = "images"
GALLERY: Final = "gallery.html"
_STATE_VERSION: Final = 1
# Lines read ahead of the fan-out; bounds memory however long the input is.
_READ_AHEAD: Final = 1024
_SLUG_LENGTH: Final = 40


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
        raise BatchError(f"{where}:{number}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class _Scan:
    total: int
    fingerprint: str


def _scan(
    source: Source,
    build: BuildRequest,
    fields: Mapping[str, Any],
    records: Mapping[int, Mapping[str, Any]],
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
        _check_key(records, index, hashlib.sha256(canonical).hexdigest()[:16], source, number)
        index += 1
    return _Scan(total=index, fingerprint=digest.hexdigest())


def _check_key(
    records: Mapping[int, Mapping[str, Any]], index: int, key: str, source: Source, number: int
) -> None:
    record = records.get(index)
    if record is not None and record.get("key") not in (None, key):
        raise BatchError(
            f"{source.name}:{number}: prompt #{index} is not the one this directory was made "
            f"from ({record.get('prompt')!r}): use another --out for another input"
        )


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
    """

    def __init__(self, path: Path) -> None:
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
        self._lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump, name="flux-async-manifest")
        self._thread.start()
        self._error: OSError | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        self._lines.put(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def _pump(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                self._error = exc

    def close(self) -> None:
        """Write what is queued, then close (blocking: call it in a thread)."""
        self._lines.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None:
            raise self._error


# -- the run ---------------------------------------------------------------------------------


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
    #: Filled in while running: prompts read, results recorded, the input's first bad
    #: line (stdin), the fan-out (for its statistics).
    read: int = 0
    recorded: int = 0
    input_error: BatchError | None = None
    fanout: Fanout | None = None
    lock: IO[bytes] | None = None
    started: float = field(default_factory=time.monotonic)

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
        records = effective_records(directory.manifest)
        if source.streaming:
            total = None
            fingerprint = None
        else:
            try:
                scan = _scan(source, build, fields, records)
            except OSError as exc:
                raise BatchError(f"cannot read {source.name}: {exc.strerror or exc}") from None
            total, fingerprint = scan.total, scan.fingerprint
            if total == 0:
                raise BatchError(f"{source.name} holds no prompt (only blank or # lines)")
        if state is not None and fingerprint is not None:
            made_from = state.get("fingerprint")
            if made_from is not None and made_from != fingerprint:
                raise BatchError(
                    f"{root} was made from another input ({state.get('input')}, "
                    f"{state.get('prompts')} prompts, fingerprint {str(made_from)[:12]}); "
                    f"{source.name} has fingerprint {fingerprint[:12]}: use another --out"
                )
        lock = directory.claim()
        if state is not None:
            width = int(state.get("width", 6))
            run = int(state.get("runs", 0)) + 1
        else:
            width = 6 if total is None else max(4, len(str(total - 1)))
            run = 1
        return cls(
            source=source,
            directory=directory,
            build=build,
            fields=fields,
            retry_failed=retry_failed,
            total=total,
            fingerprint=fingerprint,
            width=width,
            records=records,
            done=directory.done(records),
            run=run,
            lock=lock,
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
            "runs": self.run,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomic(self.directory.state, json.dumps(state, indent=2).encode() + b"\n")

    def wanted(self, index: int) -> bool:
        """Whether prompt ``index`` runs this time.

        Example::

            [i for i in range(plan.total) if plan.wanted(i)]
        """
        if index in self.done:
            return False
        if self.retry_failed:
            record = self.records.get(index)
            return record is not None
        return True

    def stem(self, index: int, prompt: str) -> str:
        """The file name of prompt ``index``'s images, without suffix.

        Example::

            plan.stem(7, "a red fox")  # '0007-a-red-fox'
        """
        return f"{index:0{self.width}d}-{slug(prompt)}"

    async def items(self, origin: dict[int, int]) -> AsyncIterator[ImageRequest]:
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
                    _check_key(self.records, index, request_key(request), source, number)
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
        """The manifest record of one finished prompt.

        Example::

            plan.record(7, result)  # {'index': 7, 'status': 'ok', 'files': [...], ...}
        """
        root = self.directory.root
        record: dict[str, Any] = {
            "index": index,
            "prompt": result.prompt,
            "status": "ok" if result.ok else "failed",
            "files": [p.relative_to(root).as_posix() for p in result.files],
            "attempts": result.attempts,
            "elapsed": round(result.elapsed, 3),
            "request_id": None if result.response is None else result.response.request_id,
            "key": None if result.request is None else request_key(result.request),
            "run": self.run,
        }
        error = result.error
        if error is not None:
            info: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
            status = getattr(error, "status_code", None)
            if isinstance(error, APIStatusError) or isinstance(status, int):
                info["status_code"] = status
            if isinstance(error, BatchStoppedError):
                info["not_sent"] = error.attempts == 0
            record["error"] = info
            if result.response is not None:
                # Generated but not saved: the URLs, while they last.
                record["urls"] = result.response.urls
        return record


async def _memory_lines(lines: list[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


async def run_batch(
    plan: Plan,
    fanout: Callable[[AsyncIterator[ImageRequest], Path, Callable[[int, str], str]], Fanout],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run ``plan``: ``fanout(items, images_dir, stem)`` makes the fan-out (the caller's
    client and options); each result becomes a manifest record as it ends.

    Example::

        await run_batch(plan, lambda items, where, stem: client.iter_generate(
            items, save_to=where, save_stem=stem, concurrency=32))
    """
    origin: dict[int, int] = {}

    def stem(index: int, prompt: str) -> str:
        return plan.stem(origin[index], prompt)

    writer = await asyncio.to_thread(_ManifestWriter, plan.directory.manifest)
    try:
        plan.fanout = fanout(plan.items(origin), plan.directory.images, stem)

        def sink(result: GenerationResult) -> None:
            index = origin.pop(result.index)
            record = plan.record(index, result)
            writer.write(record)
            plan.recorded += 1
            plan.records[index] = record
            if on_record is not None:
                on_record(record)

        await plan.fanout.drain(sink)
    finally:
        # Shielded: an interrupted run still writes every record it handed over.
        await asyncio.shield(asyncio.to_thread(writer.close))
