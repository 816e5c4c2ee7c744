"""Parsing an answer: ``ImagesResponse.from_bytes`` vs ``json.loads`` and openai's model.

The same bodies for every contender, in one process, interleaved rounds: one, four and
ten 18 KB ``b64_json`` images, one 1.8 MB image (a real 1024x1024 PNG's size), and one
answer of URLs. Each contender turns the bytes into its response:

* flux-async: ``ImagesResponse.from_bytes`` (checked, with the images lifted out of the
  body before the JSON scanner reads it, ``flux_async/_images_json.py``);
* its scanner alone: the same checks on ``parse_json`` of the whole body (what
  ``from_bytes`` did before the images were lifted out);
* raw aiohttp: ``json.loads`` (what ``await response.json()`` does), unchecked;
* openai: ``json.loads`` then ``openai.types.ImagesResponse.model_validate``.

No target: the figures say what a body costs the event loop, per answer.

    python benchmarks/bench_parse.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import random
import timeit
from collections.abc import Callable, Sequence
from typing import Any

from _common import FLUX, OPENAI, RAW, BenchOutput, Row, fmt_ratio, median, run_main

SCANNER = "its scanner alone"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (15)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 15
    return args


def _bodies() -> dict[str, bytes]:
    rng = random.Random(0)

    def images(count: int, size: int) -> bytes:
        data = [
            {"b64_json": base64.b64encode(rng.randbytes(size)).decode(), "revised_prompt": "fox"}
            for _ in range(count)
        ]
        return json.dumps({"created": 1700000000, "data": data}).encode()

    url = "https://cdn.example/images/" + "a" * 180 + ".png?sig=" + "b" * 64
    return {
        "one 18 KB b64_json image": images(1, 18_000),
        "four 18 KB b64_json images": images(4, 18_000),
        "ten 18 KB b64_json images": images(10, 18_000),
        "one 1.8 MB b64_json image": images(1, 1_800_000),
        "one url image": json.dumps({"created": 1, "data": [{"url": url}]}).encode(),
    }


def _contenders() -> dict[str, Callable[[bytes], Any]]:
    from openai.types import ImagesResponse as OpenAIImages

    from flux_async import ImagesResponse
    from flux_async._exceptions import parse_json

    return {
        FLUX: ImagesResponse.from_bytes,
        SCANNER: lambda raw: ImagesResponse.from_json(parse_json(raw)),
        RAW: json.loads,
        OPENAI: lambda raw: OpenAIImages.model_validate(json.loads(raw)),
    }


def run(args: argparse.Namespace) -> BenchOutput:
    bodies, contenders = _bodies(), _contenders()
    print(f"parsing an answer: {args.rounds} interleaved rounds, one process")
    rows: list[Row] = []
    notes: list[str] = []
    for name, raw in bodies.items():
        number = max(3, 2_000_000 // len(raw))  # ~tens of ms a timing
        for parse in contenders.values():  # warm-up
            parse(raw)
        times: dict[str, list[float]] = {who: [] for who in contenders}
        for _ in range(args.rounds):
            for who, parse in contenders.items():
                seconds = timeit.timeit(functools.partial(parse, raw), number=number)
                times[who].append(seconds / number)
        best = {who: median(values) for who, values in times.items()}
        print(
            f"  {name:<28} "
            + ", ".join(f"{who} {1e6 * seconds:8.1f} µs" for who, seconds in best.items())
        )
        for peer in (SCANNER, RAW, OPENAI):
            rows.append(
                Row(
                    figure=f"parse µs, {name} ({len(raw):,} B), flux ÷ {peer}",
                    flux=f"{1e6 * best[FLUX]:.1f} µs",
                    peer=f"{peer} {1e6 * best[peer]:.1f} µs",
                    ratio=fmt_ratio(best[FLUX] / best[peer]),
                    target="(info)",
                    met=None,
                )
            )
    notes.append(
        f"medians of {args.rounds} interleaved rounds, each the mean of a timeit loop; "
        "flux-async checks every field (raw aiohttp's json.loads checks none)"
    )
    return BenchOutput("parsing an answer", rows, notes)


def main() -> int:
    run(parse_args()).print()
    return 0


if __name__ == "__main__":
    run_main(main)
