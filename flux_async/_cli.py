"""The ``flux-async`` command line: bulk jobs from a prompts file, and a demo.

It comes with the ``cli`` extra (``pip install 'flux-async[cli]'``: click and tqdm); the
library never imports this module. Run it as ``flux-async`` or ``python -m flux_async``.

Examples::

    $ flux-async batch prompts.txt --out run1 --aspect-ratio 16:9     # images, manifest, gallery
    $ flux-async batch prompts.txt --out run1                          # again: resumes
    $ flux-async generate prompts.txt --out results.jsonl --aspect-ratio 16:9 --rate-limit 20
    $ jq -c '{prompt: .title, n: 2}' items.json | flux-async generate --jsonl
    $ flux-async generate prompts.txt --emulator --emulator-rate-limit 20   # offline dry run
    $ flux-async demo                                                      # no key, no network

``batch`` saves every prompt's images into a directory with a manifest, resumes after a
crash and ends with a gallery (the engine is ``_batch.py``; the guide "Bulk jobs").
``generate`` writes one JSON line per prompt as soon as it finishes (completion order;
``index`` says which prompt it was) and a summary to stderr. Exit status: 0 when every
prompt succeeded, 1 when some failed, 2 for bad usage or input, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, BinaryIO, NoReturn

import attrs
import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ._batch import (
    GENERATED,
    BatchDirectory,
    BatchError,
    Plan,
    Source,
    effective_records,
    run_batch,
    thread_lines,
)
from ._client import ENV_API_KEY, ENV_BASE_URL, FluxClient, RequestFields
from ._exceptions import APIStatusError, BatchStoppedError, ImageSaveError, ValidationError
from ._fanout import (
    DEFAULT_CONCURRENCY,
    DEFAULT_STOP_ON,
    Fanout,
    FanoutStatistics,
    GenerationResult,
    PromptInput,
)
from ._gallery import render_gallery
from ._models import FIELD_SPECS, ImageRequest
from ._retry import RetryPolicy
from ._save import Downloader, write_atomic
from ._transport import DEFAULT_MAX_CONNECTIONS
from .emulator import Emulator
from .emulator.__main__ import main as emulator_main

__all__ = ["cli", "main", "sample_prompts"]

#: The Redis of a shared quota, for `batch --redis` (read only by the command line).
ENV_REDIS_URL = "FLUX_REDIS_URL"
#: The shared quota's name when `--limiter-name` is not given.
DEFAULT_LIMITER_NAME = "flux-async"
#: The demo's emulator: a capacity the default concurrency overruns, so 429s happen and
#: the adaptive limiter has to find the rate, and a latency like a (very fast) model's.
DEMO_RATE_LIMIT = 40.0
DEMO_BURST = 10
DEMO_LATENCY = 0.05
DEMO_CONCURRENCY = 32
DEMO_OUT = "flux-async-demo"
# The demo's input, as its batch.json names it: a demo only ever replaces a demo's output.
_DEMO_INPUT = "flux-async demo sample prompts"

# Sent to the emulator instead of the user's key: a real key has no business on a fake
# server, and FluxClient would otherwise fall back to $FLUX_API_KEY.
_EMULATOR_KEY = "sk-emulator"
_EXIT_FAILED = 1
_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130
_EMULATOR_NOTE = (
    "flux-async: --emulator: every request goes to the bundled emulator at {url}; "
    "no real API is used and the images are placeholders."
)

_SUBJECTS = (
    "a lighthouse at dusk",
    "a red fox in fresh snow",
    "a cup of coffee on a rainy windowsill",
    "an old tram climbing a hill",
    "a koi pond in autumn",
    "a mountain cabin under the northern lights",
    "a robot watering tomato plants",
    "a paper boat on a puddle",
    "a busy night market",
    "a whale breaching at sunrise",
    "a library with floating books",
    "a desert caravan at noon",
    "a cat asleep on a piano",
    "a bicycle leaning on a yellow wall",
    "a glass greenhouse in the fog",
    "an astronaut fishing on the moon",
    "a bowl of ramen, steam rising",
    "a windmill in a tulip field",
    "a violin on a velvet chair",
    "a city skyline after rain",
)
_STYLES = (
    "watercolor",
    "oil painting",
    "35mm photograph",
    "isometric 3D render",
    "ukiyo-e woodblock print",
    "pencil sketch",
    "pixel art",
    "art deco poster",
    "studio photograph, soft light",
    "charcoal drawing",
    "low-poly illustration",
    "stained glass",
    "cinematic still, anamorphic",
    "children's book illustration",
    "vaporwave",
)


def sample_prompts() -> list[str]:
    """The demo's prompts: every subject in every style (300 of them).

    Example::

        >>> sample_prompts()[0]
        'a lighthouse at dusk, watercolor'
    """
    return [f"{subject}, {style}" for subject, style in itertools.product(_SUBJECTS, _STYLES)]


# -- input ---------------------------------------------------------------------------------


async def _lines(stream: BinaryIO) -> AsyncIterator[bytes]:
    """The lines of ``stream``, read as the fan-out asks for them (bytes: decoding line by
    line lets an undecodable line be reported by its number, after the lines before it).
    """
    try:
        fd = None if stream.seekable() else stream.fileno()
    except (OSError, ValueError):  # no file descriptor (an in-memory stream): never blocks
        fd = None
    if fd is None:
        # A regular file never makes a read wait long: read it right in the loop.
        for line in stream:
            yield line
        return
    # A pipe or a terminal blocks for as long as its writer likes: a daemon thread reads
    # it, so the requests in flight keep going and Ctrl-C is never stuck behind a read. It
    # reads the raw descriptor, not ``stream``: a daemon thread stuck inside a buffered
    # reader's lock aborts the interpreter's exit.
    async for line in thread_lines(lambda: _fd_lines(fd)):
        yield line


def _fd_lines(fd: int) -> Iterator[bytes]:
    pending = b""
    while chunk := os.read(fd, 65536):
        *complete, pending = (pending + chunk).split(b"\n")
        yield from complete
    if pending:
        yield pending


async def _prompts(stream: BinaryIO, *, jsonl: bool, problems: list[str]) -> AsyncIterator[Any]:
    """Prompts (or, with ``jsonl``, decoded objects) from ``stream``, skipping blank and
    ``#`` lines. A line that is not UTF-8 or not JSON ends the input and is reported in
    ``problems``: the prompts already running still finish, so none of them is lost.
    """
    number = 0
    async for raw in _lines(stream):
        number += 1
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not prompt text.
            text = raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            problems.append(f"line {number} is not UTF-8 ({exc.reason}); later lines were not read")
            return
        if not text or text.startswith("#"):
            continue
        if not jsonl:
            yield text
            continue
        try:
            item = json.loads(text)
        except ValueError as exc:
            problems.append(f"line {number} is not JSON ({exc}); later lines were not read")
            return
        yield item


# -- output --------------------------------------------------------------------------------


def _record(result: GenerationResult) -> dict[str, Any]:
    """One output line: what happened to one prompt."""
    record: dict[str, Any] = {
        "index": result.index,
        "prompt": result.prompt,
        "ok": result.ok,
        "attempts": result.attempts,
        "elapsed": round(result.elapsed, 3),
    }
    if result.response is not None and result.error is None:
        record["urls"] = result.response.urls
        inline = [image.b64_json for image in result.response.data if image.b64_json]
        if inline:  # --response-format b64_json: the images themselves
            record["b64_json"] = inline
        return record
    error = result.error
    info: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, APIStatusError):
        info["status_code"] = error.status_code
    record["error"] = info
    return record


def _postfix(stats: FanoutStatistics) -> str:
    """What the progress bar shows after the count: failures, retries, 429s, the rate."""
    rate = "unpaced" if stats.rate is None else f"{stats.rate:.1f}/s"
    return f"failed={stats.failed} retries={stats.retries} 429s={stats.rate_limited} rate={rate}"


def _progress_updater(bar: tqdm[Any]) -> Callable[[FanoutStatistics], None]:
    """Progress from a fan-out's statistics."""

    def update(stats: FanoutStatistics) -> None:
        # refresh=False: update() below redraws, at most every tqdm's mininterval.
        bar.set_postfix_str(_postfix(stats), refresh=False)
        bar.update(stats.done - bar.n)

    return update


