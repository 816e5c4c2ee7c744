"""The writer process of a fan-out with ``save_to=``: the child's protocol (`_files.serve`,
driven through pipes in this process), the shared-memory ring, and the process as a
fan-out uses it: every image written by it, its end with the fan-out, and the thread
taking over when it cannot start or dies."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import select
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

import flux_async._files as files
import flux_async._writer_process as writer_process
from flux_async import (
    FluxClient,
    ImageDownloadError,
    ImageSaveError,
    MockTransport,
    RetryPolicy,
    TransportResponse,
    ValidationError,
)
from flux_async._save import ImageJob, ImageWriter

from .conftest import API_KEY

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64

pytestmark = pytest.mark.skipif(not writer_process.can_start(), reason="no writer process here")


def b64_answer(data: bytes) -> TransportResponse:
    body = {"created": 1, "data": [{"b64_json": base64.b64encode(data).decode()}]}
    return TransportResponse(200, json=body)


def mock_client(handler: Any) -> FluxClient:
    return FluxClient(
        api_key=API_KEY,
        base_url="https://api.example/v1",
        transport=MockTransport(handler),
        retry=RetryPolicy.for_tests(),
    )


def job(number: int, directory: Path, name: str, payload: bytes, *, b64: bool = False) -> bytes:
    """A job as the parent sends it, its payload in the pipe."""
    data = base64.b64encode(payload) if b64 else payload
    folder, stem = os.fsencode(directory), os.fsencode(name)
    header = files.JOB.pack(
        number, files.B64 if b64 else 0, 10**6, len(folder), len(stem), len(data), files.INLINE
    )
    return header + folder + stem + data


def answers(data: bytes) -> list[tuple[int, int, bytes]]:
    found, at = [], 0
    while at < len(data):
        number, status, size = files.ANSWER.unpack_from(data, at)
        at += files.ANSWER.size
        found.append((number, status, data[at : at + size]))
        at += size
    return found


def serve_in_a_thread(source: int, sink: int, shared: memoryview | None = None) -> threading.Thread:
    thread = threading.Thread(target=files.serve, args=(source, sink, shared))
    thread.start()
    return thread


def listing(directory: Path) -> list[str]:
    """The sorted names in ``directory`` (a plain function: tests call it between awaits)."""
    return sorted(p.name for p in directory.iterdir())


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# -- the child's protocol ---------------------------------------------------------------------


def test_the_child_writes_each_job_and_answers_it_in_order(tmp_path: Path) -> None:
    """Bytes and base64 payloads, in the pipe and in shared memory; a name whose image
    suffix is set from the bytes; a payload that is no image is rejected (the parent
    redoes the check to say why); a directory that is a file is the OSError it is."""
    import mmap

    shared = mmap.mmap(-1, 4096)
    shared[100 : 100 + len(JPEG)] = JPEG
    (tmp_path / "file").write_bytes(b"x")
    folder, name = os.fsencode(tmp_path), b"in-shared.jpeg"
    from_shared = (
        files.JOB.pack(4, 0, 10**6, len(folder), len(name), len(JPEG), 100) + folder + name
    )
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    thread = serve_in_a_thread(source_r, sink_w, memoryview(shared))
    os.write(source_w, job(1, tmp_path, "a", PNG) + job(2, tmp_path, "b.png", PNG, b64=True))
    os.write(source_w, job(3, tmp_path, "c", b"<html>") + from_shared)
    os.write(source_w, job(5, tmp_path / "file", "d", PNG))
    os.close(source_w)
    thread.join(10)
    os.close(sink_w)
    os.close(source_r)
    found = answers(read_all(sink_r))
    assert [(n, s) for n, s, _ in found] == [
        (1, files.OK),
        (2, files.OK),
        (3, files.REJECTED),
        (4, files.OK),
        (5, files.OS_ERROR),
    ]
    assert found[0][2] == os.fsencode(tmp_path / "a.png")
    assert found[3][2] == os.fsencode(tmp_path / "in-shared.jpg")
    code, filename, _ = found[4][2].split(b"\0")
    assert int(code) != 0
    assert filename.startswith(os.fsencode(tmp_path / "file"))
    assert (tmp_path / "a.png").read_bytes() == PNG
    assert (tmp_path / "b.png").read_bytes() == PNG
    assert (tmp_path / "in-shared.jpg").read_bytes() == JPEG
    assert listing(tmp_path) == ["a.png", "b.png", "file", "in-shared.jpg"]


def test_the_child_takes_a_job_split_across_reads(tmp_path: Path) -> None:
    """A job arrives in pieces (a pipe carries what fits): nothing is written until it is
    whole, then it is."""
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    thread = serve_in_a_thread(source_r, sink_w)
    whole = job(7, tmp_path, "a", PNG)
    os.write(source_w, whole[:10])
    os.write(source_w, whole[10:])
    os.close(source_w)
    thread.join(10)
    os.close(sink_w)
    os.close(source_r)
    assert answers(read_all(sink_r)) == [(7, files.OK, os.fsencode(tmp_path / "a.png"))]


def test_the_child_answers_a_job_without_waiting_for_the_next(tmp_path: Path) -> None:
    """A round's answers wait for the next round's flush only while more jobs are coming:
    a parent that waits for each answer before sending the next job gets every one."""
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    thread = serve_in_a_thread(source_r, sink_w)
    try:
        for number in range(1, 4):
            os.write(source_w, job(number, tmp_path, f"{number}", PNG))
            # The child answers with the pipe still open (a child that waits for more
            # jobs first would leave this waiting for good).
            assert select.select([sink_r], [], [], 10)[0], f"job {number} was not answered"
            answer = os.read(sink_r, 1 << 16)
            assert answers(answer) == [(number, files.OK, os.fsencode(tmp_path / f"{number}.png"))]
    finally:
        os.close(source_w)
        thread.join(10)
        os.close(sink_w)
        os.close(source_r)
        os.close(sink_r)
    assert listing(tmp_path) == ["1.png", "2.png", "3.png"]


def flushes_seen(directory: Path) -> tuple[list[list[str]], Any]:
    """A syncfs that records what stood in ``directory`` at each flush."""
    seen: list[list[str]] = []

    def syncfs(fd: int) -> None:
        seen.append(listing(directory))

    return seen, syncfs


def round_of(tmp_path: Path, *names: str) -> list[tuple[int, tuple[str, bytes] | BaseException]]:
    return [(int(n), (str(tmp_path / f"{n}.png"), PNG + n.encode())) for n in names]


def test_a_round_is_answered_after_the_flush_that_follows_its_names(tmp_path: Path) -> None:
    """Under load, one flush a round: it makes this round's bytes durable and the last
    round's names, which are answered only then; the last round is answered after a flush
    of its own. Files are written unnamed (nothing stands under a temporary name), and a
    file already standing under a final name is replaced whole."""
    (tmp_path / "2.png").write_bytes(b"old")
    seen, syncfs = flushes_seen(tmp_path)
    rounds = files._Rounds(syncfs)
    try:
        assert rounds.write(round_of(tmp_path, "1", "2")) == []
        assert seen == [["2.png"]]  # the new bytes were flushed before any name was given
        assert rounds.unsettled
        second = rounds.write(round_of(tmp_path, "3"))
        assert seen == [["2.png"], ["1.png", "2.png"]]
        assert second == [(1, str(tmp_path / "1.png")), (2, str(tmp_path / "2.png"))]
        assert rounds.settle() == [(3, str(tmp_path / "3.png"))]
        assert seen[-1] == ["1.png", "2.png", "3.png"]
        assert not rounds.unsettled
        assert rounds.settle() == []
    finally:
        rounds.close()
    assert len(seen) == 3
    assert [(tmp_path / f"{n}.png").read_bytes() for n in "123"] == [
        PNG + n.encode() for n in "123"
    ]


def test_names_in_another_directory_are_made_durable_before_the_next_flush(
    tmp_path: Path,
) -> None:
    """The next round's flush is of its own directories: names given elsewhere are
    flushed, and answered, first."""
    seen, syncfs = flushes_seen(tmp_path)
    rounds = files._Rounds(syncfs)
    try:
        rounds.write(round_of(tmp_path, "1"))
        (tmp_path / "other").mkdir()
        due = rounds.write(round_of(tmp_path / "other", "2"))
        assert due == [(1, str(tmp_path / "1.png"))]
        assert len(seen) == 3  # round 1's bytes, round 1's names, round 2's bytes
        assert rounds.settle() == [(2, str(tmp_path / "other" / "2.png"))]
    finally:
        rounds.close()


def test_without_syncfs_each_round_is_answered_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no syncfs, each file is fsynced as it is written, renamed, and its
    directory fsynced before the round is answered."""
    synced: list[list[str]] = []
    real = files.fsync_directory

    def fsync_directory(directory: str) -> None:
        synced.append(listing(Path(directory)))
        real(directory)

    monkeypatch.setattr(files, "fsync_directory", fsync_directory)
    rounds = files._Rounds(None)
    try:
        assert rounds.write(round_of(tmp_path, "1", "2")) == [
            (1, str(tmp_path / "1.png")),
            (2, str(tmp_path / "2.png")),
        ]
        assert synced == [["1.png", "2.png"]]
        assert not rounds.unsettled
    finally:
        rounds.close()


