"""Image files on disk: the atomic, durable write protocol, and the writer process.

Standard library only, and no import from this package: besides being imported by
`_save` (whose writer thread runs `write_round`), this file is run as a script, as the
writer process a fan-out with ``save_to=`` writes its images from (`serve`; started by
`_writer_process`). A thread writing files beside a busy event loop waits for the
interpreter lock after every system call; a process shares no lock (``docs/design.md``,
"The fan-out").

The protocol, for a round of files (`write_round`, the thread writer's): each is written
under a temporary name beside its final one, the round's bytes are made durable with one
syncfs(2) of the filesystem (on Linux; elsewhere each file is fsynced as it is written),
each file is renamed over its final name, and the renames are made durable with one fsync
of each directory. The writer process (`serve`, `_Rounds`) writes each file unnamed
(``O_TMPFILE``) where it can and links it under its final name after the syncfs, and
under load leaves its names to the next round's syncfs rather than a flush of their own.
No final name ever stands over incomplete bytes, even after ``kill -9`` or a power cut,
and no save is answered before its file and its name are durable.
"""

from __future__ import annotations

import binascii
import errno as errnos
import functools
import os
import select
import signal
import struct
import sys

# The writer process starts with every fan-out that saves, and pays for what it imports
# each time: typing, base64 (and its re) and contextlib took ~15 ms, a third of its start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Final

__all__ = [
    "ANSWER",
    "B64",
    "CREATE",
    "IMAGE_SUFFIXES",
    "INLINE",
    "JOB",
    "OK",
    "OS_ERROR",
    "REJECTED",
    "b64decode",
    "find_syncfs",
    "fsync_directory",
    "image_type",
    "remove",
    "rename",
    "serve",
    "simd_b64decode",
    "stage",
    "with_suffix",
    "write_round",
]

#: The suffix a file of each sniffed type gets.
IMAGE_SUFFIXES: Final[Mapping[str, str]] = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
# Suffixes replaced (rather than appended to) when the caller's path has one.
_REPLACED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".img", ".image"})

CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)

# The writer process's pipe protocol. A job: its number, flags (B64: the payload is
# base64 text), the most bytes the image may have, the lengths of the directory, the
# name and the payload, and where the payload is in the memory shared with the parent
# (INLINE: in the pipe, after the name); then the directory and the name.
JOB: Final = struct.Struct("<IBQIIQQ")
B64: Final = 1
INLINE: Final = 2**64 - 1
# An answer, one per job, after the round holding it: its number, how it ended, the
# length of what follows: OK, the path written; REJECTED (not an image, too big, not
# base64: the caller redoes the check to say why), nothing; OS_ERROR, "errno\0filename
# \0strerror".
ANSWER: Final = struct.Struct("<IBI")
OK: Final = 0
REJECTED: Final = 1
OS_ERROR: Final = 2


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


def with_suffix(name: str, kind: str) -> str:
    """``name`` with the suffix of ``kind``: an image suffix it has is replaced, any
    other kept (``fox.v2`` becomes ``fox.v2.png``).

    Example::

        with_suffix("fox.jpg", "png")  # 'fox.png'
    """
    suffix = IMAGE_SUFFIXES[kind]
    # Path.suffix, on a bare name (strings: this runs once per image of a batch).
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1 and name[dot:].lower() in _REPLACED_SUFFIXES:
        return name[:dot] + suffix
    return name + suffix


@functools.cache
def _fast_b64decode() -> Callable[..., bytes]:
    """pybase64's decoder if it is installed (``flux-async[fast]``, also in the ``cli``
    extra), else the standard library's. Looked up on the first decode, not at import.
    The standard one decodes an 18 KB image in ~90 µs holding the interpreter lock, a
    third of a busy client's time per prompt at a few thousand images a second; pybase64
    (SIMD) takes ~3 µs."""
    try:
        import pybase64
    except ImportError:
        return _standard_b64decode
    return pybase64.b64decode


def _standard_b64decode(data: str | bytes | memoryview, validate: bool = True) -> bytes:
    import base64  # imported when needed: it takes re with it (milliseconds)

    return base64.b64decode(data, validate=validate)


def simd_b64decode() -> Callable[..., bytes] | None:
    """pybase64's decoder if it is installed (``flux-async[fast]``), else None.

    Example::

        decode = simd_b64decode()
        data = decode(text, validate=True) if decode is not None else b64decode(text)
    """
    fast = _fast_b64decode()
    return None if fast is _standard_b64decode else fast