@contextlib.contextmanager
def _verbose_logging(enabled: bool) -> Iterator[None]:
    """INFO from the ``flux_async`` logger to stderr, for the duration of one command."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("flux_async")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # Log lines go above the progress bar instead of through it.
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- the run -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Job:
    """Everything one run needs; ``fanout`` and ``emulator_stats`` are filled in as it goes,
    so that the caller can report on a run that was interrupted.
    """

    items: Iterable[PromptInput] | AsyncIterator[Any]
    out: IO[str]
    out_path: str
    fields: RequestFields
    api_key: str | None
    base_url: str | None
    fanout_options: dict[str, Any]
    emulator: dict[str, Any] | None = None
    emulator_note: str = ""
    progress: bool = False
    total: int | None = None
    written: int = 0
    not_sent: int = 0
    fanout: Fanout | None = None
    emulator_stats: dict[str, Any] = field(default_factory=dict)


async def _run(job: _Job) -> None:
    async with contextlib.AsyncExitStack() as stack:
        api_key, base_url = job.api_key, job.base_url
        if job.emulator is not None:
            emulator = await stack.enter_async_context(Emulator(**job.emulator))
            # Runs on the way out, after the client and the fan-out have closed.
            stack.callback(lambda: job.emulator_stats.update(emulator.stats.snapshot()))
            api_key, base_url = _EMULATOR_KEY, emulator.base_url
            click.echo(job.emulator_note.format(url=base_url), err=True)
        client = await stack.enter_async_context(FluxClient(api_key=api_key, base_url=base_url))
        bar = stack.enter_context(
            tqdm(
                total=job.total,
                unit="prompt",
                file=sys.stderr,
                disable=not job.progress,
                dynamic_ncols=True,
            )
        )
        job.fanout = await stack.enter_async_context(
            client.iter_generate(
                job.items,
                on_progress=_progress_updater(bar) if job.progress else None,
                **job.fanout_options,
                **job.fields,
            )
        )
        async for result in job.fanout:
            job.out.write(json.dumps(_record(result), ensure_ascii=False) + "\n")
            # Flushed per line: a crash or Ctrl-C loses nothing that had finished.
            job.out.flush()
            job.written += 1
            if isinstance(result.error, BatchStoppedError):
                job.not_sent += 1


def _statistics(job: _Job) -> FanoutStatistics:
    if job.fanout is not None:
        return job.fanout.statistics()
    return FanoutStatistics(
        submitted=0,
        in_flight=0,
        done=0,
        succeeded=0,
        failed=0,
        retries=0,
        rate_limited=0,
        rate=None,
        elapsed=0.0,
    )


def _summary(job: _Job, elapsed: float) -> str:
    stats = _statistics(job)
    rate = stats.done / elapsed if elapsed > 0 else 0.0
    prompts = "prompt" if stats.done == 1 else "prompts"
    return (
        f"{stats.done} {prompts}: {stats.succeeded} succeeded, {stats.failed} failed, "
        f"{stats.retries} retries, {stats.rate_limited} x 429, {elapsed:.1f} s, "
        f"{rate:.1f} prompts/s"
    )


def _where(path: str) -> str:
    return "stdout" if path == "-" else os.path.abspath(path)


def _bad_value(ctx: click.Context, exc: ValidationError) -> NoReturn:
    """Exit 2 with one line naming the option, its value and what it may be."""
    # "input_images[1]" names one value of a repeatable option: the option is the name.
    option = "--" + exc.field.split("[")[0].replace("_", "-")
    # The library's wording is for Python callers; an option is omitted by not passing it.
    allowed = exc.allowed.removesuffix(" (or None to omit it)").removesuffix(", or None to omit it")
    allowed = allowed.replace("aspect_ratio=None", "--aspect-ratio none")
    if allowed.startswith("None: "):  # the library's None is the option's none
        allowed = "none" + allowed.removeprefix("None")
    click.echo(f"Error: {option} {exc.value!r} is not allowed: {allowed}", err=True)
    ctx.exit(_EXIT_USAGE)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (``kill``, a service manager's stop, a container's) ends a run as
    Ctrl-C does, so it writes its summary and its gallery and exits 130; by default it
    would kill the process mid-run with neither."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (a test calling us from another)
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # Whatever handles Ctrl-C now: asyncio.run's (cancels the run, once) or Python's.
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (a job started in the background): stop all the same
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(ctx: click.Context, job: _Job) -> float:
    """Run ``job``; return its elapsed seconds, or exit 2 (bad value) or 130 (Ctrl-C or
    SIGTERM)."""
    started = time.perf_counter()
    try:
        with _terminate_as_interrupt():
            asyncio.run(_run(job))
    except ValidationError as exc:
        # The only ValidationErrors that escape come from option values (a prompt's own
        # bad fields end that prompt instead), and they are raised before anything is sent.
        _bad_value(ctx, exc)
    except KeyboardInterrupt:
        # asyncio.run cancelled the run, and the fan-out cancelled what was in flight.
        click.echo(
            f"\nInterrupted: {job.written} finished prompts were written to "
            f"{_where(job.out_path)}; the rest were cancelled.",
            err=True,
        )
        ctx.exit(_EXIT_INTERRUPTED)
    return time.perf_counter() - started


def _request_fields(options: dict[str, Any]) -> RequestFields:
    """The request options that were given; the others keep `ImageRequest`'s defaults."""
    # A repeatable option (--input-image) that was not given is an empty tuple.
    fields: RequestFields = {k: v for k, v in options.items() if v is not None and v != ()}  # type: ignore[assignment]
    if str(fields.get("aspect_ratio", "")).lower() == "none":
        # The library's aspect_ratio=None: send none (a server that takes none, or a size
        # with none of the nine ratios).
        fields["aspect_ratio"] = None
    return fields