def test_a_filesystem_without_unnamed_files_gets_temporary_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where O_TMPFILE is refused, files are written under a temporary name and renamed,
    with the same answers; the refusal is met once, not once a file."""
    import errno

    refused = 0
    real_open = os.open

    def no_unnamed(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        nonlocal refused
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            refused += 1
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", no_unnamed)
    seen, syncfs = flushes_seen(tmp_path)
    rounds = files._Rounds(syncfs)
    try:
        assert rounds.write(round_of(tmp_path, "1", "2")) == []
        assert all(name.endswith(".part") for name in seen[0])  # flushed under temporary names
        assert rounds.write(round_of(tmp_path, "3")) == [
            (1, str(tmp_path / "1.png")),
            (2, str(tmp_path / "2.png")),
        ]
        assert rounds.settle() == [(3, str(tmp_path / "3.png"))]
    finally:
        rounds.close()
    assert refused == 1
    assert listing(tmp_path) == ["1.png", "2.png", "3.png"]


def test_a_link_refused_names_the_file_the_other_way_from_then_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unnamed file whose link is refused (a sandbox hiding /proc's links) is written
    again under a temporary name, fsynced and renamed; the rest of the round and the
    rounds after it are named that way, with the same answers and the same bytes."""
    import errno

    links = 0
    fsynced: list[int] = []
    real_link, real_fsync = os.link, os.fsync

    def refused(*args: Any, **kwargs: Any) -> None:
        nonlocal links
        links += 1
        raise OSError(errno.EPERM, "Operation not permitted")

    def fsync(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "link", refused)
    monkeypatch.setattr(files.os, "fsync", fsync)
    seen, syncfs = flushes_seen(tmp_path)
    rounds = files._Rounds(syncfs)
    try:
        assert rounds.write(round_of(tmp_path, "1", "2")) == []
        assert seen == [[]]  # both were unnamed at the flush
        monkeypatch.setattr(files.os, "link", real_link)
        assert rounds.write(round_of(tmp_path, "3")) == [
            (1, str(tmp_path / "1.png")),
            (2, str(tmp_path / "2.png")),
        ]
        assert any(name.endswith(".part") for name in seen[1])  # 3: a temporary name
        assert rounds.settle() == [(3, str(tmp_path / "3.png"))]
    finally:
        rounds.close()
    assert links == 1
    # 1 and 2 written again after their round's syncfs, then the directory once 3 is
    # renamed (no file was linked: its fsync makes the names durable).
    assert len(fsynced) == 3
    assert listing(tmp_path) == ["1.png", "2.png", "3.png"]
    assert [(tmp_path / f"{n}.png").read_bytes() for n in "123"] == [
        PNG + n.encode() for n in "123"
    ]


