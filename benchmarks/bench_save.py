"""Saving images inside a fan-out: generated prompts/s with ``save_to=`` on vs off, and
against what the disk itself can do.

Setup: concurrency 64, 10,000 prompts per run with ``b64`` images (the gated case: a
bulk job is 10k-1M prompts, and the writer process's start, ~25 ms once per batch,
weighed ~4% of a 3,000-prompt run) and 3,000 with ``url`` ones, against a fast
constant-answer server in its own process (this file, run with ``--serve``: standard
library only, like ``_fastserver.py``), so the figure is what saving costs the client,
not what a server takes. Two ways an image comes back, each measured off and on:

* ``b64``: the answer carries the PNG as ``b64_json`` (an 18 KB picture); saving decodes
  it and writes the file;
* ``url``: the answer carries a URL on the same server; saving GETs it through the
  client's pool (a second HTTP exchange per prompt) and writes the file.

Every file is written as the library writes it: from the writer process a fan-out with
``save_to=`` starts (`flux_async._writer_process`), an unnamed file in its directory
(a temporary name where there can be none), made durable with one syncfs(2) per group
of files (an fsync per file where there is none), then linked under its final name, the
names made durable by the next group's syncfs, or by one of their own when no group
follows (`flux_async._files._Rounds`). "On"
runs twice: on local disk (a fresh directory under ``--dir``, by default the directory
the script runs in, where a user's batch would write) and on tmpfs (under
``--tmpfs-dir``, ``/dev/shm`` by default). Each run ends with sync(2), so that no run pays
for the writeback of the one before it. A disk run's files stay until the benchmark ends,
as a batch's would (`Scratch`: on ext4 without a journal, creating files right after
thousands were removed ran 2-4x slower); a tmpfs run's go after it. Each mode is warmed
up once, then run in interleaved rounds, the gated runs (disk, off, tmpfs) side by side
in each round, their order reversed every other round (`round_order`): the gated case
15 rounds (``--rounds``), the information variants in the first 5 of them
(``--info-rounds``), every other case 5. With 5 rounds the gated figures moved by ~±0.1
from one run to the next here, as much as their margin; with 15, by ~±0.05. The
prompts/s shown are medians; each ratio is the median of the rounds' own ratios (on a
machine whose load drifts, the ratio of two runs side by side is steadier than a ratio
of two medians, which the notes give too).

A disk can be slower than any client: on a shared VM creating one small file can cost
most of a millisecond of kernel time. So each round also measures the disk's own
ceiling, as files/s: a bare loop (`ceiling`) writing the same number of files of the
same size by the same protocol, on one thread as the writer process does, and nothing
else.
A second bare loop keeps at most ``concurrency`` files not yet durable at once, as the
fan-out does (a prompt's worker waits for its files, which bounds what a crash costs),
for information: it shows how much of a gap to the first is that bound rather than the
client.

With b64 images two more "on" runs replace the writer with one that decodes and writes
nothing: ``loop only`` finishes each image at once, so the event loop does all of its own
share of a save (the saver, the job, its future, the path) and none of the writer's;
``loop only +2ms`` finishes each image 2 ms later, as a writer round would at best. Their
prompts/s ÷ off, printed for information, are meant to split the cost of saving: what
the event loop pays per image, what a worker's wait for its file costs, and what the
writer thread adds on top (decoding, system calls, and the interpreter lock it takes
from the loop each time one returns); on a noisy machine they need more rounds than the
default 5 to be told apart. Two more, for information, write with the thread writer
instead (what a fan-out used before the writer process, and still uses where there can
be none): the interpreter lock's cost to it, on disk and on tmpfs. And one more runs
saving off while another process (this file with ``--write-beside``) writes the same PNG
to disk by the same protocol, in rounds of 8, at the pace the disk runs saved files so
far: its prompts/s ÷ off is what the disk's own work (the kernel's, and on a VM the
host's) costs a client that neither decodes nor writes anything, so no change to the
client can win it back.

Where the processes run: every process wherever the scheduler puts it, as a user's
would be. The server stands in for one on another machine, yet here it shares the
client's CPUs, and on a machine of 2 (like the VM these figures come from) a run that
saves loses some prompts/s to it rather than to saving: while the writer process is busy
on the other CPU, the server's wake-ups land on the client's (a scheduler trace of one
disk run of 10,000 prompts, ``perf record -e sched:sched_switch``, had the client
preempted 721 times by the server, against none with saving off). With ``--confine``
(`Cpus`) the server runs on the last CPU this process may use and the client's event
loop on the others, while the writer process and the process writing beside a run,
which would inherit the client's CPU, get all of them; each round of the gated case
then also runs off and disk unconfined, for comparison. Confined, saving off ran 2-10%
slower than unconfined in ad hoc A/B runs (the client no longer shares a CPU and its
caches with the server at times), so neither placement is the remote server's; the
gated figures are the unconfined ones.

Targets, with b64 images: prompts/s with saving ÷ min(prompts/s without, the bare loop's
files/s) >= 0.85, on disk and on tmpfs (where the disk is not the bound, so this is
plain on ÷ off). The raw on ÷ off on disk, and every url figure, are information: an
HTTP exchange per prompt against a server answering in microseconds is as costly as the
generation itself; against a real model (seconds per image) it is noise. A note gives
what decoding the image costs with the decoder the library picked (pybase64, from the
``fast`` or ``cli`` extra, else the standard library's, ~30x slower): a decoder holds the
interpreter lock, so its time adds to the event loop's whatever thread runs it.

With ``--gate-only`` it runs only the gated case's runs (b64 images, the fast server:
off, disk and tmpfs with their bare loops), 15 rounds by default: the gated figures in
about seven minutes, where the whole benchmark takes about thirteen.

With ``--protocols`` it measures instead the bare loop on disk by each writer's
protocol, in rounds of 8 files (the writer process's median round at ~4,000 prompts/s):
the thread writer's (a temporary name, syncfs, rename, an fsync of the directory), and
the writer process's, under load (unnamed files, syncfs, links, the names made durable
by the next round's syncfs) and when no round follows (the names flushed at once): its
files/s, and the wall and CPU time a file (half a minute).

With ``--image full`` every run uses a 1.8 MB PNG of noise instead of the 18 KB
gradient (the size of a 1024x1024 image from a model; 600 prompts a run, 300 for the
url cases): what saving costs when the images are as large as a batch's. The fast server
answers a prompt in microseconds either way; the client then spends most of a prompt
receiving and parsing 2.4 MB of JSON, and the disk's bare loop may bound the figure.

With ``--flushes`` it measures instead saving off while another process writes 2,000
files/s to disk by the writer process's protocol in rounds of 1, 8 and 64 files (one
syncfs each): the same files, only the number of flushes a second differs, so what a
flush costs a client beside it (three minutes).

With ``--instructions`` it counts instead the client's instructions per prompt under
callgrind (needs valgrind; about five minutes): saving off, with the writer that writes
nothing, and saving to tmpfs, each in a child process at two batch sizes so that start-up
cancels out. The writer process and the server run natively and are not counted. Unlike
prompts/s on a shared machine the count is steady (within ~1.5% between runs), so it says
what saving adds to the client's own work apart from the disk, the host and the noise.

With ``--client-cpu`` it measures instead the client's CPU time per prompt (user and
system) in one process over a transport that answers at once, with no server and no
socket: saving off, with the writer that writes nothing, and saving to tmpfs through the
writer process, each with the collector on and off (about a minute). Noisier than the
count, but in time: it weighs what an instruction count does not (a copy into fresh
memory, a system call, a wake-up, a collection).

With ``--convoy`` it measures instead why a writer thread is slower beside a busy event
loop than alone: the disk's bare loop (at most ``concurrency`` files in flight) alone, on a
thread of a process whose event loop runs a fan-out without saving against the fast
server meanwhile, and in a process of its own beside that fan-out. A thread needs the
interpreter lock back after each system call, and a busy event loop gives it up only
when its switch interval (5 ms) runs out; a process shares no lock.

    python benchmarks/bench_save.py [--prompts N] [--concurrency 64] [--rounds 5]
                                    [--dir DIR] [--tmpfs-dir DIR] [--confine]
                                    [--image {small,full}]
                                    [--convoy | --protocols | --flushes |
                                     --instructions | --client-cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import gc
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

if TYPE_CHECKING:
    from _common import BenchOutput, EmulatorProcess, Row

# -- the server (standard library only: it runs as `python bench_save.py --serve MODE`) ------

_ENDPOINT = b"/v1/images/generations"


#: The image every process of a run uses (``--image``, which each child is given too):
#: "small", an 18 KB gradient (the gated case: what a save costs beside a request is
#: largest with a small image), or "full", 1.8 MB of noise, the size of a 1024x1024 PNG
#: a model returns (what a batch's saves move).
IMAGES = ("small", "full")
_image = "small"


def _png() -> bytes:
    """The run's image (`IMAGES`): a real RGB PNG, made with zlib alone, the same bytes
    in every process."""
    if _image == "full":
        noise = random.Random(1)
        return _png_of(768, 768, lambda y: noise.randbytes(768 * 3), level=1)
    return _png_of(
        96,
        96,
        lambda y: bytes(v for x in range(96) for v in (x * 255 // 96, y * 255 // 96, 128)),
        level=6,
    )


def _png_of(width: int, height: int, row: Callable[[int], bytes], *, level: int) -> bytes:
    """An RGB PNG of ``row(y)`` (``width`` x 3 bytes each), compressed at ``level``."""
    rows = b"".join(b"\x00" + row(y) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, level))
        + chunk(b"IEND", b"")
    )


def _response(status: bytes, body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


class _ImageServer(asyncio.Protocol):
    """Keep-alive HTTP/1.1: POST the endpoint -> a constant answer; GET /img/* -> a PNG."""

    generations = 0
    latency = 0.0
    ok = b""
    image = b""
    stats_answer = b""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while self.transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : None if stop < 0 else stop])
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
            if method == b"POST" and target == _ENDPOINT:
                _ImageServer.generations += 1
                if _ImageServer.latency:
                    # One request at a time per connection: answering later keeps order.
                    loop = asyncio.get_running_loop()
                    loop.call_later(_ImageServer.latency, self._answer, _ImageServer.ok)
                else:
                    self.transport.write(_ImageServer.ok)
            elif method == b"GET" and target.startswith(b"/img/"):
                self.transport.write(_ImageServer.image)
            elif target == b"/_fast/stats":
                body = json.dumps({"requests": _ImageServer.generations}).encode()
                self.transport.write(_response(b"200 OK", body, b"application/json"))
            elif target == b"/_fast/reset":
                _ImageServer.generations = 0
                self.transport.write(_response(b"200 OK", b"{}", b"application/json"))
            else:
                self.transport.write(_response(b"404 Not Found", b"{}", b"application/json"))
        self.buffer = buffer

    def _answer(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _serve(mode: str, port: int, latency: float) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(_ImageServer, "127.0.0.1", port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    png = _png()
    _ImageServer.latency = latency
    if mode == "b64":
        item = {"b64_json": base64.b64encode(png).decode()}
    else:
        item = {"url": f"http://127.0.0.1:{port}/img/lighthouse.png"}
    body = json.dumps({"created": 1700000000, "data": [item]}).encode()
    _ImageServer.ok = _response(b"200 OK", body, b"application/json")
    _ImageServer.image = _response(b"200 OK", png, b"image/png")
    print(f"READY http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await stop


def _write_beside(directory: str, rate: float, size: int = 8) -> None:
    """``--write-beside DIR --rate R [--round-size K]``: write the benchmark's PNG into
    ``DIR`` by the writer process's protocol (`flux_async._files._Rounds`: unnamed files,
    one syncfs(2) per round, links, the names made durable by the next round's syncfs) in
    rounds of ``K`` files (8), at ``R`` files/s, until stdin closes; then print how many
    files it wrote and in how many seconds. Started like the emulator
    (`EmulatorProcess`), whose ``READY`` line it prints first."""
    import select

    from flux_async._files import _Rounds, find_syncfs

    rounds, png = _Rounds(find_syncfs()), _png()
    written, started = 0, time.monotonic()
    print(f"READY {directory}", flush=True)
    try:
        while not select.select([sys.stdin], [], [], 0)[0]:  # readable: closed (EOF)
            rounds.write(
                [(i, (os.path.join(directory, f"{written + i:07d}.png"), png)) for i in range(size)]
            )
            written += size
            ahead = written / rate - (time.monotonic() - started)
            if ahead > 0:
                rounds.settle()  # nothing follows at once, as in the writer process
                time.sleep(ahead)
        rounds.settle()
    finally:
        rounds.close()
    print(written, time.monotonic() - started, flush=True)


# -- the benchmark ------------------------------------------------------------------------------

TARGET = 0.85
MODES = ("b64", "url")
#: (mode, server latency): the fast server, and one answering like a (very fast) model.
CASES = (("b64", 0.0), ("url", 0.0), ("url", 0.2))
#: The case the targets are checked on; the others are information.
GATED = ("b64", 0.0)


def prompts_per_run(args: argparse.Namespace, mode: str, latency: float) -> int:
    """``--prompts``, else 1,000 with ``--quick``, else 10,000 for the gated case and 3,000
    for the others. A bulk job is 10k-1M prompts; the writer process's start (~25 ms) is
    paid once per batch, and in a batch of 3,000 prompts against the fast server (under
    a second) it weighed ~4% of the figure."""
    if args.prompts is not None:
        return int(args.prompts)
    if args.quick:
        return 1000 if _image == "small" else 200
    if _image == "full":  # ~100x the bytes a prompt: runs of seconds, as with small ones
        return 600 if (mode, latency) == GATED else 300
    return 10_000 if (mode, latency) == GATED else 3000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1,000 prompts, 1 round (smoke)")
    parser.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="prompts per run (10,000 with b64 images, 3,000 with url ones)",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--image",
        choices=IMAGES,
        default="small",
        help="the image the server answers with: small (18 KB, the gated case) or full "
        "(1.8 MB, a real 1024x1024 PNG's size; 600 prompts a run)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds (15 of the gated runs, of which --info-rounds with the "
        "rest; 5 with an 'instead' option)",
    )
    parser.add_argument(
        "--info-rounds",
        type=int,
        default=5,
        help="the rounds that run the information variants and cases too (5)",
    )
    parser.add_argument(
        "--gate-only",
        action="store_true",
        help="only the gated case's runs (off, disk, tmpfs and their bare loops): the "
        "gated figures in about seven minutes",
    )
    parser.add_argument(
        "--dir",
        default=os.getcwd(),
        help="where the disk runs write, a fresh directory each, removed after it"
        " (default: the current directory)",
    )
    parser.add_argument(
        "--tmpfs-dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else "",
        help="a memory-backed directory for the runs the disk does not bound "
        "(default: /dev/shm when present; '' skips them)",
    )
    parser.add_argument(
        "--confine",
        action="store_true",
        help="give the server a CPU of its own and the client's event loop the others, "
        "with unconfined off and disk runs beside them (see 'Where the processes run')",
    )
    instead = parser.add_mutually_exclusive_group()
    alternatives = [
        (
            "--convoy",
            "instead: the bare loop alone, on a thread beside a busy fan-out, in a process",
        ),
        (
            "--protocols",
            "instead: the bare loop on disk by the thread writer's protocol and the "
            "writer process's (half a minute)",
        ),
        (
            "--flushes",
            "instead: saving off beside a process writing files to disk in rounds of "
            "1, 8 and 64, one syncfs each (three minutes)",
        ),
        (
            "--instructions",
            "instead: the client's instructions per prompt under valgrind, save_to off "
            "vs on (slow, steady; needs valgrind)",
        ),
        (
            "--client-cpu",
            "instead: the client's CPU per prompt in one process over a transport that "
            "answers at once (no server, no socket), save_to off vs on (a minute)",
        ),
    ]
    options = [
        instead.add_argument(flag, action="store_true", help=text) for flag, text in alternatives
    ]
    # Internal: one counted batch in this process, for --instructions.
    parser.add_argument(
        "--count-child", nargs=3, metavar=("VARIANT", "N", "URL"), help=argparse.SUPPRESS
    )
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--write-beside", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--round-size", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        measures_instead = any(getattr(args, option.dest) for option in options)
        args.rounds = 1 if args.quick else 5 if measures_instead else 15
    args.info_rounds = min(args.info_rounds, args.rounds)
    return args


def cases(args: argparse.Namespace) -> tuple[tuple[str, float], ...]:
    """The cases this run measures: every one, or with ``--gate-only`` the gated one."""
    return (GATED,) if args.gate_only else CASES


def _clean(directory: str) -> None:
    """Remove a run's directory, and let the kernel finish writing back what the run and
    the removal left dirty (sync(2)) before the next run starts: otherwise its flusher
    threads do it during the next run, on the same 2 cores, whichever variant that is."""
    shutil.rmtree(directory, ignore_errors=True)
    os.sync()


class Scratch:
    """The runs' directories: a fresh one per run, under ``base``; those under a base in
    ``keep`` stay until `close` (the end of the benchmark), the others go after their run.

    Why keep them: a batch writes files and removes none, and on some filesystems a
    removal slows the creations that follow it. ext4 without a journal (this VM's disk)
    never reuses an inode freed in the last few seconds, and scans past each such inode
    on every create: measured here, 3,000 files written right after the run before them
    was removed went at 2,700-4,500 files/s, and at 5,400-10,100 files/s after runs whose
    files were kept. Removing each run's files after it made the disk rows measure the
    benchmark's own removals (and how long ago the last one was). On tmpfs, whose files
    are memory, each run's directory goes after its run.

    Example::

        scratch = Scratch({"."})
        directory = scratch.make(".", "flux-bench-save-")
        ...
        scratch.release(directory)
        scratch.close()  # removes what it kept
    """

    def __init__(self, keep: set[str]) -> None:
        self._keep = {os.path.realpath(base) for base in keep}
        self._kept: list[str] = []

    def make(self, base: str, prefix: str) -> str:
        return tempfile.mkdtemp(prefix=prefix, dir=base)

    def release(self, directory: str) -> None:
        if os.path.realpath(os.path.dirname(directory)) in self._keep:
            self._kept.append(directory)
            os.sync()  # its writeback is done before the next run starts
        else:
            _clean(directory)

    def close(self) -> None:
        for directory in self._kept:
            shutil.rmtree(directory, ignore_errors=True)
        self._kept.clear()
        os.sync()


def _scratch(args: argparse.Namespace, count: int, size: int) -> Scratch:
    """Keep the disk runs' files until the end (`Scratch`) if the disk has room for them
    twice over; else remove each after its run, and say so."""
    blocks = -(-size // 4096) + 1  # its data, rounded up to 4 KB blocks, and its inode
    # Per round and warm-up: the disk runs of the b64 and url cases, their bare loops, and
    # the files written beside the run without saving.
    runs = (args.rounds + 1) * 10
    needed = runs * count * blocks * 4096
    free = shutil.disk_usage(args.dir).free
    if free < 2 * needed:
        print(
            f"note: {free / 2**30:.1f} GB free under {args.dir}, and keeping every disk run's"
            f" files until the end takes ~{needed / 2**30:.1f} GB: each is removed after its"
            " run instead, which slows the next run's file creation on some filesystems"
        )
        return Scratch(set())
    return Scratch({args.dir})


def ceiling(
    base: str, count: int, data: bytes, window: int | None = None, scratch: Scratch | None = None
) -> float:
    """Files/s of a bare loop writing ``count`` files of ``data`` into a fresh directory
    under ``base`` by the writer process's protocol (`_files._Rounds`), on one thread (as
    that process does), and nothing else; ``window``: at most that many files not yet
    durable at once (the fan-out's bound: a prompt's worker waits for its file), so each
    window is a round whose names are made durable before the next starts; else all of
    them at once, in one round.
    """
    return _bare_loop(base, count, data, window or count, "settled", scratch)[0]


#: --protocols: how a round is written (`_bare_loop`).
PROTOCOLS = {
    "thread": "the thread writer's: a temporary name, syncfs, rename, fsync of the directory",
    "process": "the writer process's under load: unnamed files, syncfs, links, the names "
    "made durable by the next round's syncfs",
    "settled": "the writer process's when no round follows: its names flushed at once",
}


def _bare_loop(
    base: str, count: int, data: bytes, per_round: int, protocol: str, scratch: Scratch | None
) -> tuple[float, float]:
    """Files/s, and CPU seconds a file, of a bare loop writing ``count`` files of ``data``
    into a fresh directory under ``base`` in rounds of ``per_round``, one after another
    by ``protocol`` (`PROTOCOLS`), and doing nothing else."""
    from flux_async import _files

    scratch = scratch or Scratch(set())
    directory = scratch.make(base, "flux-bench-ceiling-")
    syncfs = _files.find_syncfs()
    rounds = _files._Rounds(syncfs)
    try:
        cpu, started = time.process_time(), time.perf_counter()
        for first in range(0, count, per_round):
            files = [
                (os.path.join(directory, f"{i:06d}.png"), data)
                for i in range(first, min(count, first + per_round))
            ]
            if protocol == "thread":
                _files.write_round(files, syncfs)
                continue
            rounds.write(list(enumerate(files)))
            if protocol == "settled":
                rounds.settle()
        rounds.settle()
        elapsed = time.perf_counter() - started
        return count / elapsed, (time.process_time() - cpu) / count
    finally:
        rounds.close()
        scratch.release(directory)


def protocols(args: argparse.Namespace) -> BenchOutput:
    """The bare loop by each writer's protocol (``--protocols``): files/s, wall and CPU
    time a file, in rounds of 8 files (the writer process's median round at ~4,000
    prompts/s), interleaved over ``--rounds`` rounds, on disk under ``--dir``."""
    from _common import BenchOutput, median

    count, per_round, png = 1000 if args.quick else 6000, 8, _png()
    scratch = _scratch(args, count, len(png))
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in PROTOCOLS}
    try:
        for round_ in range(args.rounds):
            for name in PROTOCOLS:
                # (Its files stay until the end, and are synced after it: `Scratch`.)
                found[name].append(_bare_loop(args.dir, count, png, per_round, name, scratch))
            print(
                f"  round {round_ + 1}: "
                + ", ".join(f"{name} {found[name][-1][0]:.0f} files/s" for name in PROTOCOLS)
            )
    finally:
        scratch.close()
    rate = {name: median([r for r, _ in runs]) for name, runs in found.items()}
    cpu = {name: median([c for _, c in runs]) for name, runs in found.items()}
    rows = [
        _over_off(
            f"disk bare loop files/s, {name} ÷ thread (n={count}, rounds of {per_round})",
            rate[name],
            rate["thread"],
            "/s",
            digits=0,
            peer="thread",
        )
        for name in PROTOCOLS
        if name != "thread"
    ]
    notes = [
        f"{name}: {PROTOCOLS[name]}; {1e6 / rate[name]:.0f} µs of wall time and "
        f"{cpu[name] * 1e6:.0f} µs of CPU a file"
        for name in PROTOCOLS
    ]
    return BenchOutput("how a round of files is written, by writer", rows, notes)


#: ``--flushes``: the sizes of the rounds another process writes files in, one syncfs each.
FLUSH_ROUNDS = (1, 8, 64)
#: ``--flushes``: files/s that process writes, about what saving at 0.85 of this VM's
#: ~2,400-3,000 prompts/s (saving off) would.
FLUSH_PACE = 2000.0


def flushes(args: argparse.Namespace) -> BenchOutput:
    """``--flushes``: saving off against the fast server, alone and while another process
    writes ``FLUSH_PACE`` files/s to disk under ``--dir`` by the writer process's
    protocol, in rounds of each of `FLUSH_ROUNDS` files: prompts/s ÷ alone, the median of
    ``--rounds`` interleaved rounds. The same files at the same pace, only the number of
    syncfs(2) calls a second differs: what each flush costs a client that neither decodes
    nor writes anything (on a VM, the host's work for it)."""
    from _common import BenchOutput, median, prompts

    from flux_async import FluxClient

    c, n = args.concurrency, args.prompts or (1000 if args.quick else 10_000)
    # Each variant's round size (None: alone).
    sizes = {"off": None, **{f"rounds of {size}": size for size in FLUSH_ROUNDS}}
    variants = list(sizes)
    found: dict[str, list[float]] = {variant: [] for variant in variants}
    written: dict[str, list[float]] = {variant: [] for variant in variants[1:]}
    png = _png()
    scratch = _scratch(args, int(FLUSH_PACE * 5), len(png))  # a run lasts ~3-5 s
    writing_beside = _writing_beside()

    async def batch(base_url: str, count: int) -> float:
        async with FluxClient(base_url=base_url, max_connections=2 * c) as client:
            started = time.perf_counter()
            results = await client.gather_generate(prompts(count), concurrency=c)
            wall = time.perf_counter() - started
        if not all(r.ok for r in results):
            raise RuntimeError("a prompt failed against the fast server")
        return count / wall

    try:
        with _this_file_as_a_process()("--serve", "b64", "--latency", "0") as server:
            asyncio.run(batch(server.base_url, 2 * c))  # warm-up
            for round_ in range(args.rounds):
                shift = round_ % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    size = sizes[variant]
                    if size is None:
                        found[variant].append(asyncio.run(batch(server.base_url, n)))
                        continue
                    directory = scratch.make(args.dir, "flux-bench-flushes-")
                    beside = writing_beside(directory, FLUSH_PACE, size)
                    try:
                        with beside:
                            found[variant].append(asyncio.run(batch(server.base_url, n)))
                    finally:
                        scratch.release(directory)
                    written[variant].append(beside.files_per_second)
                print(
                    f"  round {round_ + 1}: "
                    + ", ".join(f"{v} {found[v][-1]:.0f} prompts/s" for v in variants)
                )
    finally:
        scratch.close()
    rows = [
        _versus_off(
            f"prompts/s, save_to off, another process writing {FLUSH_PACE:.0f} files/s to "
            f"disk in {variant} (one syncfs each) ÷ alone, b64 images, fast server "
            f"(n={n}, c={c})",
            found[variant],
            found["off"],
        )
        for variant in variants[1:]
    ]
    notes = [
        "files/s the other process wrote (median): "
        + ", ".join(f"{v} {median(written[v]):.0f}" for v in variants[1:])
        + f"; it aims at {FLUSH_PACE:.0f}, and rounds too small for the disk fall short"
    ]
    title = "saving off beside a process writing files: the cost of a flush"
    return BenchOutput(title, rows, notes)


def _decode_seconds(png: bytes) -> tuple[float, str]:
    """What decoding the ``b64_json`` image costs, per image, with the decoder the library
    uses here (pybase64 when installed, else the standard library's), and its name. A
    decoder holds the interpreter lock, so it adds to the event loop's time whatever
    thread runs it."""
    from flux_async._files import _fast_b64decode
    from flux_async._save import decode_b64

    text = base64.b64encode(png).decode()
    started = time.perf_counter()
    for _ in range(200):
        decode_b64(text)
    seconds = (time.perf_counter() - started) / 200
    return seconds, "pybase64" if "pybase64" in _fast_b64decode().__module__ else "base64"


Rates = dict[tuple[str, float, str], list[float]]
#: The variants whose writer writes nothing, and how long it takes to say it is done.
LOOP_ONLY = {"loop only": 0.0, "loop only +2ms": 0.002}
#: The variants written by the thread writer instead of the process, and where.
THREAD = {"disk, thread writer": "disk", "tmpfs, thread writer": "tmpfs"}
#: Saving off, while another process writes files to disk at the rate the disk run saved
#: them: what the disk's own work costs a client that does not touch it.
BESIDE = "off, disk writes beside"
#: With ``--confine``: off and disk again, with the server and the client left wherever
#: the scheduler puts them (`Cpus.free`), for comparison.
FREE = {"off, unconfined": "off", "disk, unconfined": "disk"}


class Collector:
    """The cyclic garbage collector's time in this process within the block, in
    ``seconds`` (through `gc.callbacks`): what a prompt's objects cost it, those that
    outlive the prompt (its result) and those alive while many prompts wait.

    Example::

        with Collector() as collector:
            run_batch()
        print(collector.seconds)
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> Collector:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)


class Cpus:
    """Where the benchmark's processes run with ``--confine`` ("Where the processes run",
    module docstring): the server on the last CPU this process may use, the client's
    event loop (this thread) on the others, the writer process and the process writing
    beside a run on all of them. Nothing is confined with ``enabled`` False (the
    default), on fewer than 2 CPUs, or where the system has no CPU affinity.

    Example::

        cpus = Cpus(True)
        cpus.confine(server.pid)
        with cpus.free(server.pid):
            ...  # a run with nothing confined
        cpus.release(server.pid)
    """

    def __init__(self, enabled: bool) -> None:
        getaffinity = getattr(os, "sched_getaffinity", None)
        self.all: set[int] = set(getaffinity(0)) if getaffinity is not None else set()
        self.enabled = enabled and len(self.all) >= 2
        self.server = {max(self.all)} if self.enabled else self.all
        self.client = self.all - self.server if self.enabled else self.all

    def describe(self) -> str:
        """Where the processes run, in words, for the benchmark's notes."""
        if not self.enabled:
            return "every process wherever the scheduler put it"
        return (
            f"the server on CPU {_listed(self.server)}, the client's event loop on CPU "
            f"{_listed(self.client)}, its writer process (and the process writing beside a "
            f"run) on CPUs {_listed(self.all)}"
        )

    def confine(self, server: int) -> None:
        """Put process ``server`` on its CPU and this thread on the others."""
        if self.enabled:
            os.sched_setaffinity(server, self.server)
            os.sched_setaffinity(0, self.client)  # this thread: threads it starts inherit it

    def release(self, server: int | None = None) -> None:
        """Let this thread, and process ``server`` if given, run on every CPU again."""
        if self.enabled:
            os.sched_setaffinity(0, self.all)
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(server, self.all)

    @contextlib.contextmanager
    def free(self, server: int) -> Iterator[None]:
        """Within the block nothing is confined; confined again after it."""
        self.release(server)
        try:
            yield
        finally:
            self.confine(server)

    def widen(self, pid: int) -> None:
        """Let process ``pid``, started from this thread, run on every CPU."""
        if self.enabled:
            os.sched_setaffinity(pid, self.all)

    def writer(self) -> contextlib.AbstractContextManager[object]:
        """Within the block, the writer process a fan-out starts runs on every CPU (it
        would inherit this thread's CPU otherwise): `_writer_on_every_cpu.py` starts it."""
        if not self.enabled:
            return contextlib.nullcontext()
        from flux_async import _files, _writer_process

        stack = contextlib.ExitStack()
        script = str(Path(__file__).with_name("_writer_on_every_cpu.py"))
        stack.enter_context(mock.patch.object(_writer_process, "_SCRIPT", script))
        stack.enter_context(
            mock.patch.dict(
                os.environ,
                FLUX_BENCH_FILES=_files.__file__,
                FLUX_BENCH_CPUS=_listed(self.all),
            )
        )
        return stack


def _listed(cpus: set[int]) -> str:
    """``{1, 0}`` as ``"0,1"``: how `Cpus` names CPUs, and how the writer reads them."""
    return ",".join(map(str, sorted(cpus)))


def _writer_does_nothing(delay: float) -> contextlib.AbstractContextManager[object]:
    """Within the block, every image handed to a writer is done ``delay`` seconds later
    (at once for 0), unread and unwritten: its future gets the path it would have had."""
    from flux_async import _save, _writer_process

    def write(self: _save.Writer, job: _save.ImageJob) -> asyncio.Future[str]:
        path = os.path.join(job.directory, job.name + ".png")
        if delay:
            job.loop.call_later(delay, _finish, job.future, path)
        else:
            job.future.set_result(path)
        return job.future

    stack = contextlib.ExitStack()
    for writer in (_save.ImageWriter, _writer_process.ProcessWriter):
        stack.enter_context(mock.patch.object(writer, "write", write))
    return stack


def _finish(future: asyncio.Future[str], path: str) -> None:
    if not future.done():
        future.set_result(path)


def _this_file_as_a_process(image: str | None = None) -> type[EmulatorProcess]:
    """The class that starts and stops this file as a child (``--serve MODE``,
    ``--write-beside DIR``) like the emulator, serving ``image`` (default: this run's
    ``--image``): `_common` is imported here, not at the top, because the children run
    with the standard library only."""
    from _common import EmulatorProcess

    size = _image if image is None else image

    class ImageServerProcess(EmulatorProcess):
        """This file with ``--serve MODE``, started and stopped like the emulator."""

        def command(self) -> list[str]:
            return [sys.executable, str(Path(__file__).resolve()), *self.args, "--image", size]

        def stats(self) -> dict[str, object]:
            return self._get_json("/_fast/stats")

    return ImageServerProcess


def _writing_beside() -> type[EmulatorProcess]:
    """The class of this file run as ``--write-beside DIR --rate R --round-size K``
    (`_write_beside`): ``WritingBeside(directory, rate, size=8)``; stopping it closes its
    stdin, so it ends its round and says how many files/s it wrote."""

    class WritingBeside(_this_file_as_a_process()):
        stdin_pipe = True

        def __init__(self, directory: str, rate: float, size: int = 8) -> None:
            super().__init__(
                "--write-beside", directory, "--rate", f"{rate:.0f}", "--round-size", str(size)
            )
            self.files_per_second = 0.0

        def stop(self) -> None:
            process = self._proc
            try:
                if process is not None and process.poll() is None:
                    assert process.stdin is not None
                    assert process.stdout is not None
                    process.stdin.close()
                    process.wait(timeout=60)
                    count, seconds = process.stdout.read().split()
                    self.files_per_second = int(count) / float(seconds)
            finally:
                super().stop()

    return WritingBeside


def run(args: argparse.Namespace) -> BenchOutput:
    from _common import median, prompts

    from flux_async import FluxClient, _writer_process

    ImageServerProcess = _this_file_as_a_process()
    WritingBeside = _writing_beside()

    c = args.concurrency
    places = {"disk": args.dir}
    if args.tmpfs_dir:
        places["tmpfs"] = args.tmpfs_dir
    png = _png()

    async def batch(
        base_url: str,
        base: str | None,
        count: int,
        *,
        loop_only: float | None = None,
        thread: bool = False,
        beside: WritingBeside | None = None,
    ) -> tuple[float, int, int, float]:
        """Wall time, prompts ok, files saved, and the collector's seconds."""
        directory = None if base is None else scratch.make(base, "flux-bench-save-")
        try:
            async with FluxClient(base_url=base_url, max_connections=2 * c) as client:
                writer: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
                if loop_only is not None:
                    writer = _writer_does_nothing(loop_only)
                elif thread:
                    writer = mock.patch.object(_writer_process, "can_start", return_value=False)
                collector = Collector()
                with beside or contextlib.nullcontext(), writer, cpus.writer(), collector:
                    if beside is not None:
                        cpus.widen(beside.pid)
                    started = time.perf_counter()
                    results = await client.gather_generate(
                        prompts(count), concurrency=c, save_to=directory
                    )
                    wall = time.perf_counter() - started
            if loop_only is not None:  # nothing was written: count the paths given back
                saved = sum(len(r.files) for r in results)
            else:
                saved = 0 if directory is None else len(os.listdir(directory))
            return wall, sum(r.ok for r in results), saved, collector.seconds
        finally:
            if directory is not None:
                scratch.release(directory)

    # (mode, latency, "off" or a place) -> prompts/s; (mode, latency, a place or
    # "disk window") -> the bare loop's files/s.
    rates: Rates = {}
    collecting: Rates = {}  # the same keys as rates -> the collector's µs a prompt
    ceilings: Rates = {}
    written: list[float] = []  # files/s of the process writing beside a fan-out
    problems: list[str] = []
    scratch = _scratch(args, max(prompts_per_run(args, *case) for case in cases(args)), len(png))
    cpus = Cpus(args.confine)
    try:
        print(
            f"saving: concurrency {c}, {args.rounds} round(s) of the gated runs, the first "
            f"{args.info_rounds} with the rest; writer process; "
            + ", ".join(f"{k} {v}" for k, v in places.items())
            + f"; {cpus.describe()}"
        )
        for mode, latency in cases(args):
            n = prompts_per_run(args, mode, latency)
            # With a slow server neither the disk nor tmpfs is near the bound: disk only.
            where = dict(places) if not latency else {"disk": args.dir}
            variants = ["off", *where]
            gated = (mode, latency) == GATED
            if gated and not args.gate_only:
                variants.insert(variants.index("disk") + 1, BESIDE)
                for variant in LOOP_ONLY:
                    variants.append(variant)
                    where[variant] = args.tmpfs_dir or args.dir
                for variant, place in THREAD.items():
                    if place in places:
                        variants.append(variant)
                        where[variant] = places[place]
                if cpus.enabled:
                    for variant, place in FREE.items():
                        variants.append(variant)
                        if place in places:
                            where[variant] = places[place]
            with ImageServerProcess("--serve", mode, "--latency", str(latency)) as server:
                try:
                    cpus.confine(server.pid)
                    for variant in variants:  # warm-up
                        if variant == BESIDE:
                            continue  # a run without saving, as "off" is
                        only = LOOP_ONLY.get(variant)
                        asyncio.run(
                            batch(server.base_url, where.get(variant), 2 * c, loop_only=only)
                        )
                    for round_ in range(args.rounds if gated else args.info_rounds):
                        # Past the first rounds, the gated runs alone: their targets get
                        # three times the rounds, the information rows no more time.
                        in_round = variants
                        if round_ >= args.info_rounds:
                            in_round = [variant for variant in variants if variant in PAIRED]
                        for variant in round_order(in_round, round_):
                            only = LOOP_ONLY.get(variant)
                            thread = variant in THREAD
                            beside = None
                            if variant == BESIDE:
                                # As many files a second as the disk runs so far saved.
                                pace = median(rates[(mode, latency, "disk")])
                                scratch_beside = scratch.make(args.dir, "flux-bench-beside-")
                                beside = WritingBeside(scratch_beside, pace)
                            free = cpus.free(server.pid) if variant in FREE else None
                            try:
                                with free or contextlib.nullcontext():
                                    wall, ok, saved, collected = asyncio.run(
                                        batch(
                                            server.base_url,
                                            where.get(variant),
                                            n,
                                            loop_only=only,
                                            thread=thread,
                                            beside=beside,
                                        )
                                    )
                            finally:
                                if beside is not None:
                                    scratch.release(scratch_beside)
                            rates.setdefault((mode, latency, variant), []).append(ok / wall)
                            collecting.setdefault((mode, latency, variant), []).append(
                                collected / n * 1e6
                            )
                            label = (
                                f"save {variant}"
                                if where.get(variant) is None
                                else f"save on, {variant}"
                            )
                            if beside is not None:
                                label = f"{variant} ({beside.files_per_second:.0f} files/s)"
                                written.append(beside.files_per_second)
                            rate = f"{ok / wall:8.0f} prompts/s ({wall:.2f} s)"
                            print(f"  {mode:>3} latency {latency:g} s, {label:<14}: {rate}")
                            if ok != n or (where.get(variant) is not None and saved != n):
                                problems.append(f"{mode} {variant}: {ok} ok, {saved} files of {n}")
                        if latency:
                            continue
                        loops = [(p, base, None) for p, base in where.items() if p in places]
                        for place, base, window in [*loops, ("disk window", args.dir, c)]:
                            files = ceiling(base, n, png, window, scratch)
                            ceilings.setdefault((mode, latency, place), []).append(files)
                            print(f"  bare loop, {place:<11}: {files:8.0f} files/s")
                finally:
                    cpus.release(server.pid)
    finally:
        scratch.close()
    decode = _decode_seconds(png)
    return _output(
        args, rates, collecting, ceilings, written, problems, decode, len(png), cpus.describe()
    )


#: The variants the targets are read from, and "off", their denominator.
PAIRED = ("disk", "off", "tmpfs")


def round_order(variants: list[str], round_: int) -> list[str]:
    """The order of a round's runs: `PAIRED` first, next to one another with "off" in
    the middle, reversed every other round; then the rest, rotated.

    Each target is a median of the rounds' own ratios (disk or tmpfs ÷ off), and this
    machine's speed drifts by tens of percent within a minute: runs far apart in a round
    (up to seven runs apart with the information variants between them, as a plain
    rotation placed them) made those ratios spread 0.55-1.06. Reversing the pairs every
    other round keeps either side from always running first.

    Example::

        round_order(["off", "disk", "tmpfs", "loop only"], 1)  # tmpfs, off, disk, loop only
    """
    block = [variant for variant in PAIRED if variant in variants]
    if round_ % 2:
        block.reverse()
    rest = [variant for variant in variants if variant not in block]
    shift = round_ % len(rest) if rest else 0
    return block + rest[shift:] + rest[:shift]


def _paired(on: list[float], off: list[float], files: list[float] | None = None) -> list[float]:
    """Each round's own ratio, on ÷ off (÷ min(off, files) with a ceiling): the two runs
    of a round ran back to back, so their ratio is steadier than one of two medians on a
    machine whose load drifts from second to second (as in ``bench_overhead.py``).
    A variant that ran only in the first rounds (``--info-rounds``) is paired with those."""
    bounds = off if files is None else [min(a, b) for a, b in zip(off, files, strict=True)]
    return [a / b for a, b in zip(on, bounds[: len(on)], strict=True)]


def _versus_off(figure: str, runs: list[float], offs: list[float]) -> Row:
    """An information row: the median of the rounds' own ratios, ``runs`` ÷ ``offs``."""
    from _common import median

    return _over_off(
        figure,
        median(runs),
        median(offs[: len(runs)]),  # the rounds it ran in
        "/s",
        ratio=median(_paired(runs, offs)),
        digits=0,
    )


def _over_off(
    figure: str,
    value: float,
    off: float,
    unit: str,
    *,
    ratio: float | None = None,
    digits: int = 1,
    peer: str = "off",
) -> Row:
    """An information row: ``value`` and ``off`` (named ``peer``) shown with ``unit``, and
    ``ratio`` (``value`` ÷ ``off`` when None)."""
    from _common import Row

    return Row(
        figure=figure,
        flux=f"{value:.{digits}f}{unit}",
        peer=f"{peer} {off:.{digits}f}{unit}",
        ratio=f"{value / off if ratio is None else ratio:.2f}",
        target="(info)",
        met=None,
    )


def _output(
    args: argparse.Namespace,
    rates: Rates,
    collecting: Rates,
    ceilings: Rates,
    written: list[float],
    problems: list[str],
    decode: tuple[float, str],
    size: int,
    placement: str,
) -> BenchOutput:
    from _common import BenchOutput, Row, median

    c = args.concurrency
    rows = []
    notes = []
    for mode, latency in cases(args):
        n = prompts_per_run(args, mode, latency)
        gated = (mode, latency) == GATED
        server = "fast server" if not latency else f"{latency:g} s server latency"
        offs = rates[(mode, latency, "off")]
        off = median(offs)
        disk = median(rates[(mode, latency, "disk")])
        rows.append(
            _versus_off(
                f"prompts/s, save_to on ÷ off, {mode} images, {server}, disk (n={n}, c={c})",
                rates[(mode, latency, "disk")],
                offs,
            )
        )
        note = f"{mode}, {server}: off {off:.0f} prompts/s; disk: on {disk:.0f} prompts/s"
        bounds = [("disk", "disk"), ("disk window", "disk"), ("tmpfs", "tmpfs")]
        for bound, place in bounds if not latency else ():
            if (mode, latency, bound) not in ceilings:
                continue  # no tmpfs
            on = median(rates[(mode, latency, place)])
            files = median(ceilings[(mode, latency, bound)])
            rounds = _paired(rates[(mode, latency, place)], offs, ceilings[(mode, latency, bound)])
            ratio = median(rounds)
            checked = gated and bound != "disk window"
            loop = f"at most c={c} files in flight" if bound == "disk window" else "all at once"
            rows.append(
                Row(
                    figure=(
                        f"prompts/s, save_to on ÷ min(off, bare loop {loop}), {mode} images, "
                        f"{server}, {place} (n={n}, c={c})"
                    ),
                    flux=f"{on:.0f}/s",
                    peer=f"min({off:.0f}, {files:.0f})/s",
                    ratio=f"{ratio:.2f}",
                    target=f">= {TARGET:.2f}" if checked else "(info)",
                    met=(ratio >= TARGET and not problems) if checked else None,
                )
            )
            if place == "tmpfs":
                note += f"; tmpfs: on {on:.0f} prompts/s"
            note += f", bare loop ({loop}) {files:.0f} files/s"
            if checked:
                note += (
                    " (round by round: "
                    + ", ".join(f"{r:.2f}" for r in rounds)
                    + f"; ratio of the medians instead: {on / min(off, files):.2f})"
                )
        if (mode, latency, BESIDE) in rates:
            beside = median(rates[(mode, latency, BESIDE)])
            rows.append(
                _versus_off(
                    f"prompts/s, save_to off, another process writing files to disk at the "
                    f"disk run's pace ÷ alone, {mode} images, {server} (n={n}, c={c})",
                    rates[(mode, latency, BESIDE)],
                    offs,
                )
            )
            note += (
                f"; off with disk writes beside: {beside:.0f} prompts/s, the other process "
                f"writing {median(written):.0f} files/s"
            )
        for variant, place in THREAD.items():
            if (mode, latency, variant) not in rates:
                continue
            runs = rates[(mode, latency, variant)]
            on, ran = median(runs), len(runs)  # the first rounds (--info-rounds)
            files = median(ceilings[(mode, latency, place)][:ran])
            ratio = median(_paired(runs, offs, ceilings[(mode, latency, place)]))
            rows.append(
                Row(
                    figure=(
                        f"prompts/s, save_to on with the thread writer ÷ min(off, bare loop all "
                        f"at once), {mode} images, {server}, {place} (n={n}, c={c})"
                    ),
                    flux=f"{on:.0f}/s",
                    peer=f"min({median(offs[:ran]):.0f}, {files:.0f})/s",
                    ratio=f"{ratio:.2f}",
                    target="(info)",
                    met=None,
                )
            )
            note += f"; {variant}: {on:.0f} prompts/s"
        if (mode, latency, "disk, unconfined") in rates:
            free_off = rates[(mode, latency, "off, unconfined")]
            rows.append(
                _versus_off(
                    f"prompts/s, save_to on ÷ off, both with every process wherever the "
                    f"scheduler puts it, {mode} images, {server}, disk (n={n}, c={c})",
                    rates[(mode, latency, "disk, unconfined")],
                    free_off,
                )
            )
            note += (
                f"; unconfined: off {median(free_off):.0f} prompts/s, disk "
                f"{median(rates[(mode, latency, 'disk, unconfined')]):.0f} prompts/s"
            )
        for variant, delay in LOOP_ONLY.items():
            if (mode, latency, variant) not in rates:
                continue
            only = median(rates[(mode, latency, variant)])
            after = f"{delay * 1000:g} ms later" if delay else "at once"
            rows.append(
                _versus_off(
                    f"prompts/s, save_to on with a writer that writes nothing and answers "
                    f"{after} ÷ off, {mode} images, {server} (n={n}, c={c})",
                    rates[(mode, latency, variant)],
                    offs,
                )
            )
            note += f"; {variant} (no decoding, no files): {only:.0f} prompts/s"
        notes.append(note)
    off = median(rates[(*GATED, "off")])
    seconds, decoder = decode
    notes.append(
        f"decoding the {size / 1000:.0f} KB b64_json image takes {seconds * 1e6:.1f} µs "
        f"({decoder}), with the interpreter lock held: at {off:.0f} prompts/s that alone "
        f"bounds b64 on ÷ off near {1 / (1 + seconds * off):.2f} when the client is CPU-bound"
    )
    spent = {v: median(collecting[k]) for k in collecting if k[:2] == GATED for v in k[2:]}
    if spent:
        notes.append(
            "the cyclic garbage collector's time a prompt in the client (gc.callbacks, "
            "medians; part of the prompts/s above): "
            + ", ".join(f"{variant} {us:.1f} µs" for variant, us in spent.items())
        )
    notes.append(f"where the processes ran: {placement}")
    notes += problems
    return BenchOutput("saving images", rows, notes)


def convoy(args: argparse.Namespace) -> BenchOutput:
    """The bare loop's files/s alone, on a thread beside a busy fan-out, and in a process
    beside it (``--convoy``), interleaved over ``--rounds`` rounds."""
    import concurrent.futures

    from _common import BenchOutput, median, prompts

    from flux_async import FluxClient

    ImageServerProcess = _this_file_as_a_process()
    n, c = args.prompts or (1000 if args.quick else 3000), args.concurrency
    # A module-level function and its arguments: the process pool pickles them.
    bare_loop = functools.partial(ceiling, args.dir, n, _png(), c)

    async def beside_a_fanout(
        base_url: str, executor: concurrent.futures.Executor | None
    ) -> tuple[float, float]:
        """The bare loop's files/s on ``executor`` (None: a thread of this process), and
        the fan-out's prompts/s while it ran."""
        loop = asyncio.get_running_loop()
        files = loop.run_in_executor(executor, bare_loop)
        async with FluxClient(base_url=base_url, max_connections=2 * c) as client:
            done, started = 0, time.perf_counter()
            while not files.done():
                results = await client.gather_generate(prompts(4 * c), concurrency=c)
                done += sum(r.ok for r in results)
            rate = done / (time.perf_counter() - started)
        return await files, rate

    found: dict[str, list[float]] = {}
    with (
        ImageServerProcess("--serve", "b64", "--latency", "0") as server,
        concurrent.futures.ProcessPoolExecutor(1) as processes,
    ):
        processes.submit(int).result()  # started before the first round
        for round_ in range(args.rounds):
            found.setdefault("alone", []).append(bare_loop())
            for where, executor in (("thread", None), ("process", processes)):
                files, rate = asyncio.run(beside_a_fanout(server.base_url, executor))
                found.setdefault(where, []).append(files)
                found.setdefault(f"{where} fan-out", []).append(rate)
            print(
                f"  round {round_ + 1}: bare loop alone {found['alone'][-1]:.0f} files/s, "
                f"on a thread {found['thread'][-1]:.0f}, in a process {found['process'][-1]:.0f}"
            )
    alone = median(found["alone"])
    rows = [
        _over_off(
            f"disk bare loop files/s {label} beside a fan-out ÷ alone (n={n}, c={c})",
            median(found[where]),
            alone,
            "/s",
            digits=0,
            peer="alone",
        )
        for where, label in (("thread", "on a thread"), ("process", "in a process"))
    ]
    notes = [
        f"the fan-out beside it: {median(found['thread fan-out']):.0f} prompts/s with the "
        f"thread, {median(found['process fan-out']):.0f} with the process"
    ]
    return BenchOutput("a writer thread beside a busy event loop", rows, notes)


#: --instructions: batch sizes whose difference is counted (start-up cancels out).
INSTRUCTION_SIZES = (1000, 3000)
#: --instructions and --client-cpu: what is measured. Saving off; saving with a writer
#: that writes nothing and answers at once (the event loop's own share of a save: the
#: saver, the job, its future, the path); saving to tmpfs through the writer process (that
#: share plus decoding the image and handing it to the process, whose own work is not
#: counted).
COUNTED = {
    "off": "save_to off",
    "loop only": "a writer that writes nothing",
    "tmpfs": "save_to on, tmpfs",
}


@contextlib.contextmanager
def _saving_as(variant: str, tmpfs_dir: str, prefix: str) -> Iterator[str | None]:
    """The ``save_to`` of one of `COUNTED` (None for "off"): a fresh directory under
    ``tmpfs_dir``, removed afterwards, with the writer that writes nothing for "loop only"."""
    if variant == "off":
        yield None
        return
    directory = tempfile.mkdtemp(prefix=prefix, dir=tmpfs_dir)
    try:
        with _writer_does_nothing(0.0) if variant == "loop only" else contextlib.nullcontext():
            yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def client_cpu(args: argparse.Namespace) -> BenchOutput:
    """``--client-cpu``: the client's CPU time per prompt (user + system, `getrusage`) for
    each of `COUNTED`, in this one process, over a transport that answers this file's
    b64 body at once: no server and no socket share the CPU, so the figure is the client's
    own cost, in time rather than instructions (a copy into fresh memory, a collection, a
    system call cost more time per instruction than the interpreter's loop). Each variant
    runs with the collector on (as a user's program does) and off (what the collector's
    share is), ``--rounds`` interleaved rounds after a warm-up, medians shown, each at two
    batch sizes so that the start cancels out; the writer process's own CPU is not
    counted."""
    import resource

    from _common import BenchOutput, median

    from flux_async import AsyncTransport, FluxClient, TransportRequest, TransportResponse

    if not args.tmpfs_dir:
        raise RuntimeError("--client-cpu writes to --tmpfs-dir: give one")
    body = json.dumps(
        {"created": 1700000000, "data": [{"b64_json": base64.b64encode(_png()).decode()}]}
    ).encode()
    headers = {"content-type": "application/json"}

    class Instant(AsyncTransport):
        async def send(self, request: TransportRequest) -> TransportResponse:
            await asyncio.sleep(0)  # one turn of the loop, as an answer from a socket takes
            return TransportResponse(200, headers=headers, body=body)

        async def aclose(self) -> None:
            pass

    n, c = args.prompts or (1000 if args.quick else 6000), args.concurrency
    # Each figure is the CPU of a batch of n prompts less that of a batch of n // 4, per
    # prompt between them: what a prompt costs once the batch runs, without the start
    # (the writer process's ~25 ms, during which a thread writes the images, which at the
    # ~15,000 prompts/s of this transport would be ~7% of a 6,000-prompt batch).
    low = n // 4

    async def batch(variant: str, n: int) -> float:
        with _saving_as(variant, args.tmpfs_dir, "flux-bench-cpu-") as directory:
            async with FluxClient(base_url="http://127.0.0.1:9/v1", transport=Instant()) as client:
                before = resource.getrusage(resource.RUSAGE_SELF)
                results = await client.gather_generate(
                    [f"prompt {i}" for i in range(n)], concurrency=c, save_to=directory
                )
                after = resource.getrusage(resource.RUSAGE_SELF)
        if sum(r.ok for r in results) != n:
            raise RuntimeError(f"{variant}: not every prompt succeeded")
        return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    variants = [(v, collector) for collector in (True, False) for v in COUNTED]
    found: dict[tuple[str, bool], list[float]] = {key: [] for key in variants}
    try:
        for round_ in range(args.rounds + 1):  # the first is a warm-up
            for variant, collector in variants[round_ % 3 :] + variants[: round_ % 3]:
                (gc.enable if collector else gc.disable)()
                used = asyncio.run(batch(variant, n)) - asyncio.run(batch(variant, low))
                if round_:
                    found[variant, collector].append(used / (n - low) * 1e6)
            if round_:
                print(
                    f"  round {round_}: "
                    + ", ".join(
                        f"{v}{'' if g else ' (no gc)'} {found[v, g][-1]:.1f}" for v, g in variants
                    )
                    + " us/prompt"
                )
    finally:
        gc.enable()
    rows = []
    for collector in (True, False):
        off = median(found["off", collector])
        for variant in ("loop only", "tmpfs"):
            cpu = median(found[variant, collector])
            rows.append(
                _over_off(
                    f"client CPU us/prompt, {COUNTED[variant]} ÷ save_to off, b64 images, "
                    f"instant transport{'' if collector else ', collector off'} (n={n}, c={c})",
                    cpu,
                    off,
                    " us",
                )
            )
    notes = [
        f"median of {args.rounds} interleaved round(s) after a warm-up, one process; per "
        f"prompt: (CPU of a batch of {n} - CPU of one of {low}) / {n - low}; "
        "`gather_generate` over a transport answering at once (a real client adds aiohttp "
        "and the socket's ~120-150 us a prompt, the same in each variant); saving adds "
        + ", ".join(
            f"{median(found['tmpfs', g]) - off_cpu:.1f} us a prompt (the event loop's own "
            f"share {median(found['loop only', g]) - off_cpu:.1f}) with the collector "
            f"{'on' if g else 'off'}"
            for g, off_cpu in ((g, median(found["off", g])) for g in (True, False))
        )
    ]
    return BenchOutput("saving images: the client's CPU per prompt", rows, notes)


def count_instructions(args: argparse.Namespace) -> BenchOutput:
    """``--instructions``: the client's instructions per prompt, counted by callgrind,
    for each of `COUNTED`, against this file's b64 server; the same figure at two batch
    sizes, so start-up and imports cancel out. Unlike prompts/s on a shared VM, which moves
    by tens of percent between runs, the count moves by ~1.5%: it says what saving adds to
    the client's own work, which a prompts/s ratio mixes with the disk's, the host's and
    the collector's."""
    from _common import BenchOutput, callgrind_counts

    if not args.tmpfs_dir:
        raise RuntimeError("--instructions writes to --tmpfs-dir: give one")
    c, (low, high) = args.concurrency, INSTRUCTION_SIZES
    counted: dict[str, float] = {}
    with _this_file_as_a_process()("--serve", "b64", "--latency", "0") as server:
        for variant in COUNTED:
            counts = []
            for n in (low, high):
                arguments = [str(Path(__file__).resolve()), "--concurrency", str(c)]
                arguments += ["--tmpfs-dir", args.tmpfs_dir]
                arguments += ["--count-child", variant, str(n), server.base_url]
                counts.append(callgrind_counts(arguments)["Ir"])
            counted[variant] = (counts[1] - counts[0]) / (high - low)
            print(f"  instructions, {COUNTED[variant]}: {counted[variant] / 1000:.1f}k per prompt")
    off = counted["off"]
    rows = [
        _over_off(
            f"client instructions/prompt, {COUNTED[variant]} ÷ save_to off, b64 images, "
            f"fast server (callgrind, c={c})",
            counted[variant] / 1000,
            off / 1000,
            "k",
        )
        for variant in ("loop only", "tmpfs")
    ]
    notes = [
        f"instructions per prompt: (count at {high} prompts - count at {low}) / {high - low}, "
        "the client alone under callgrind (the writer process and the server run natively "
        "and are not counted); callgrind counts each byte a `rep movsb` copies as an "
        "instruction, so the copy of each image into the memory shared with the writer "
        "(~18k of them) weighs more here than on the CPU",
        f"saving to tmpfs adds {(counted['tmpfs'] - off) / 1000:.1f}k instructions per prompt, "
        f"of which the event loop's own share of a save is "
        f"{(counted['loop only'] - off) / 1000:.1f}k and decoding and handing the image to "
        f"the writer process {(counted['tmpfs'] - counted['loop only']) / 1000:.1f}k",
    ]
    return BenchOutput("saving images: the client's own work (callgrind)", rows, notes)


def count_child(args: argparse.Namespace) -> int:
    """``--count-child VARIANT N URL``: one batch of ``N`` prompts as `COUNTED` says, in
    this process (which `count_instructions` runs under callgrind)."""
    from _common import prompts

    from flux_async import FluxClient

    variant, n, base_url = args.count_child[0], int(args.count_child[1]), args.count_child[2]
    c = args.concurrency

    async def batch() -> int:
        with _saving_as(variant, args.tmpfs_dir, "flux-bench-count-") as directory:
            async with FluxClient(base_url=base_url, max_connections=2 * c) as client:
                results = await client.gather_generate(prompts(n), concurrency=c, save_to=directory)
        return sum(r.ok for r in results)

    return 0 if asyncio.run(batch()) == n else 1


def main() -> int:
    global _image
    args = parse_args()
    _image = args.image
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.serve, args.port, args.latency))
        return 0
    if args.write_beside is not None:
        _write_beside(args.write_beside, args.rate, args.round_size)
        return 0
    if args.count_child is not None:
        return count_child(args)
    if args.instructions:
        count_instructions(args).print()
    elif args.client_cpu:
        client_cpu(args).print()
    elif args.protocols:
        protocols(args).print()
    elif args.flushes:
        flushes(args).print()
    else:
        (convoy(args) if args.convoy else run(args)).print()
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv or "--write-beside" in sys.argv:
        sys.exit(main())
    from _common import run_main

    run_main(main)