def _option_help(name: str) -> str:
    spec = FIELD_SPECS[name]
    if spec.choices is None:
        return spec.help + "."
    if name == "aspect_ratio":
        return f"{spec.help}. One of: {', '.join(spec.choices)}; or none to send none."
    return f"{spec.help}. One of: {', '.join(spec.choices)}."


def _request_options(command: Callable[..., None]) -> Callable[..., None]:
    """One option per `ImageRequest` field (``--aspect-ratio``, ``-n``/``--n``, ...), in
    the order the fields are sent; the command gets them as keyword arguments named
    after the fields.

    Example::

        @_request_options
        def generate(**request_options: Any) -> None: ...
    """
    # click lists options in the reverse of the order their decorators are applied.
    for name, spec in list(FIELD_SPECS.items())[::-1]:
        flags = (*spec.flags, "--" + name.replace("_", "-"))
        command = click.option(
            *flags, name, type=spec.type, multiple=spec.multiple, help=_option_help(name)
        )(command)
    return command


# -- commands ------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flux-async")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Bulk image generation against OpenAI-format /v1/images/generations APIs.

    Try `flux-async demo` (no key, no network), then
    `flux-async batch prompts.txt --out run1`.
    """
    ctx.with_resource(_warnings_as_lines())


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Within: a warning (a key about to cross plain http://, say) is one ``Warning:``
    line on stderr, not Python's file, line number and source line."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: IO[str] | None = None,
        line: str | None = None,
    ) -> None:
        click.echo(f"Warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


#: A click command function, as the option decorators see it.
_F = Callable[..., None]


def _run_options(*, deadline: str, batch_deadline: str) -> Callable[[_F], _F]:
    """The options every command that runs prompts takes: key, URL, request fields, rates,
    deadlines and attempts (``deadline`` / ``batch_deadline``: their help texts)."""
    options: list[Callable[[_F], _F]] = [
        click.option("--api-key", envvar=ENV_API_KEY, help=f"API key (default: ${ENV_API_KEY})."),
        click.option(
            "--base-url", envvar=ENV_BASE_URL, help=f"Base URL ending in /v1 (${ENV_BASE_URL})."
        ),
        _request_options,
        click.option(
            "--concurrency",
            type=click.IntRange(min=1),
            default=DEFAULT_CONCURRENCY,
            show_default=True,
            help="HTTP requests in flight at once.",
        ),
        click.option(
            "--rate-limit",
            type=click.FloatRange(min=0, min_open=True),
            help="Requests per second, never exceeded (default: adapt to the server's 429s).",
        ),
        click.option(
            "--rate-limit-per-minute",
            type=click.FloatRange(min=0, min_open=True),
            help="Requests per minute, instead of --rate-limit.",
        ),
        click.option(
            "--burst", type=click.IntRange(min=1), help="Burst for the rate limit (default 1)."
        ),
        click.option("--deadline", type=click.FloatRange(min=0, min_open=True), help=deadline),
        click.option(
            "--batch-deadline", type=click.FloatRange(min=0, min_open=True), help=batch_deadline
        ),
        click.option(
            "--max-attempts",
            type=click.IntRange(min=1),
            help="Attempts per prompt, 429s aside (4).",
        ),
    ]

    def apply(command: _F) -> _F:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _local_options(command: _F) -> _F:
    """--emulator, --emulator-rate-limit, --progress and -v, shared by the run commands."""
    for option in reversed(
        [
            click.option(
                "--emulator", is_flag=True, help="Send everything to the bundled emulator."
            ),
            click.option(
                "--emulator-rate-limit",
                type=click.FloatRange(min=0, min_open=True),
                help="The emulator's capacity in requests/s (shows 429 handling).",
            ),
            click.option(
                "--progress/--no-progress",
                default=None,
                help="Progress bar on stderr (default: when stderr is a terminal).",
            ),
            click.option(
                "-v", "--verbose", is_flag=True, help="Log retries and rate cuts to stderr."
            ),
        ]
    ):
        command = option(command)
    return command


@dataclass(kw_only=True)
class _Common:
    """The options `generate` and `batch` share (`_run_options`, `_local_options` and
    one per request field), checked: see `_common_options`."""

    api_key: str | None
    base_url: str | None
    fields: RequestFields
    fanout_options: dict[str, Any]
    emulator: dict[str, Any] | None
    progress: bool
    verbose: bool


def _fanout_options(options: dict[str, Any]) -> dict[str, Any]:
    """The fan-out's keywords from the rate, deadline and attempt options (taken out of
    ``options``); a click usage error for a combination that means nothing."""
    rate_limit = options.pop("rate_limit")
    per_minute = options.pop("rate_limit_per_minute")
    burst = options.pop("burst")
    max_attempts = options.pop("max_attempts")
    if rate_limit is not None and per_minute is not None:
        raise click.UsageError("use --rate-limit or --rate-limit-per-minute, not both")
    if burst is not None and rate_limit is None and per_minute is None:
        raise click.UsageError("--burst needs --rate-limit or --rate-limit-per-minute")
    fanout: dict[str, Any] = {
        "concurrency": options.pop("concurrency"),
        "deadline": options.pop("deadline"),
        "batch_deadline": options.pop("batch_deadline"),
        "retry": None if max_attempts is None else RetryPolicy(max_attempts=max_attempts),
    }
    if rate_limit is not None or per_minute is not None:
        fanout["rate_limit"] = rate_limit or per_minute
        fanout["per"] = 1.0 if rate_limit is not None else 60.0
        fanout["burst"] = burst or 1
    return fanout


def _common_options(ctx: click.Context, options: dict[str, Any]) -> _Common:
    """The shared options, checked before any input is read, any file opened or anything
    sent: a usage error, or exit 2 with one line for a bad value (`_bad_value`)."""
    fanout_options = _fanout_options(options)
    emulator = options.pop("emulator")
    emulator_rate_limit = options.pop("emulator_rate_limit")
    if emulator_rate_limit is not None and not emulator:
        raise click.UsageError("--emulator-rate-limit needs --emulator")
    api_key, base_url = options.pop("api_key"), options.pop("base_url")
    progress, verbose = options.pop("progress"), options.pop("verbose")
    # What is left is one option per request field.
    fields = _request_fields(options)
    try:
        ImageRequest(prompt="check", **fields)
        if not emulator and base_url is not None:
            with warnings.catch_warnings():
                # Only the URL's check: the client that runs warns about the key, once.
                warnings.simplefilter("ignore")
                FluxClient(base_url=base_url, api_key=_EMULATOR_KEY)
    except ValidationError as exc:
        _bad_value(ctx, exc)
    return _Common(
        api_key=api_key,
        base_url=base_url,
        fields=fields,
        fanout_options=fanout_options,
        emulator=None if not emulator else {"rate_limit": emulator_rate_limit},
        progress=sys.stderr.isatty() if progress is None else progress,
        verbose=verbose,
    )


@cli.command()
@click.argument("prompts", type=click.File("rb"), default="-")
@click.option(
    "--jsonl",
    is_flag=True,
    help='Each line is a JSON object: {"prompt": "...", "n": 2, "aspect_ratio": "16:9"}.',
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default="-",
    help="Where the JSON lines go (default: stdout).",
)
@_run_options(
    deadline="Seconds per prompt, retries included.",
    batch_deadline="Seconds for the whole run; prompts not done by then fail.",
)
@_local_options
@click.pass_context
def generate(
    ctx: click.Context,
    # Positional-only: with **options, mypy cannot otherwise type pass_context.
    /,
    prompts: BinaryIO,
    jsonl: bool,
    out: str,
    **options: Any,
) -> None:
    """Generate images for every prompt in PROMPTS (a file, or - for stdin: the default).

    One prompt per line; blank lines and lines starting with # are skipped. Writes one
    JSON line per prompt as it finishes: index, prompt, ok, attempts, elapsed, and urls
    or error. Exit status: 0 all succeeded, 1 some failed, 2 bad usage, 130 interrupted.

    \b
    Example:
      flux-async generate prompts.txt -o results.jsonl --aspect-ratio 16:9 --rate-limit 20
    """
    # Checked now, before the output file is opened or anything is started or sent.
    common = _common_options(ctx, options)
    if prompts.isatty():
        click.echo("Reading prompts from the terminal, one per line; end with Ctrl-D.", err=True)
    problems: list[str] = []
    output = ctx.with_resource(click.open_file(out, "w", encoding="utf-8"))
    job = _Job(
        items=_prompts(prompts, jsonl=jsonl, problems=problems),
        out=output,
        out_path=out,
        fields=common.fields,
        api_key=common.api_key,
        base_url=common.base_url,
        fanout_options=common.fanout_options,
        emulator=common.emulator,
        emulator_note=_EMULATOR_NOTE,
        progress=common.progress,
    )
    with _verbose_logging(common.verbose):
        elapsed = _execute(ctx, job)
    # An in-memory stream (a test's) has no name.
    _finish_generate(ctx, job, elapsed, getattr(prompts, "name", "<stdin>"), problems)


def _finish_generate(
    ctx: click.Context, job: _Job, elapsed: float, name: str, problems: list[str]
) -> NoReturn:
    """The summary on stderr, then the exit status."""
    click.echo(_summary(job, elapsed), err=True)
    stopped = None if job.fanout is None else job.fanout.stopped_by
    if stopped is not None:
        then = "their lines have the error BatchStoppedError; fix this and run those again."
        click.echo(_stopped_line(stopped, job.not_sent, then), err=True)
    # Prompts still unread then were never taken from the input, so they have no line.
    _say_deadline_passed(
        job.fanout_options, elapsed, "prompts after the last index listed were not read."
    )
    if problems:
        click.echo(f"Error: {name}: {problems[0]}", err=True)
        ctx.exit(_EXIT_USAGE)
    ctx.exit(_EXIT_FAILED if _statistics(job).failed else 0)


# -- batch -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _BatchRun:
    """One ``batch`` (or ``demo``) run: the plan and how to reach the server."""

    plan: Plan
    api_key: str | None
    base_url: str | None
    fanout_options: dict[str, Any]
    emulator: dict[str, Any] | None = None
    emulator_note: str = ""
    progress: bool = False
    emulator_stats: dict[str, Any] = field(default_factory=dict)
    #: (URL, name) of a shared Redis quota, or None for this process's own limiter.
    redis: tuple[str, str] | None = None


def _check_redis_extra() -> None:
    try:
        import redis  # noqa: F401
    except ImportError:
        raise click.UsageError(
            "--redis needs the redis extra: pip install 'flux-async[redis]'"
        ) from None


async def _shared_limiter(stack: contextlib.AsyncExitStack, run: _BatchRun) -> None:
    """Swap this run's own rate for the quota shared in Redis (same rate options)."""
    from .redis import RedisRateLimiter  # the optional extra, checked before the run

    assert run.redis is not None
    url, name = run.redis
    options = run.fanout_options
    limiter = RedisRateLimiter.from_url(
        url,
        name=name,
        rate=options.pop("rate_limit", None),
        per=options.pop("per", 1.0),
        burst=options.pop("burst", 1),
    )
    stack.push_async_callback(limiter.aclose)
    options["limiter"] = limiter