def test_a_large_round_holds_a_bounded_number_of_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round holds an unnamed file's descriptor until it names it: beyond
    UNNAMED_PER_ROUND, its files get temporary names instead (a round of thousands of
    images would otherwise run out of descriptors), with the same answers."""
    monkeypatch.setattr(files, "UNNAMED_PER_ROUND", 2)
    descriptors: list[int] = []
    seen, record = flushes_seen(tmp_path)

    def syncfs(fd: int) -> None:
        descriptors.append(len(os.listdir("/proc/self/fd")))
        record(fd)

    before = len(os.listdir("/proc/self/fd"))
    rounds = files._Rounds(syncfs)
    try:
        assert rounds.write(round_of(tmp_path, "1", "2", "3", "4", "5")) == []
        assert rounds.settle() == [(n, str(tmp_path / f"{n}.png")) for n in range(1, 6)]
    finally:
        rounds.close()
    assert len([name for name in seen[0] if name.endswith(".part")]) == 3
    # /proc/self/fd's own, the directory being flushed, and the two unnamed files.
    assert descriptors[0] <= before + 4
    assert listing(tmp_path) == [f"{n}.png" for n in range(1, 6)]


def test_a_flush_that_fails_fails_its_round_and_leaves_no_file(tmp_path: Path) -> None:
    """The bytes' flush fails: every file of the round gets its error and none is named;
    the round before, named already, gets it too, as its names' flush fails (its file
    stands whole: a rerun replaces it)."""
    _seen, record = flushes_seen(tmp_path)
    failing = False

    def syncfs(fd: int) -> None:
        record(fd)
        if failing:
            raise OSError(5, "Input/output error")

    rounds = files._Rounds(syncfs)
    try:
        rounds.write(round_of(tmp_path, "1"))
        failing = True
        due = rounds.write(round_of(tmp_path, "2", "3"))
        failing = False
        assert [(n, type(o)) for n, o in due] == [(1, OSError)]
        assert [(n, type(o)) for n, o in rounds.settle()] == [(2, OSError), (3, OSError)]
    finally:
        rounds.close()
    assert listing(tmp_path) == ["1.png"]
    assert (tmp_path / "1.png").read_bytes() == PNG + b"1"


# -- the ring ---------------------------------------------------------------------------------


def test_the_ring_never_hands_out_space_still_in_use() -> None:
    """Random puts and in-order releases: every payload put stays intact until released,
    and a payload that does not fit is refused (None), never squeezed in."""
    ring = writer_process._Ring(4096)
    rng = random.Random(7)
    live: dict[int, tuple[int, bytes]] = {}
    released = 0
    try:
        for number in range(1, 3000):
            if live and rng.random() < 0.5:
                upto = rng.randint(released + 1, max(live))
                ring.release(upto)
                for done in [n for n in live if n <= upto]:
                    del live[done]
                released = upto
            data = bytes([number % 251]) * rng.randint(0, 1500)
            at = ring.put(number, data)
            if at is not None:
                live[number] = (at, data)
            for start, payload in live.values():
                assert ring.map[start : start + len(payload)] == payload
        assert ring.put(10**6, b"x" * 4097) is None
    finally:
        ring.close()


def test_the_ring_grows_to_what_is_in_flight_and_no_further() -> None:
    """Starting with one page of a 64-page reservation: payloads that do not fit make it
    go round twice as much (never past the reservation, never over space in use), up to
    twice what is in flight: small payloads a few at a time make it grow that far, and
    no further. While it is wrapped round, a payload that does not fit goes through the
    pipe (None): only until it has grown."""
    page = writer_process._PAGE
    ring = writer_process._Ring(64 * page, first=page)
    try:
        for number in range(1, 200):  # 3 quarter pages in flight at a time: 1.5 x 2
            assert ring.put(number, b"s" * (page // 4)) is not None
            ring.release(number - 2)
        assert ring.limit == 2 * page
        ring.release(10**6)
        rng = random.Random(3)
        live: dict[int, tuple[int, bytes]] = {}
        refused: list[int] = []
        for number in range(1000, 1600):
            if len(live) > 6:
                oldest = min(live)
                ring.release(oldest)
                del live[oldest]
            data = bytes([number % 251]) * rng.randint(1, 3 * page)
            at = ring.put(number, data)
            if at is None:
                refused.append(number)
                continue
            assert at + len(data) <= ring.limit <= 64 * page
            live[number] = (at, data)
            for start, payload in live.values():
                assert ring.map[start : start + len(payload)] == payload
        # At most 7 payloads of at most 3 pages in flight: grown to 32 pages, it holds them.
        assert 16 * page < ring.limit <= 64 * page
        assert len(refused) < 30, refused
        assert all(number < 1300 for number in refused), refused
        assert ring.put(10**7, b"x" * (64 * page + 1)) is None
    finally:
        ring.close()


# -- the process in a fan-out -----------------------------------------------------------------


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What the writer processes did: their answers, and the pipes that ended."""
    seen: dict[str, list[Any]] = {"answers": [], "ended": [], "writers": []}
    answered, lost = writer_process.ProcessWriter.answered, writer_process._Pipe.connection_lost
    init = writer_process.ProcessWriter.__init__

    def spy_init(self: Any, fallback: Any = None) -> None:
        init(self, fallback)
        seen["writers"].append(self)

    def spy_answered(self: Any, number: int, status: int, text: bytes, wakes: Any) -> None:
        seen["answers"].append(status)
        answered(self, number, status, text, wakes)

    def spy_lost(self: Any, exc: Exception | None) -> None:
        seen["ended"].append(exc)
        lost(self, exc)

    monkeypatch.setattr(writer_process.ProcessWriter, "__init__", spy_init)
    monkeypatch.setattr(writer_process.ProcessWriter, "answered", spy_answered)
    monkeypatch.setattr(writer_process._Pipe, "connection_lost", spy_lost)
    return seen