def b64decode(data: str | bytes | memoryview) -> bytes:
    """The bytes of base64 ``data``, strictly (`binascii.Error` or `ValueError` if it is
    not base64), with pybase64 when it is installed.

    Example::

        b64decode("iVBORw0KGgo=")  # b'\\x89PNG\\r\\n\\x1a\\n'
    """
    fast = _fast_b64decode()
    if fast is not _standard_b64decode:
        try:
            return fast(data, validate=True)
        except (binascii.Error, ValueError):
            # pybase64 accepts a subset of what the standard decoder does (it refuses
            # excess padding, say), with the same bytes: the standard one has the last
            # word, so installing the extra never turns an image into an error.
            pass
    return _standard_b64decode(data)


def stage(path: str, data: bytes, *, sync: bool, tag: str | None = None) -> str:
    """Write ``data`` to a new temporary file beside ``path`` (fsynced when ``sync``);
    return its name. Nothing stands under ``path`` yet; a missing directory is made.
    ``tag`` makes the name unique (random when None).

    Example::

        temporary = stage("out/fox.png", png, sync=True)
        rename(temporary, "out/fox.png")
    """
    directory, name = os.path.split(path)
    # A dot-name that no final file can have, unique per call: two writers of the same
    # path never share a temporary file (and O_EXCL refuses one that exists).
    temporary = os.path.join(directory, f".{name}.{tag or os.urandom(6).hex()}.part")
    try:
        # os.open with 0o666 (not mkstemp's 0o600): the image gets the caller's umask,
        # like any file they write.
        fd = os.open(temporary, CREATE, 0o666)
    except FileNotFoundError:
        # Made on the first write rather than checked on every one.
        os.makedirs(directory or ".", exist_ok=True)
        fd = os.open(temporary, CREATE, 0o666)
    try:
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        remove(temporary)
        raise
    return temporary


def remove(path: str) -> None:
    """Remove ``path`` if it can be (a temporary file that failed).

    Example::

        remove("out/.fox.png.1a2b.part")
    """
    try:  # noqa: SIM105 (not contextlib.suppress: one import less for the child's start)
        os.unlink(path)
    except OSError:
        pass


def rename(temporary: str, path: str) -> None:
    """Rename ``temporary`` over ``path`` (`os.replace`), or remove it if that fails.

    Example::

        rename(stage("out/fox.png", png, sync=True), "out/fox.png")
    """
    try:
        os.replace(temporary, path)
    except BaseException:
        remove(temporary)
        raise