async def _batch_client(stack: contextlib.AsyncExitStack, run: _BatchRun) -> FluxClient:
    """The client of a batch run: on the emulator with --emulator, paced through Redis
    with --redis."""
    api_key, base_url = run.api_key, run.base_url
    if run.emulator is not None:
        emulator = await stack.enter_async_context(Emulator(**run.emulator))
        stack.callback(lambda: run.emulator_stats.update(emulator.stats.snapshot()))
        api_key, base_url = _EMULATOR_KEY, emulator.base_url
        click.echo(run.emulator_note.format(url=base_url), err=True)
    if run.redis is not None:
        await _shared_limiter(stack, run)
    concurrency = run.fanout_options["concurrency"]
    # Downloads use the pool's connections beyond `concurrency`: twice as many
    # connections leave each generation slot one for its images.
    return await stack.enter_async_context(
        FluxClient(
            api_key=api_key,
            base_url=base_url,
            max_connections=max(DEFAULT_MAX_CONNECTIONS, 2 * concurrency),
        )
    )


def _batch_progress(
    stack: contextlib.AsyncExitStack, run: _BatchRun
) -> tuple[Callable[[FanoutStatistics], None] | None, Callable[[dict[str, Any]], None] | None]:
    """The progress bar of a batch run: (fan-out statistics, manifest record) callbacks.
    The bar counts prompts finished, saving included; the fan-out's figures label it."""
    plan = run.plan
    bar = stack.enter_context(
        tqdm(
            total=plan.total,
            initial=len(plan.done),
            unit="prompt",
            file=sys.stderr,
            disable=not run.progress,
            dynamic_ncols=True,
        )
    )
    if not run.progress:
        return None, None

    def on_stats(stats: FanoutStatistics) -> None:
        bar.set_postfix_str(_postfix(stats), refresh=False)

    def on_record(record: dict[str, Any]) -> None:
        if record["status"] != GENERATED:
            bar.update()

    return on_stats, on_record