def once_the_child_runs(children: dict[str, list[Any]], answer: Any) -> Any:
    """A handler whose first answer waits until the fan-out's writer process runs: images
    handed over before it is ready are written by the thread."""

    ready: list[asyncio.Future[bool]] = []

    async def handler(request: Any) -> TransportResponse:
        if not ready:  # the first call: every call waits for this one wait
            [writer] = children["writers"]
            ready.append(asyncio.ensure_future(writer.ready()))
        assert await ready[0]
        return answer(request)  # type: ignore[no-any-return]

    return handler


async def test_a_fanout_writes_every_image_from_its_writer_process(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """40 prompts: each image answered OK by the child, on disk whole under its name, and
    the child ended with the fan-out."""
    async with mock_client(once_the_child_runs(children, lambda r: b64_answer(PNG))) as client:
        results = await client.gather_generate(
            [f"p{i}" for i in range(40)], concurrency=8, save_to=tmp_path
        )
    assert all(r.ok for r in results)
    assert children["answers"] == [files.OK] * 40
    assert children["ended"] == [None]
    assert [r.files for r in results] == [(tmp_path / f"{i:06d}.png",) for i in range(40)]
    # Made without parsing the name again (pathlib's shortcut where it has one): the same
    # path, of the same type, as `directory / name`.
    assert all(str(r.files[0]) == str(tmp_path / r.files[0].name) for r in results)
    assert {type(r.files[0]) for r in results} == {type(tmp_path)}
    assert all((tmp_path / f"{i:06d}.png").read_bytes() == PNG for i in range(40))
    assert listing(tmp_path) == [f"{i:06d}.png" for i in range(40)]  # no temporary file left


async def test_names_outside_ascii_reach_the_child_and_come_back_unchanged(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """A caller's stem in UTF-8 and a directory whose name is not UTF-8 at all (bytes
    the file system encoding keeps as surrogates): the child writes each file under
    exactly that name, and the paths given back are the same strings."""
    directory = tmp_path / os.fsdecode(b"lot-\xff")
    directory.mkdir()

    def stem(index: int, prompt: str) -> str:
        return f"renard-é-{index}"

    async with mock_client(once_the_child_runs(children, lambda r: b64_answer(PNG))) as client:
        results = await client.gather_generate(
            ["a", "b", "c"], concurrency=3, save_to=directory, save_stem=stem
        )
    assert children["answers"] == [files.OK] * 3
    assert [r.files for r in results] == [(directory / f"renard-é-{i}.png",) for i in range(3)]
    assert sorted(os.listdir(os.fsencode(directory))) == [
        f"renard-é-{i}.png".encode() for i in range(3)
    ]


async def test_the_child_starts_with_the_fanout_and_nobody_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, children: dict[str, list[Any]]
) -> None:
    """The fan-out starts its writer process as it starts, before any image; a child
    slow to start holds no worker: the images handed over meanwhile are written by the
    thread, and every prompt ends before the child runs."""
    release = asyncio.Event()
    start = writer_process.ProcessWriter._start

    async def slow_start(self: Any) -> None:
        await release.wait()
        await start(self)

    monkeypatch.setattr(writer_process.ProcessWriter, "_start", slow_start)
    started_first: list[bool] = []

    def handler(request: Any) -> TransportResponse:
        if not started_first:
            [writer] = children["writers"]
            started_first.append(writer._starting is not None)
        return b64_answer(PNG)

    def progress(stats: Any) -> None:
        if stats.done == 10:
            release.set()  # only now: the fan-out's end waits for the child to end

    async with mock_client(handler) as client:
        results = await client.gather_generate(
            [f"p{i}" for i in range(10)], concurrency=4, save_to=tmp_path, on_progress=progress
        )
    assert started_first == [True]
    assert all(r.ok for r in results)
    assert children["answers"] == []  # all written by the thread
    assert children["ended"] == [None]  # the child started late, and ended with the fan-out
    assert listing(tmp_path) == [f"{i:06d}.png" for i in range(10)]


@pytest.mark.parametrize("pybase64", [True, False], ids=["pybase64", "standard"])
async def test_a_b64_json_image_is_decoded_by_the_parent_with_pybase64(
    tmp_path: Path, pybase64: bool, children: dict[str, list[Any]]
) -> None:
    """With pybase64 the parent decodes (the child gets the image's bytes, a quarter fewer
    than the text); without it, the child gets the text and decodes it. Either way the
    child writes the same file."""
    if pybase64:
        pytest.importorskip("pybase64")
    writer = writer_process.ProcessWriter(ImageWriter(None))
    try:
        assert await writer.ready()
        if not pybase64:
            writer._decode = None
        text = base64.b64encode(PNG).decode()
        written = writer.write(ImageJob(str(tmp_path), "a", text, None, None, 10**6))
        [sent] = writer._outbox  # what goes down the pipe at the next turn of the loop
        _, flags, _, _, _, size, _ = files.JOB.unpack_from(sent)
        assert (flags, size) == ((0, len(PNG)) if pybase64 else (files.B64, len(text)))
        assert await written == str(tmp_path / "a.png")
    finally:
        await writer.aclose()
    assert children["answers"] == [files.OK]
    assert (tmp_path / "a.png").read_bytes() == PNG


async def test_an_image_the_child_rejects_gets_the_usual_error(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """A b64_json that is no image: rejected by the child, and the prompt's error is the
    one any save gives (the check redone to say why)."""
    async with mock_client(once_the_child_runs(children, lambda r: b64_answer(b"hello"))) as client:
        [result] = await client.gather_generate(["x"], save_to=tmp_path)
    assert children["answers"] == [files.REJECTED]
    assert isinstance(result.error, ImageDownloadError)
    assert "b64_json image is not a PNG, JPEG or WebP image" in str(result.error)
    assert listing(tmp_path) == []


async def test_a_b64_json_that_is_not_ascii_gets_the_usual_error(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """Text no base64 can be (a non-ASCII character) never reaches the child's pipe: the
    prompt gets the error any save gives, and the batch goes on."""
    bad = base64.b64encode(PNG).decode()[:-4] + "é==="

    def handler(request: Any) -> TransportResponse:
        text = bad if request.json()["prompt"] == "bad" else base64.b64encode(PNG).decode()
        return TransportResponse(200, json={"created": 1, "data": [{"b64_json": text}]})

    async with mock_client(once_the_child_runs(children, handler)) as client:
        results = await client.gather_generate(["ok", "bad", "fine"], save_to=tmp_path)
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, ImageDownloadError)
    assert "not valid base64" in str(results[1].error)
    assert children["answers"] == [files.OK, files.OK]
    assert listing(tmp_path) == ["000000.png", "000002.png"]


async def test_a_writer_process_that_dies_hands_its_images_to_the_thread(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """The child killed in the middle of a batch: no prompt fails, every image is on disk
    whole, written by the thread from then on, and nothing else stands beside them."""
    calls = 0

    def handler(request: Any) -> TransportResponse:
        nonlocal calls
        calls += 1
        if calls == 20:
            [writer] = children["writers"]
            os.kill(writer._transport.get_pid(), signal.SIGKILL)
        return b64_answer(PNG)

    async with mock_client(once_the_child_runs(children, handler)) as client:
        results = await client.gather_generate(
            [f"p{i}" for i in range(60)], concurrency=4, save_to=tmp_path
        )
    assert [r.error for r in results if not r.ok] == []
    assert 0 < len(children["answers"]) < 60  # the child wrote some, the thread the rest
    assert children["ended"] == [None]
    assert all((tmp_path / f"{i:06d}.png").read_bytes() == PNG for i in range(60))
    assert listing(tmp_path) == [f"{i:06d}.png" for i in range(60)]


async def test_a_writer_process_that_cannot_start_leaves_it_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, children: dict[str, list[Any]]
) -> None:
    """No Python to start (``sys.executable`` gone): every image is written by the thread."""
    monkeypatch.setattr(writer_process.sys, "executable", str(tmp_path / "no-python"))
    async with mock_client(lambda request: b64_answer(PNG)) as client:
        results = await client.gather_generate(["a", "b", "c"], save_to=tmp_path / "out")
    assert all(r.ok for r in results)
    assert children["answers"] == []
    assert listing(tmp_path / "out") == [f"{i:06d}.png" for i in range(3)]


async def test_a_fanout_closed_early_ends_its_writer_process(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """Leaving an iter_generate after 3 results: the child writes what it was handed and
    ends (an unclosed transport or a live child would fail the run's warning filter)."""
    async with (
        mock_client(lambda request: b64_answer(PNG)) as client,
        client.iter_generate(
            [f"p{i}" for i in range(100)], concurrency=4, save_to=tmp_path
        ) as results,
    ):
        seen = [await anext(results) for _ in range(3)]
    assert all(r.ok for r in seen)
    assert children["ended"] == [None]
    assert all(status == files.OK for status in children["answers"])
    for result in seen:
        assert result.files[0].read_bytes() == PNG


def test_no_writer_process_where_there_is_no_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen application's sys.executable is the application: never started."""
    assert writer_process.can_start()
    monkeypatch.setattr(writer_process.sys, "frozen", True, raising=False)
    assert not writer_process.can_start()


async def test_the_child_survives_ctrl_c_until_its_pipe_closes(
    tmp_path: Path, children: dict[str, list[Any]]
) -> None:
    """Ctrl-C reaches the whole process group: the child ignores it, writes what it is
    handed next, and ends when the parent closes its pipe."""
    writer = writer_process.ProcessWriter(ImageWriter(None))
    try:
        assert await writer.ready()
        first = await writer.write(ImageJob(str(tmp_path), "a", PNG, None, None, 10**6))
        assert writer._transport is not None
        os.kill(writer._transport.get_pid(), signal.SIGINT)
        second = writer.write(ImageJob(str(tmp_path), "b", PNG, None, None, 10**6))
        assert await asyncio.wait_for(second, 10) == str(tmp_path / "b.png")
    finally:
        await writer.aclose()
    assert first == str(tmp_path / "a.png")
    assert children["answers"] == [files.OK, files.OK]  # both by the child, none by a thread
    assert children["ended"] == [None]


@pytest.mark.parametrize("n", [1, 2])
async def test_one_image_and_several_are_saved_and_refused_alike(tmp_path: Path, n: int) -> None:
    """A batch's common answer (one b64_json image) takes a shorter path than several;
    both name files by a caller's save_stem, refuse a stem with a directory in it on its
    prompt alone, and say the generation succeeded when the file cannot be written."""

    def handler(request: Any) -> TransportResponse:
        body = {"b64_json": base64.b64encode(PNG).decode()}
        return TransportResponse(200, json={"created": 1, "data": [body] * n})

    def stem(index: int, prompt: str) -> str:
        return prompt  # "a/b" is no file name

    suffixes = [".png"] if n == 1 else ["-0.png", "-1.png"]
    async with mock_client(handler) as client:
        results = await client.gather_generate(
            ["fox", "a/b", "crow"], save_to=tmp_path, save_stem=stem
        )
        assert [r.ok for r in results] == [True, False, True]
        assert [p.name for p in results[0].files] == [f"fox{s}" for s in suffixes]
        assert all(p.parent == tmp_path for r in results for p in r.files)
        assert isinstance(results[1].error, ValidationError)
        assert results[1].error.field == "stem"
        assert listing(tmp_path) == sorted(
            f"{name}{s}" for name in ("crow", "fox") for s in suffixes
        )
        # A directory stands where the file goes: its rename fails (for root too).
        for s in suffixes:
            (tmp_path / "blocked" / f"000000{s}" / "keep").mkdir(parents=True)
        [failed] = await client.gather_generate(["owl"], save_to=tmp_path / "blocked")
    assert isinstance(failed.error, ImageSaveError)
    assert failed.error.message.startswith("The generation succeeded but writing")
    assert failed.error.response is not None
    assert failed.error.attempts == 1
