"""The image writer of a fan-out with ``save_to=``: a process of its own.

A writer thread beside a busy event loop waits for the interpreter lock after each of
its system calls; measured beside a fan-out of ~1,000 prompts/s, it wrote files at ~0.7
of its speed alone, a process at its full speed (``docs/design.md``, "The fan-out").
So a fan-out hands its images to a `ProcessWriter`: a child Python (``python -I -S
_files.py``, standard library only: it starts in ~25 ms) that writes them with the same
guarantee as the thread (`_files.serve`: atomic, durable, name included) and answers each
one. The event loop's part per image is one copy of its payload into memory shared with
the child (a ``b64_json`` image decoded first when pybase64 is installed) and a header in
a pipe, written once per turn of the loop for every image handed over in that turn.

The child starts as the fan-out starts; images handed over before it runs are written by
the thread writer, so no worker waits for it. Where a child cannot be had (a frozen
application, a system that is not POSIX, a start that fails) or dies, the images go to
the thread writer too, those in flight included: a write is idempotent (a file gets its
final name only once whole, replacing any file there), so none is lost and none stands
half-written.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import functools
import mmap
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import Final

from . import _files
from ._files import find_syncfs
from ._save import ImageJob, ImageWriter
from ._wakes import Wakes

__all__ = ["ProcessWriter", "can_start"]

_SCRIPT: Final = _files.__file__
#: The memory shared with the child for payloads, reserved (not allocated) up front: the
#: images in flight at once must fit (64 prompts of 8 MB images); one that does not goes
#: through the pipe, at several times the event loop's cost (`_Ring`).
SHARED_BYTES: Final = 512 * 2**20
#: The part of it the ring uses at first, allocated before the first image; it grows
#: with the images in flight (`_Ring`).
FIRST_BYTES: Final = 8 * 2**20
_PAGE: Final = mmap.PAGESIZE


def can_start() -> bool:
    """Whether this interpreter can start the writer process: a POSIX system, and
    ``sys.executable`` a Python (not a frozen application, which would start itself).

    Example::

        where = "a process" if can_start() else "a thread"  # what ProcessWriter() uses
    """
    return os.name == "posix" and bool(sys.executable) and not getattr(sys, "frozen", False)


class _Ring:
    """Memory shared with the child (a memfd), used as a ring: each payload is copied in
    at the head and freed once its job is answered, in the order they were put.

    Copying a payload here costs the event loop ~1 µs per 24 KB; through the pipe, the
    kernel's copy and the child's wake-ups cost it ~15-50 µs for a small image, and for
    a real one (~2 MB) the copies into fresh memory on the way cost ~10 ms of the event
    loop's time, two thirds of a fast batch's prompts/s (``bench_save.py --image full``).

    Of the ``size`` bytes reserved, the ring goes round the first ``limit`` (``first``,
    pages allocated up front by `prefault`), and doubles it, when it is not wrapped round,
    while that holds less than twice the payloads in flight and the new one: the memory
    it holds follows the most that was in flight at once (two to four times it), not the
    reservation. (While it is wrapped round, only the space between its head and its tail
    is free: a payload that does not fit there goes through the pipe.)
    """

    def __init__(self, size: int, first: int | None = None) -> None:
        self.size = size
        self.limit = size if first is None else min(first, size)
        self.fd = os.memfd_create("flux-async-images")
        try:
            os.ftruncate(self.fd, size)  # sparse: a page is allocated when first written
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self._head = 0
        self._used: deque[tuple[int, int, int]] = deque()  # (job, start, size), oldest first
        self._in_flight = 0  # bytes

    def prefault(self) -> None:
        """Allocate the pages of the first ``limit`` bytes now (on a worker thread), so
        copying a payload in never waits for the kernel to find one."""
        view = self.map
        for offset in range(0, self.limit, _PAGE):
            view[offset] = 0

    def put(self, number: int, data: bytes) -> int | None:
        """Copy ``data`` in for job ``number``; where it starts, or None if it does not fit."""
        size, used = len(data), self._used
        if not used:
            self._head = 0
        head = self._head
        tail = used[0][1] if used else 0
        if not used or head > tail:  # free: [head, limit) and [0, tail)
            if self.limit < self.size:
                self._grow(head, tail, size)
            if self.limit - head >= size:
                start = head
            elif tail >= size:
                start = 0
            else:
                return None
        elif tail - head >= size:  # wrapped: free [head, tail)
            start = head
        else:
            return None
        self.map[start : start + size] = data
        self._head = start + size
        used.append((number, start, size))
        self._in_flight += size
        return start

    def _grow(self, head: int, tail: int, size: int) -> None:
        """Larger images, or more of them in flight, than the ring has held so far: it
        goes round twice as much of the reservation (and again) until it holds twice
        what is in flight with ``size`` more, and ``size`` fits at its head or front."""
        wanted = 2 * (self._in_flight + size)
        while self.limit < self.size and (
            self.limit < wanted or (self.limit - head < size and tail < size)
        ):
            self.limit = min(2 * self.limit, self.size)

    def release(self, number: int) -> None:
        """Job ``number`` is answered: its payload's space, and any older one's, is free."""
        used = self._used
        while used and used[0][0] <= number:
            self._in_flight -= used.popleft()[2]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _ring() -> _Ring | None:
    """Shared memory for payloads where the system has memfd (Linux), else None."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        return _Ring(SHARED_BYTES, FIRST_BYTES)
    except OSError:
        return None