def _downloader(client: FluxClient, options: dict[str, Any]) -> Downloader:
    """What fetches a batch's images: the client's pool, with the prompts' own retry
    policy and --deadline."""
    policy: RetryPolicy = options.get("retry") or client.retry
    if options.get("deadline") is not None:
        policy = attrs.evolve(policy, deadline=options["deadline"])
    return client.downloader.with_policy(policy)


async def _run_batch(run: _BatchRun) -> None:
    async with contextlib.AsyncExitStack() as stack:
        client = await _batch_client(stack, run)
        on_stats, on_record = _batch_progress(stack, run)
        options = dict(run.fanout_options)
        # The batch's own deadline: it bounds the saving of images too (see run_batch).
        batch_deadline = options.pop("batch_deadline", None)
        await run_batch(
            run.plan,
            lambda requests, left: client.iter_generate(
                requests, on_progress=on_stats, batch_deadline=left, **options
            ),
            _downloader(client, options),
            concurrency=options["concurrency"],
            batch_deadline=batch_deadline,
            on_record=on_record,
        )


def _say_deadline_passed(options: Mapping[str, Any], elapsed: float, then: str) -> None:
    """One stderr line if the run's --batch-deadline passed: what it did to the prompts."""
    deadline = options.get("batch_deadline")
    if deadline is not None and elapsed >= deadline:
        click.echo(f"The batch deadline of {deadline:g} s passed: {then}", err=True)


