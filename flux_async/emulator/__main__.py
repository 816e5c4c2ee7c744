"""Command line: ``python -m flux_async.emulator`` (also installed as ``flux-async-emulator``).

Prints exactly one line, ``READY http://HOST:PORT/v1``, to stdout once it is listening, then
serves until SIGINT or SIGTERM and exits 0.

Example::

    $ python -m flux_async.emulator --port 0 --api-key sk-test --rate-limit 50 --burst 10
    READY http://127.0.0.1:41877/v1

API keys come from ``--api-key`` (repeatable) and ``FLUX_EMULATOR_API_KEYS`` (comma
separated); with none, any bearer is accepted. Keys are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Callable

from ._faults import FaultRates
from ._server import Emulator

__all__ = ["ENV_API_KEYS", "main"]

ENV_API_KEYS = "FLUX_EMULATOR_API_KEYS"
"""Environment variable holding comma-separated API keys. Example: ``sk-a,sk-b``."""


def _number(
    text: str, convert: Callable[[str], float], accept: Callable[[float], bool], what: str
) -> float:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _seconds(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number of seconds >= 0")


def _positive(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number > 0")


def _rate(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "a probability within 0..1")


def _count(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 1, "an integer >= 1"))


def _port(text: str) -> int:
    return int(_number(text, int, lambda v: 0 <= v <= 65535, "a port in 0..65535"))


def _error_status(text: str) -> int:
    return int(_number(text, int, lambda v: 400 <= v <= 599, "an HTTP status in 400..599"))


def _integer(text: str) -> int:
    return int(_number(text, int, lambda v: True, "an integer"))


def build_parser(prog: str = "python -m flux_async.emulator") -> argparse.ArgumentParser:
    """Return the argument parser (exposed for ``--help`` rendering and tests); ``prog``
    is the command its usage and errors name.

    Example::

        args = build_parser().parse_args(["--port", "0", "--latency", "0.05"])
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the flux-async images emulator (POST /v1/images/generations).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    add("--port", type=_port, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    add(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accepted bearer key (repeatable; also ${ENV_API_KEYS}); none: no auth check",
    )
    add("--latency", type=_seconds, default=0.0, help="seconds added to every generation")
    add("--rate-limit", type=_positive, default=None, help="requests/second per key (GCRA)")
    add("--burst", type=_count, default=1, help="rate-limit burst (default: %(default)s)")
    add("--max-in-flight", type=_count, default=None, help="concurrent generations before 429")
    add("--error-rate", type=_rate, default=0.0, help="probability of an error status")
    add("--error-status", type=_error_status, default=500, help="status for --error-rate")
    add("--drop-rate", type=_rate, default=0.0, help="probability of closing without answer")
    add("--slow-rate", type=_rate, default=0.0, help="probability of an extra delay")
    add("--slow-seconds", type=_seconds, default=1.0, help="the delay for --slow-rate")
    add("--malformed-rate", type=_rate, default=0.0, help="probability of a broken 200 body")
    add("--seed", type=_integer, default=0, help="seed for the random faults")
    add(
        "--no-require-aspect-ratio",
        dest="require_aspect_ratio",
        action="store_false",
        help="accept requests without aspect_ratio (plain OpenAI behaviour)",
    )
    add(
        "--dedupe-idempotency",
        action="store_true",
        help="replay the stored response for a repeated Idempotency-Key",
    )
    add(
        "--url-ttl",
        type=_positive,
        default=None,
        help="seconds image URLs stay valid (403 afterwards; default: forever)",
    )
    add(
        "--no-record",
        dest="record_requests",
        action="store_false",
        help="do not keep the per-request log (GET /_emulator/stats?requests=1)",
    )
    return parser


def _emulator_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Emulator:
    keys = [key for key in args.api_key if key]
    keys += [key.strip() for key in os.environ.get(ENV_API_KEYS, "").split(",") if key.strip()]
    if args.error_rate + args.drop_rate + args.malformed_rate > 1.0:
        parser.error("--error-rate + --drop-rate + --malformed-rate must not exceed 1")
    rates = FaultRates(
        error_rate=args.error_rate,
        error_status=args.error_status,
        drop_rate=args.drop_rate,
        slow_rate=args.slow_rate,
        slow_seconds=args.slow_seconds,
        malformed_rate=args.malformed_rate,
    )
    return Emulator(
        api_keys=keys or None,
        latency=args.latency,
        rate_limit=args.rate_limit,
        burst=args.burst,
        max_in_flight=args.max_in_flight,
        faults=rates if rates != FaultRates() else None,
        seed=args.seed,
        require_aspect_ratio=args.require_aspect_ratio,
        dedupe_idempotency=args.dedupe_idempotency,
        record_requests=args.record_requests,
        host=args.host,
        port=args.port,
        url_ttl=args.url_ttl,
    )


async def _serve(emulator: Emulator) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    # Installed before binding so a SIGTERM sent right after READY still shuts down cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C raises instead
            continue
        installed.append(signum)
    try:
        async with emulator:
            print(f"READY {emulator.base_url}", flush=True)
            await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None, prog: str = "python -m flux_async.emulator") -> int:
    """Run the emulator until SIGINT/SIGTERM; return the exit status. ``prog``: the
    command the usage line and errors name (``flux-async emulator`` from the CLI).

    Example::

        raise SystemExit(main(["--port", "0", "--api-key", "sk-test"]))
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    emulator = _emulator_from(args, parser)
    try:
        asyncio.run(_serve(emulator))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(
            f"flux-async emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