def _prepare() -> tuple[_Ring | None, Callable[..., bytes] | None]:
    """On a worker thread (an import, and pages allocated up front: milliseconds): the
    shared memory, and pybase64's decoder if it is installed."""
    ring = _ring()
    if ring is not None:
        ring.prefault()
    return ring, _files.simd_b64decode()


class _Pipe(asyncio.SubprocessProtocol):
    """The child's answers, parsed as they arrive and handed to the writer."""

    def __init__(self, writer: ProcessWriter) -> None:
        self._writer = writer
        self._buffer = bytearray()
        self._wakes = Wakes(asyncio.get_running_loop())
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at, answer, wakes = 0, _files.ANSWER, self._wakes
        while len(buffer) - at >= answer.size:
            number, status, size = answer.unpack_from(buffer, at)
            end = at + answer.size + size
            if end > len(buffer):
                break
            self._writer.answered(number, status, bytes(buffer[at + answer.size : end]), wakes)
            at = end
        del buffer[:at]
        wakes.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        # After the process has exited and both pipes are closed: every answer it sent
        # has been read.
        if not self.exited.done():
            self.exited.set_result(None)
        self._writer.exited()


class ProcessWriter:
    """Writes a fan-out's images from a child process (module docstring), with the same
    interface and the same guarantee as `ImageWriter`: the future ``write`` returns is
    done, with the path, once the file and its name are durable.

    The child starts with `start` (or the first image), the thread writing what is
    handed over until it runs, and ends with `aclose` (its pipe closed, it writes what it
    was handed, then exits). Used on one event loop only: the fan-out's.

    Example::

        writer = ProcessWriter()  # the thread writer where there can be no process
        try:
            path = await writer.write(ImageJob("out", "fox", png_bytes, None, None, 10**6))
        finally:
            await writer.aclose()
    """

    __slots__ = (
        "_closed",
        "_decode",
        "_directory",
        "_fallback",
        "_jobs",
        "_numbers",
        "_outbox",
        "_pipe",
        "_ring",
        "_scheduled",
        "_starting",
        "_transport",
        "_usable",
    )

    def __init__(self, fallback: ImageWriter | None = None) -> None:
        self._fallback = ImageWriter(find_syncfs()) if fallback is None else fallback
        self._usable = can_start()
        self._jobs: dict[int, ImageJob] = {}  # handed to the child, not yet answered
        self._outbox: list[bytes] = []  # jobs not yet sent, as the pipe carries them
        self._numbers = 0
        self._scheduled = False
        self._closed = False
        self._starting: asyncio.Task[None] | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._pipe: _Pipe | None = None
        self._ring: _Ring | None = None
        self._decode: Callable[..., bytes] | None = None  # pybase64's, found as it starts
        # The last directory written to, and its encoding: a fan-out writes to one.
        self._directory: tuple[str, bytes] = ("", b"")

    def start(self) -> None:
        """Start the child now, if it is not started yet (a fan-out that saves does so as
        it starts: its first images then find it ready). Images handed over before it is
        ready are written by the thread.

        Example::

            writer.start()
        """
        if self._starting is None and self._usable and not self._closed:
            self._starting = asyncio.get_running_loop().create_task(self._start())

    async def ready(self) -> bool:
        """Start the child if need be and wait until it runs (True) or could not be
        started (False: the thread writes every image).

        Example::

            if not await writer.ready():
                print("writing from a thread")
        """
        self.start()
        if self._starting is not None:
            await asyncio.shield(self._starting)
        return self._transport is not None

    def write(self, job: ImageJob) -> asyncio.Future[str]:
        """Write ``job``'s image; the future is done, with its path, once it is durable."""
        if self._transport is None:
            # No child yet (the thread writes until it is ready: a child takes tens of
            # milliseconds to start, and a fan-out's workers would wait for it), or none
            # at all (it could not be started, it died, or the writer is closed).
            self.start()
            return self._fallback.write(job)
        payload = job.payload
        flags = 0
        if isinstance(payload, bytes):
            data = payload
        elif self._decode is not None:
            # With pybase64 (~2.5 µs for an 18 KB image) decoding here costs the event
            # loop what copying the text out did, leaves a quarter less to copy, and
            # nothing for the child to decode.
            try:
                data = self._decode(payload, validate=True)
            except ValueError:  # binascii.Error too: the thread's check says what it is
                return self._fallback.write(job)
        elif payload.isascii():
            flags, data = _files.B64, payload.encode("ascii")
        else:
            return self._fallback.write(job)  # no base64: the thread's check says so
        self._numbers += 1
        number = self._numbers
        self._jobs[number] = job
        if job.directory != self._directory[0]:
            self._directory = (job.directory, os.fsencode(job.directory))
        directory, name = self._directory[1], os.fsencode(job.name)
        ring = self._ring
        at = None if ring is None else ring.put(number, data)
        header = _files.JOB.pack(
            number,
            flags,
            job.max_bytes,
            len(directory),
            len(name),
            len(data),
            _files.INLINE if at is None else at,
        )
        if at is None:
            self._outbox.append(header + directory + name + data)
        else:
            self._outbox.append(header + directory + name)
        if not self._scheduled:
            # One pipe write per turn of the event loop for everything handed over in it.
            self._scheduled = True
            job.loop.call_soon(self._send)
        return job.future

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # The ring's pages are allocated up front, so copying a payload in never
            # waits for the kernel to find one.
            ring, self._decode = await loop.run_in_executor(None, _prepare)
            self._ring = ring
            arguments = [] if ring is None else ["--shared", str(ring.fd), str(ring.size)]
            transport, pipe = await loop.subprocess_exec(
                functools.partial(_Pipe, self),
                sys.executable,
                # -S: without site, whose .pth files can cost a start tens of ms.
                "-I",
                "-S",
                _SCRIPT,
                *arguments,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                pass_fds=() if ring is None else (ring.fd,),
            )
        except Exception:  # no Python to start, no pipes, an executor refusing work...
            self._fall_back()  # ...the thread writes every image
            return
        self._transport, self._pipe = transport, pipe
        if self._closed:  # abandoned while it started
            self.abandon()

    def _send(self) -> None:
        self._scheduled = False
        if not self._outbox or self._transport is None:
            return
        stdin = self._transport.get_pipe_transport(0)
        if not isinstance(stdin, asyncio.WriteTransport) or stdin.is_closing():
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        stdin.write(data)

    def answered(self, number: int, status: int, text: bytes, wakes: Wakes) -> None:
        """The child's answer for job ``number`` (`_Pipe` calls it, and has ``wakes``
        give the outcomes once it has read the answers that came together)."""
        if self._ring is not None:
            self._ring.release(number)
        job = self._jobs.pop(number, None)
        if job is None or job.future.done():
            return  # its awaiter was cancelled meanwhile
        if status == _files.OK:
            wakes.add(job.future, os.fsdecode(text))
        elif status == _files.REJECTED:
            # Not an image, or too big, or not base64: the thread writer's check says
            # which, with the message and fields a caller gets from any save.
            self._fallback.write(job)
        else:
            code, filename, strerror = text.split(b"\0", 2)
            wakes.add(
                job.future,
                OSError(int(code) or errnos.EIO, os.fsdecode(strerror), os.fsdecode(filename))
                if filename
                else OSError(int(code) or errnos.EIO, os.fsdecode(strerror)),
            )

    def exited(self) -> None:
        """The child ended (`_Pipe` calls it): what it did not answer goes to the thread."""
        self._fall_back()

    def _fall_back(self) -> None:
        self._release()
        self._outbox.clear()
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            if not job.future.done():
                self._fallback.write(job)

    async def aclose(self) -> None:
        """Let the child write what it was handed, then end it. Safe to call twice.

        Example::

            await writer.aclose()
        """
        starting = self._starting
        if starting is None:
            return
        if not starting.done():
            await asyncio.shield(starting)
        self._send()
        transport, pipe = self._transport, self._pipe
        if transport is None or pipe is None:
            return
        stdin = transport.get_pipe_transport(0)
        if stdin is not None:
            stdin.close()
        try:
            await asyncio.shield(pipe.exited)
        except asyncio.CancelledError:
            self.abandon()
            raise
        self._fall_back()

    def abandon(self) -> None:
        """End the child now, whatever it was doing (its handle was collected, or the
        caller gave up waiting): files it had not renamed are not written."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        """Close the child's transport (which kills it if it still runs) and the ring."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