def _in_cli_terms(hint: str) -> str:
    """The library's hint with the options that set what it names (``api_key=`` is
    ``--api-key`` here)."""
    # Whole phrases of the library's hints (`_status_errors`, `_fanout_stop`): a bare
    # "model=" could be in the server's own message.
    return (
        hint.replace("pass api_key= to FluxClient", "pass --api-key")
        .replace("check api_key= /", "check --api-key /")
        .replace("Check base_url:", "Check --base-url:")
        .replace("and model= (this request's", "and --model (this request's")
        .replace("check model= too", "check --model too")
        .replace(
            "Rerun after then, or raise RetryPolicy(retry_after_max=...) to wait it out.",
            "Rerun the same command after then to resume.",
        )
    )


def _stopped_line(stopped: BaseException, not_sent: int, then: str) -> str:
    """One line for a fan-out stopped on a fatal answer, with the library's hint."""
    notes = " ".join(getattr(stopped, "__notes__", ()))
    if isinstance(stopped, APIStatusError):
        why = "on an answer every prompt would get"
    elif isinstance(stopped, ImageSaveError):
        why = "as no prompt's images could be saved"
    else:
        why = "as its server has never answered"
    error = _in_cli_terms(f"{type(stopped).__name__}: {stopped}{' ' + notes if notes else ''}")
    return f"Error: the batch stopped {why}: {error} {not_sent} prompts were not sent; {then}"


def _stop_line(plan: Plan) -> str | None:
    """`_stopped_line` for a ``batch`` run, or None if it did not stop."""
    stopped = None if plan.fanout is None else plan.fanout.stopped_by
    if stopped is None:
        return None
    not_sent = sum(
        1
        for r in plan.records.values()
        if r.get("run") == plan.run and (r.get("error") or {}).get("not_sent")
    )
    return _stopped_line(stopped, not_sent, "fix this and rerun the same command to resume.")


def _manifest_line(plan: Plan) -> str:
    """One line for a run whose manifest could not be written (a full disk)."""
    lost = (
        f" {plan.lost_records} records could not be written (a rerun runs those prompts again)."
        if plan.lost_records
        else ""
    )
    return (
        f"Error: writing {plan.directory.manifest} failed: {plan.manifest_error}.{lost} "
        "No more prompts were sent; free space (or fix the directory) and rerun the same "
        "command to resume."
    )


def _batch_summary(plan: Plan, elapsed: float) -> tuple[str, bool]:
    """The closing paragraph, and whether every prompt of the input is ok."""
    records = plan.records
    ok = sum(1 for r in records.values() if r.get("status") == "ok")
    # Generated, images not saved: an interrupted run's; the rerun fetches them.
    unsaved = sum(1 for r in records.values() if r.get("status") == GENERATED)
    failed = len(records) - ok - unsaved
    not_sent = sum(1 for r in records.values() if (r.get("error") or {}).get("not_sent"))
    done = sum(
        1 for r in records.values() if r.get("run") == plan.run and r.get("status") != GENERATED
    )
    earlier = len(plan.done)
    # Stdin's size is what was read, or what earlier runs recorded if this run read less
    # (a line it refused): never fewer prompts than are ok.
    total = plan.total if plan.total is not None else max(plan.read, len(records))
    pending = max(0, total - ok - failed - unsaved)
    stats = None if plan.fanout is None else plan.fanout.statistics()
    rate = done / elapsed if elapsed > 0 else 0.0
    resumed = (
        f", {plan.resumed} of them from the URLs an earlier run recorded" if plan.resumed else ""
    )
    short = sum(1 for r in records.values() if r.get("status") == "ok" and r.get("missing"))
    parts = [
        f"{plan.directory.root}: {ok} of {total} prompts ok"
        f" ({ok - earlier if ok >= earlier else ok} this run{resumed}, "
        f"{earlier} from earlier runs)",
        f", {failed} failed" if failed else "",
        f" ({not_sent} of them not sent)" if not_sent else "",
        f", {unsaved} generated but not saved yet" if unsaved else "",
        f", {pending} not run" if pending else "",
        f"; {short} came back with fewer images than asked (`missing` in the manifest)"
        if short
        else "",
        f". This run: {done} prompts in {elapsed:.1f} s ({rate:.1f} prompts/s)",
    ]
    if stats is not None:
        parts.append(f", {stats.retries} retries, {stats.rate_limited} x 429")
    parts.append(f". Manifest: {plan.directory.manifest}. Gallery: {plan.directory.gallery}.")
    if failed or pending or unsaved:
        parts.append(" Rerun the same command to resume (--retry-failed: only the failed ones).")
    return "".join(parts), ok == total and total > 0


def _write_gallery(plan: Plan) -> None:
    page = render_gallery(
        plan.records, title=str(plan.directory.root), total=plan.total or plan.read or None
    )
    write_atomic(plan.directory.gallery, page.encode())


