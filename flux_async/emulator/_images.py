"""The pictures the emulator hands out: a seed per image, PNG caches, the success body.

Each image of a request is named by a seed derived from ``(prompt, index)``, so the same
request always yields the same URLs, and ``GET /v1/images/{w}x{h}/{seed}.png`` can redraw the
picture from its path alone (see :mod:`._png`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from collections.abc import Callable

from ._png import gradient_png
from ._validation import Job
from ._wire import encode_json

__all__ = ["Images", "expired", "expiry_query", "image_seed", "success_body"]

_sha256 = hashlib.sha256
_wall_clock = time.time


def image_seed(prompt: str, index: int) -> str:
    """The seed of image ``index`` of a request for ``prompt`` (16 hex digits)."""
    return _sha256(b"%d\x00%s" % (index, prompt.encode())).hexdigest()[:16]


class Images:
    """Bounded caches of encoded pictures, so b64_json at 1024x1024 stays cheap."""

    __slots__ = ("b64", "png", "url_ttl")

    def __init__(self, maxsize: int) -> None:
        png = functools.lru_cache(maxsize=maxsize)(gradient_png)

        def b64(width: int, height: int, seed: str) -> str:
            return base64.b64encode(png(width, height, seed)).decode("ascii")

        self.png: Callable[[int, int, str], bytes] = png
        self.b64: Callable[[int, int, str], str] = functools.lru_cache(maxsize=maxsize)(b64)
        #: Seconds an image URL stays valid (None: forever), like a signed bucket URL.
        self.url_ttl: float | None = None


def expiry_query(ttl: float) -> str:
    """``?expires=<unix ms>`` for a URL valid ``ttl`` seconds from now."""
    return f"?expires={int((_wall_clock() + ttl) * 1000)}"


def expired(expires: str | None) -> bool:
    """Whether an image URL's ``expires`` parameter (unix ms) has passed; garbage has."""
    if expires is None:
        return False
    try:
        return _wall_clock() * 1000 > int(expires)
    except ValueError:
        return True


def success_body(host: str, job: Job, images: Images) -> bytes:
    """The 200 body for ``job``: inline PNGs, or URLs on ``host`` (the request's Host header)."""
    # The seed comes from the whole prompt (input image URLs included: another image to
    # edit is another picture); revised_prompt echoes it without them, as gateways do.
    width, height, prompt, revised = job.width, job.height, job.prompt, job.instruction
    items: list[dict[str, str]]
    if job.b64:
        b64 = images.b64
        items = [
            {"b64_json": b64(width, height, image_seed(prompt, i)), "revised_prompt": revised}
            for i in range(job.n)
        ]
    else:
        # The Host header, so the URL works however the client reached us (0.0.0.0, docker).
        prefix = f"http://{host}/v1/images/{width}x{height}/"
        # With url_ttl, the URL carries its expiry (unix ms) as signed bucket URLs do.
        query = "" if images.url_ttl is None else expiry_query(images.url_ttl)
        items = [
            {"url": f"{prefix}{image_seed(prompt, i)}.png{query}", "revised_prompt": revised}
            for i in range(job.n)
        ]
    return encode_json({"created": int(_wall_clock()), "data": items}).encode()