def fsync_directory(directory: str) -> None:
    """Make the names in ``directory`` durable (a no-op where it cannot be done).

    Example::

        fsync_directory("out")
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem without directory fsync: nothing more to do
        pass
    finally:
        os.close(fd)


@functools.cache
def find_syncfs() -> Callable[[int], None] | None:
    """Linux's syncfs(2), which flushes one filesystem in one call, or None elsewhere.
    Looked up once, on the first save (not at import: ctypes costs milliseconds).

    Example::

        syncfs = find_syncfs()
    """
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


def _flush(syncfs: Callable[[int], None], directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def write_round(
    files: Sequence[tuple[str, bytes] | BaseException], syncfs: Callable[[int], None] | None
) -> list[str | BaseException]:
    """Write a round of ``(path, bytes)`` files by the protocol (module docstring); return
    how each ended, in order: its path, or the error. An error given in place of a file
    (one that could not be decoded, say) is passed through as its outcome.

    Example::

        write_round([("out/fox.png", png), ("out/crow.png", png)], find_syncfs())
    """
    outcomes: list[str | BaseException] = []
    staged: list[tuple[int, str, str]] = []  # position, final path, temporary path
    # One random token per round, numbered per file: a system call per round, not per
    # file (on a thread, each one hands the interpreter lock back and forth).
    token = os.urandom(6).hex()
    for number, item in enumerate(files):
        if isinstance(item, BaseException):
            outcomes.append(item)
            continue
        path, data = item
        try:
            temporary = stage(path, data, sync=syncfs is None, tag=f"{token}{number}")
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(path)
            staged.append((number, path, temporary))
    try:
        if syncfs is not None:
            for directory in {os.path.dirname(path) or "." for _, path, _ in staged}:
                _flush(syncfs, directory)
    except Exception as exc:  # a flush that failed: every staged file fails with it
        for number, _, temporary in staged:
            remove(temporary)
            outcomes[number] = exc
        return outcomes
    renamed = set()
    for number, path, temporary in staged:
        try:
            rename(temporary, path)
        except Exception as exc:
            outcomes[number] = exc
        else:
            renamed.add(os.path.dirname(path) or ".")
    for directory in renamed:
        fsync_directory(directory)
    return outcomes


# -- the writer process -------------------------------------------------------------------


def _jobs(
    buffer: bytearray, shared: memoryview | None
) -> tuple[list[tuple[int, tuple[str, bytes] | BaseException]], int]:
    """The complete jobs at the start of ``buffer`` as ``(number, file or rejection)``,
    and how many bytes they took; a payload not in the pipe is in ``shared``."""
    jobs: list[tuple[int, tuple[str, bytes] | BaseException]] = []
    view = memoryview(buffer)
    at = 0
    try:
        while len(buffer) - at >= JOB.size:
            number, flags, max_bytes, dir_size, name_size, size, offset = JOB.unpack_from(
                buffer, at
            )
            start = at + JOB.size
            names = start + dir_size + name_size
            end = names + size if offset == INLINE else names
            if end > len(buffer):
                break
            directory = os.fsdecode(bytes(view[start : start + dir_size]))
            name = os.fsdecode(bytes(view[start + dir_size : names]))
            if offset == INLINE:
                payload = view[names:end]
            elif shared is not None:
                payload = shared[offset : offset + size]
            else:
                raise RuntimeError("a payload in shared memory, and none is shared")
            at = end
            jobs.append((number, _file(directory, name, payload, flags, max_bytes)))
    finally:
        view.release()
    return jobs, at


class _Rejected(Exception):
    """Not base64, not an image, or too big: the parent redoes the check to say which."""


def _file(
    directory: str, name: str, payload: memoryview, flags: int, max_bytes: int
) -> tuple[str, bytes] | BaseException:
    if flags & B64:
        try:
            data = b64decode(payload)
        except (binascii.Error, ValueError):
            return _Rejected()
    else:
        data = bytes(payload)
    kind = image_type(data)
    if kind is None or len(data) > max_bytes:
        return _Rejected()
    return os.path.join(directory, with_suffix(name, kind)), data


def _answer(number: int, outcome: str | BaseException) -> bytes:
    if isinstance(outcome, str):
        status, text = OK, os.fsencode(outcome)
    elif isinstance(outcome, _Rejected):
        status, text = REJECTED, b""
    else:
        status = OS_ERROR
        errno = getattr(outcome, "errno", None) or 0
        filename = getattr(outcome, "filename", None)
        strerror = getattr(outcome, "strerror", None) or f"{type(outcome).__name__}: {outcome}"
        text = b"\0".join(
            (str(errno).encode(), os.fsencode(filename) if filename else b"", os.fsencode(strerror))
        )
    return ANSWER.pack(number, status, len(text)) + text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


#: The most the writer process reads from its pipe at once.
READ_BYTES: Final = 1 << 20

#: Unnamed files a round of the writer process holds open at most (a descriptor each,
#: until it names them): the rest of a larger round get temporary names, so a round of
#: thousands of images never runs out of descriptors (1,024 by default on Linux).
UNNAMED_PER_ROUND: Final = 256


class _Rounds:
    """The writer process's rounds (`serve`), each answered once its names are durable.

    A round writes each file unnamed where the system can (``O_TMPFILE``: nothing is ever
    left under a temporary name, and naming it is one link, ~20 us less kernel time a
    file than creating a temporary name and renaming it on ext4), or under a temporary
    name beside its final one where it cannot; makes the bytes durable with one syncfs(2)
    per filesystem; then names each file. Those names are made durable by the next
    round's syncfs when more jobs are already waiting, or by a flush of their own when
    none is (`settle`): one flush a round under load rather than two (~40 us less a
    file of the writer's time at rounds of 8), for one round more of latency. A round's
    answers (every outcome, in order) are given once its names are durable, or at once
    where there is no syncfs (each file fsynced as it is written, then its directory).
    """

    __slots__ = ("_answers", "_directories", "_linked", "_proc", "_syncfs")

    def __init__(self, syncfs: Callable[[int], None] | None) -> None:
        self._syncfs = syncfs
        # /proc/self/fd, to link an unnamed file by its descriptor (linkat(2) with
        # AT_EMPTY_PATH needs a capability); None where files are named from the start.
        self._proc: int | None = None
        if syncfs is not None and hasattr(os, "O_TMPFILE"):
            try:  # noqa: SIM105 (see `remove`)
                self._proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                pass
        self._answers: list[tuple[int, str | BaseException]] = []  # named, not yet durable
        self._directories: set[str] = set()  # where those names are
        self._linked = False  # whether any of them was an unnamed file

    @property
    def unsettled(self) -> bool:
        """Whether answers wait for their names to be made durable (`settle`)."""
        return bool(self._answers)

    def write(
        self, jobs: Sequence[tuple[int, tuple[str, bytes] | BaseException]]
    ) -> list[tuple[int, str | BaseException]]:
        """Write a round of ``(number, file or error)`` jobs; the answers now due: the
        previous round's, whose names this round's flush made durable (and this round's
        too where there is no syncfs)."""
        syncfs = self._syncfs
        outcomes: list[str | BaseException] = []
        # Position, final path, descriptor or temporary name, bytes.
        staged: list[tuple[int, str, int | str, bytes]] = []
        token = os.urandom(6).hex()
        held = 0  # descriptors of unnamed files this round holds until it names them
        for number, (_, item) in enumerate(jobs):
            if isinstance(item, BaseException):
                outcomes.append(item)
                continue
            path, data = item
            try:
                written = self._stage(path, data, f"{token}{number}", held < UNNAMED_PER_ROUND)
            except Exception as exc:
                outcomes.append(exc)
            else:
                held += isinstance(written, int)
                outcomes.append(path)
                staged.append((number, path, written, data))
        due: list[tuple[int, str | BaseException]] = []
        flushed = False
        if syncfs is not None and staged:
            directories = {os.path.dirname(path) or "." for _, path, _, _ in staged}
            try:
                if not self._directories <= directories:
                    due += self.settle()  # names elsewhere: this flush may not cover them
                for directory in directories:
                    _flush(syncfs, directory)
                flushed = True
            except Exception as exc:  # every staged file fails with it
                for number, _, written, _ in staged:
                    _discard(written)
                    outcomes[number] = exc
                staged = []
        if flushed:
            due += self._take()  # their names were made durable by this flush
        else:
            due += self.settle()
        for number, path, written, data in staged:
            try:
                self._name(written, path, data, f"{token}{number}")
            except Exception as exc:
                outcomes[number] = exc
            else:
                self._directories.add(os.path.dirname(path) or ".")
                self._linked = self._linked or isinstance(written, int)
        self._answers = [
            (number, outcome) for (number, _), outcome in zip(jobs, outcomes, strict=True)
        ]
        if syncfs is None:
            due += self.settle()
        return due

    def settle(self) -> list[tuple[int, str | BaseException]]:
        """Make the names given since the last flush durable; the answers that waited."""
        directories, linked = self._directories, self._linked
        answers = self._take()
        try:
            for directory in directories:
                if linked and self._syncfs is not None:
                    # A linked file's inode (its link count) is not a directory's: an
                    # fsync of the directory would not write it.
                    _flush(self._syncfs, directory)
                else:
                    fsync_directory(directory)
        except Exception as exc:
            answers = [(n, exc if isinstance(o, str) else o) for n, o in answers]
        return answers

    def _take(self) -> list[tuple[int, str | BaseException]]:
        """The answers held, and nothing held any more."""
        answers = self._answers
        self._answers, self._directories, self._linked = [], set(), False
        return answers

    def close(self) -> None:
        if self._proc is not None:
            os.close(self._proc)
            self._proc = None

    def _stage(self, path: str, data: bytes, tag: str, unnamed: bool) -> int | str:
        """``data`` written unnamed in ``path``'s directory (the descriptor) if ``unnamed``
        and the system can, else under a temporary name (the name); not yet durable."""
        if unnamed and self._proc is not None:
            directory = os.path.dirname(path) or "."
            try:
                fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666)
            except OSError as exc:
                if exc.errno in (errnos.EOPNOTSUPP, errnos.EISDIR, errnos.EINVAL):
                    self.close()  # a filesystem without unnamed files: names from now on
            else:
                try:
                    _write_all(fd, data)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        # A missing directory (made here), a filesystem without unnamed files, or any
        # other error, which the named way then reports as it is.
        return stage(path, data, sync=self._syncfs is None, tag=tag)

    def _name(self, written: int | str, path: str, data: bytes, tag: str) -> None:
        """Give the file ``written`` (`_stage`) of ``data`` its final name ``path``,
        replacing a file there."""
        if isinstance(written, str):
            rename(written, path)
            return
        try:
            if self._proc is not None:
                try:
                    self._link(written, path, tag)
                    return
                except OSError:
                    # A sandbox that hides /proc's links, a filesystem that cannot link
                    # a file that has no name: named the other way from now on.
                    self.close()
            # Written again under a temporary name, fsynced (this round's syncfs is
            # past), renamed.
            rename(stage(path, data, sync=True, tag=tag), path)
        finally:
            os.close(written)

    def _link(self, fd: int, path: str, tag: str) -> None:
        """Link the unnamed file ``fd`` under ``path``, over a file standing there."""
        try:
            os.link(str(fd), path, src_dir_fd=self._proc, follow_symlinks=True)
        except FileExistsError:
            # Linked under a temporary name, then renamed over it.
            directory, name = os.path.split(path)
            temporary = os.path.join(directory, f".{name}.{tag}.part")
            os.link(str(fd), temporary, src_dir_fd=self._proc, follow_symlinks=True)
            rename(temporary, path)


def _discard(written: int | str) -> None:
    """A staged file that will not be named (`_Rounds._stage`): closed, or removed."""
    if isinstance(written, int):
        os.close(written)
    else:
        remove(written)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def serve(source: int = 0, sink: int = 1, shared: memoryview | None = None) -> None:
    """The writer process: read jobs from ``source`` (their payloads in the pipe or in
    ``shared``), write each round of them (every job that has arrived when the last
    round ends; `_Rounds`), answer each job on ``sink`` in order once its file and its
    name are durable. Ends when ``source`` ends, once every job read is written.

    Example::

        serve()  # python -I -S path/to/_files.py [OPTIONS], as `_writer_process` runs it
    """
    rounds = _Rounds(find_syncfs())
    buffer = bytearray()
    # Read into one buffer kept for the process's life: os.read's fresh 1 MiB object a
    # read cost the kernel a mapping, its page faults and its unmapping, ~6% of this
    # process's CPU in a fast batch (perf).
    chunk = memoryview(bytearray(READ_BYTES))
    ended = False
    try:
        while not ended:
            if rounds.unsettled and not _readable(source):
                # Nothing more to write now: this round's names are made durable by a
                # flush of their own rather than by the next round's.
                _write_all(sink, _answered(rounds.settle()))
            got = os.readv(source, [chunk])
            if not got:
                break
            buffer += chunk[:got]
            # Whatever else has arrived joins this round, without waiting for more.
            while _readable(source):
                got = os.readv(source, [chunk])
                if not got:
                    ended = True
                    break
                buffer += chunk[:got]
            jobs, used = _jobs(buffer, shared)
            del buffer[:used]
            if jobs:
                _write_all(sink, _answered(rounds.write(jobs)))
        _write_all(sink, _answered(rounds.settle()))
    except BrokenPipeError:  # the parent is gone: nobody is waiting any more
        return
    finally:
        chunk.release()
        rounds.close()


def _answered(outcomes: list[tuple[int, str | BaseException]]) -> bytes:
    return b"".join(_answer(number, outcome) for number, outcome in outcomes)


def _main(argv: Sequence[str]) -> None:
    """``_files.py [--shared FD SIZE]``: serve on stdin and stdout, with payloads in the
    ``SIZE`` bytes of memory file ``FD`` shared with the parent when given."""
    # Ctrl-C reaches the whole process group: the parent decides when to stop (it closes
    # the pipe), and every job it handed over is written first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) == 3 and argv[0] == "--shared":
        import mmap

        # Left mapped until the process exits: slices of it may outlive serve().
        serve(shared=memoryview(mmap.mmap(int(argv[1]), int(argv[2]), prot=mmap.PROT_READ)))
    elif not argv:
        serve()
    else:
        raise SystemExit(f"usage: _files.py [--shared FD SIZE], not {' '.join(argv)!r}")
    # Everything is written and answered (os.write: nothing is buffered), and the fan-out
    # waits for this exit: the interpreter's finalization would add ~4 ms to its end.
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