def _execute_batch(ctx: click.Context, run: _BatchRun) -> tuple[float, bool]:
    """Run the batch, write the gallery; (elapsed, interrupted). Exits 2 on bad values."""
    plan = run.plan
    started = time.perf_counter()
    interrupted = False
    try:
        # Before the first request: a directory that exists is one that resumes.
        try:
            plan.save_state()
        except OSError as exc:
            _unwritable_out(ctx, plan.directory.root, exc)
        with _terminate_as_interrupt():
            asyncio.run(_run_batch(run))
    except ValidationError as exc:
        _bad_value(ctx, exc)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Rewritten at the end of every run, interrupted or not (the loop has ended:
        # blocking writes are fine here).
        with contextlib.suppress(OSError):
            _write_gallery(plan)
        if plan.lock is not None:
            plan.lock.close()  # the directory is free for the next run
    return time.perf_counter() - started, interrupted


def _finish_batch(ctx: click.Context, run: _BatchRun, elapsed: float, interrupted: bool) -> None:
    plan = run.plan
    summary, all_ok = _batch_summary(plan, elapsed)
    if interrupted:
        click.echo(
            f"\nInterrupted: {plan.recorded} finished prompts are in {plan.directory.manifest}; "
            "rerun the same command to resume.",
            err=True,
        )
    click.echo(summary, err=True)
    if not all_ok:
        _say_deadline_passed(
            run.fanout_options,
            elapsed,
            "the prompts in progress then failed, and the rest were not run.",
        )
    stop = _stop_line(plan)
    if stop is not None:
        click.echo(stop, err=True)
    if plan.manifest_error is not None:
        click.echo(_manifest_line(plan), err=True)
    if plan.input_error is not None:
        click.echo(f"Error: {plan.input_error}; later lines were not read", err=True)
        ctx.exit(_EXIT_USAGE)
    if plan.source.streaming and plan.read == 0 and not interrupted:
        # As a file with no prompt is refused (exit 2) before anything is sent.
        click.echo(f"Error: {plan.source.name} held no prompt (only blank or # lines)", err=True)
        ctx.exit(_EXIT_USAGE)
    if interrupted:
        ctx.exit(_EXIT_INTERRUPTED)
    ctx.exit(0 if all_ok else _EXIT_FAILED)


def _prepare(
    ctx: click.Context, source: Source, out: Path, fields: RequestFields, retry_failed: bool
) -> Plan:
    """The plan, or exit 2 with one line (bad line, directory from another input)."""
    # Only builds requests (no I/O): the key and URL here are never used.
    builder = FluxClient(api_key=_EMULATOR_KEY, base_url="http://127.0.0.1/v1")
    try:
        return Plan.prepare(
            source,
            BatchDirectory(root=out),
            build=builder.build_request,
            fields=fields,
            retry_failed=retry_failed,
        )
    except BatchError as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(_EXIT_USAGE)
    except OSError as exc:
        _unwritable_out(ctx, out, exc)


def _unwritable_out(ctx: click.Context, out: Path, exc: OSError) -> NoReturn:
    """Exit 2 with one line: --out cannot be made or written (before anything is sent)."""
    click.echo(
        f"Error: --out {_where(str(out))} cannot be written: {exc}. Choose a directory "
        "this user may create and write; nothing was sent.",
        err=True,
    )
    ctx.exit(_EXIT_USAGE)


_STOP_ON_DEFAULT = ",".join(str(status) for status in sorted(DEFAULT_STOP_ON))
_STOP_ON_ALLOWED = (
    "comma-separated HTTP error statuses from 400 to 599, such as "
    f"{_STOP_ON_DEFAULT} (the default), or none never to stop"
)


def _stop_statuses(ctx: click.Context, value: str) -> frozenset[int]:
    """``--stop-on`` as the fan-out's ``stop_on``; exit 2 with one line when it is bad."""
    text = value.strip().lower()
    if text == "none":
        return frozenset()
    try:
        statuses = frozenset(int(part) for part in text.split(","))
    except ValueError:
        statuses = frozenset({0})  # refused just below, like a status out of range
    if not all(400 <= status <= 599 for status in statuses):
        _bad_value(ctx, ValidationError("stop_on", value, _STOP_ON_ALLOWED))
    return statuses


@cli.command()
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The batch directory: images/, manifest.jsonl, gallery.html (made if missing).",
)
@click.option(
    "--jsonl",
    is_flag=True,
    help='Each line is a JSON object: {"prompt": "...", "n": 2} (default for *.jsonl).',
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Rerun only the prompts the manifest records as failed.",
)
@click.option(
    "--stop-on",
    metavar="STATUSES",
    help=(
        "The answers that stop the batch, since every prompt would get them: "
        f"comma-separated statuses (default {_STOP_ON_DEFAULT}: wrong key, no access, "
        "wrong URL or model), or none never to stop."
    ),
)
@_run_options(
    deadline="Seconds per prompt, retries and image downloads included.",
    batch_deadline="Seconds for the whole run; prompts not done by then are left for a rerun.",
)
@click.option(
    "--redis",
    "redis_url",
    envvar=ENV_REDIS_URL,
    metavar="URL",
    help=(
        "Share the key's quota with every process using the same Redis and "
        f"--limiter-name (${ENV_REDIS_URL}; needs flux-async[redis])."
    ),
)
@click.option(
    "--limiter-name",
    default=DEFAULT_LIMITER_NAME,
    show_default=True,
    help="Which shared quota to use in --redis: the same name for every process of one key.",
)
@_local_options
@click.pass_context
def batch(
    ctx: click.Context,
    /,
    prompts: str,
    out: Path,
    jsonl: bool,
    retry_failed: bool,
    stop_on: str | None,
    redis_url: str | None,
    limiter_name: str,
    **options: Any,
) -> None:
    """Generate and save the images of every prompt in PROMPTS into the directory --out.

    PROMPTS is a text file (one prompt a line; blank and # lines skipped), a JSONL file
    (*.jsonl or --jsonl: per-line fields), or - for stdin. Images go to DIR/images/,
    one JSON record per finished prompt to DIR/manifest.jsonl, and DIR/gallery.html shows
    them all. Rerunning the same command resumes: prompts already ok are skipped. A file
    is checked before anything is sent. A wrong key or base URL stops the batch at once
    (--stop-on). Exit status: 0 all ok, 1 some failed, 2 bad usage or input, 130
    interrupted.

    \b
    Example:
      flux-async batch prompts.txt --out run1 --aspect-ratio 16:9 --rate-limit 20
    """
    # Checked now, before the input is read or anything is started or sent.
    common = _common_options(ctx, options)
    if stop_on is not None:
        common.fanout_options["stop_on"] = _stop_statuses(ctx, stop_on)
    if redis_url:
        _check_redis_extra()
    source = Source(path=prompts, jsonl=jsonl or prompts.lower().endswith(".jsonl"))
    if source.streaming and sys.stdin.isatty():
        click.echo("Reading prompts from the terminal, one per line; end with Ctrl-D.", err=True)
    run = _BatchRun(
        plan=_prepare(ctx, source, out, common.fields, retry_failed),
        api_key=common.api_key,
        base_url=common.base_url,
        fanout_options=common.fanout_options,
        emulator=common.emulator,
        emulator_note=_EMULATOR_NOTE,
        progress=common.progress,
        redis=(redis_url, limiter_name) if redis_url else None,
    )
    with _verbose_logging(common.verbose):
        elapsed, interrupted = _execute_batch(ctx, run)
    _finish_batch(ctx, run, elapsed, interrupted)


# -- demo ------------------------------------------------------------------------------------


def _clear_demo(ctx: click.Context, out: Path) -> None:
    """Remove an earlier demo's output from ``out``: its state, manifest and gallery, and
    the images its manifest lists; never a file it did not write, and never while
    another run holds the directory."""
    directory = BatchDirectory(root=out)
    try:
        state = directory.read_state()
    except BatchError:
        state = {}
    if state is None:
        return
    if state.get("input") != _DEMO_INPUT:
        click.echo(f"Error: {out} holds another batch; pass the demo another --out", err=True)
        ctx.exit(_EXIT_USAGE)
    try:
        # Held while removing: a demo still running there keeps its files. Released
        # before the batch claims the directory again (a second flock from this process
        # would refuse itself); a demo starting in between is refused by that claim.
        lock = directory.claim()
    except BatchError as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(_EXIT_USAGE)
    try:
        images = directory.images
        for record in effective_records(directory.manifest).values():
            for name in record.get("files") or ():
                # Only a name the demo gives (images/<file>): a manifest edited by hand
                # cannot point the removal anywhere else.
                path = out / str(name)
                if path.parent == images and path.name != "..":
                    path.unlink(missing_ok=True)
        for path in (directory.manifest, directory.gallery, directory.state):
            path.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.close()


@cli.command()
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEMO_OUT,
    show_default=True,
    help="The batch directory the demo fills (its previous run there is replaced).",
)
@click.option(
    "--progress/--no-progress", default=True, help="Progress bar on stderr (default: on)."
)
@click.option("-v", "--verbose", is_flag=True, help="Log retries and rate cuts to stderr.")
# Hidden: lets the test suite run a short demo.
@click.option("--count", type=click.IntRange(1, len(sample_prompts())), hidden=True)
@click.pass_context
def demo(ctx: click.Context, out: Path, progress: bool, verbose: bool, count: int | None) -> None:
    """Run a bulk job against the bundled emulator: no key, no network.

    A `batch` of 300 sample prompts with concurrency 32 into ./flux-async-demo/, through
    an emulator whose capacity is 40 requests/s, so the server answers 429 and the client
    has to find the rate; every prompt still ends with its image saved, and the run ends
    with the path of the gallery to open.
    """
    prompts = sample_prompts()[:count]
    _clear_demo(ctx, out)
    source = Source(path=_DEMO_INPUT, jsonl=False, lines=[p.encode() for p in prompts])
    plan = _prepare(ctx, source, out, {}, False)
    run = _BatchRun(
        plan=plan,
        api_key=None,
        base_url=None,
        fanout_options={"concurrency": DEMO_CONCURRENCY},
        emulator={"rate_limit": DEMO_RATE_LIMIT, "burst": DEMO_BURST, "latency": DEMO_LATENCY},
        emulator_note=(
            f"flux-async demo: {len(prompts)} prompts, concurrency {DEMO_CONCURRENCY}, "
            "against the bundled emulator at {url} "
            f"(capacity {DEMO_RATE_LIMIT:g} requests/s, latency {DEMO_LATENCY:g} s). "
            "No key, no network, no real API."
        ),
        progress=progress,
    )
    with _verbose_logging(verbose):
        elapsed, interrupted = _execute_batch(ctx, run)
    emu = run.emulator_stats
    if not interrupted:
        ok = sum(1 for r in plan.records.values() if r.get("status") == "ok")
        click.echo(
            f"The emulator answered {emu.get('requests', 0)} requests: "
            f"{emu.get('successes', 0)} with images, {emu.get('rate_limited', 0)} with 429. "
            f"Every 429 was absorbed by waiting and retrying: {len(prompts) - ok} prompts lost.",
            err=True,
        )
        click.echo(f"Open the gallery: {plan.directory.gallery.resolve()}", err=True)
    _finish_batch(ctx, run, elapsed, interrupted)


@cli.command(
    "emulator",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def emulator_command(args: tuple[str, ...]) -> None:
    """Serve the emulator (same as flux-async-emulator; --help for its options)."""
    sys.exit(emulator_main(list(args), prog="flux-async emulator"))


def main() -> None:
    """The ``flux-async`` script.

    Example::

        $ flux-async demo
    """
    cli()
