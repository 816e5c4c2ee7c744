"""Request checks: read and decode a generation body, then validate its fields into a :class:`Job`.

Two stages, both ending in :class:`Invalid` (a 4xx answer) for a bad request:

* :func:`read_body` - the bytes on the wire to a JSON object: a readable body (not over
  :data:`MAX_BODY_BYTES`, a well-formed ``Content-Encoding``), text in UTF-8/16/32, JSON that is
  not nested too deeply, an object, and no lone UTF-16 surrogate in any string;
* :func:`validate` - the object's fields against the contract (``prompt``, ``aspect_ratio``,
  ``n``, ``size``, ...), giving the :class:`Job` to generate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .._models import ASPECT_RATIOS, FIELD_SPECS

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_N",
    "MAX_PROMPT_CHARS",
    "MAX_SIDE",
    "Invalid",
    "Job",
    "read_body",
    "validate",
]

MAX_BODY_BYTES: Final = 1024**2
"""The largest request body read (aiohttp's default ``client_max_size``); larger gets a 413."""
MAX_PROMPT_CHARS: Final = 1000
MAX_N: Final = 10
MAX_SIDE: Final = 2048
LONG_SIDE: Final = 1024
# The fields checked by rules of their own below. Every other string field the client
# library declares must be a string, one of its choices when it has some: a field added
# there is checked here too, against the same allowed values.
_OWN_RULES: Final = frozenset({"n", "aspect_ratio", "size"})
_STRING_FIELDS: Final = tuple(
    (name, None if spec.choices is None else frozenset(spec.choices))
    for name, spec in FIELD_SPECS.items()
    # An in_prompt field (input_images) is never a JSON field: it is read out of the prompt.
    if name not in _OWN_RULES and spec.type is str and not spec.in_prompt
)
# An input image, as OpenAI-format gateways for kontext take it: an http(s) URL standing
# as a word of its own anywhere in the prompt. The match takes the whitespace before it,
# so that removing it leaves the instruction as it was written.
_IMAGE_URL_RE: Final = re.compile(r"(?:^|\s+)(https?://\S+)", re.IGNORECASE)
_SIZE_RE: Final = re.compile(r"([0-9]{2,5})x([0-9]{2,5})")
# After decoding, a valid surrogate pair is one code point, so any surrogate left is lone.
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
# A strict decode rejects surrogates written as raw bytes, so the only way one gets into the
# parsed body is a \uD800-\uDFFF escape; scanning the parsed body is skipped without one.
_SURROGATE_ESCAPE_RE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a decimal",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}
_CANNOT_PARSE: Final = "We could not parse the JSON body of your request"

_loads = json.loads
_detect_encoding = json.detect_encoding


class Invalid(Exception):
    """A request the emulator rejects: the HTTP ``status`` and the error body's fields.

    ``close`` asks to close the connection after the answer: the request's body could not be
    read to its end, so nothing after it on the connection can be trusted.
    """

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.close = close


class Job(NamedTuple):
    """A validated generation request: what to draw.

    ``prompt`` is the prompt as sent; ``instruction`` is that prompt without its input
    image URLs (``input_images``), which is what the emulator echoes as ``revised_prompt``.
    """

    prompt: str
    n: int
    width: int
    height: int
    b64: bool
    instruction: str
    input_images: tuple[str, ...] = ()


# -- the body ---------------------------------------------------------------------------------


async def read_body(request: web.BaseRequest) -> dict[str, Any] | Invalid:
    """Read the request body and return the JSON object in it, or why there is none.

    A client that goes away mid-body is not answered, so its ``ConnectionError`` propagates.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        message = f"Request body too large: the limit is {MAX_BODY_BYTES} bytes."
        return Invalid(message, None, "request_too_large", 413)
    except RequestPayloadError:
        # aiohttp inflates gzip/deflate bodies as they arrive; this is a corrupt stream.
        encoding = request.headers.get("Content-Encoding", "")
        message = f"We could not decode the request body (Content-Encoding: {encoding})."
        return Invalid(message, None, "invalid_content_encoding", close=True)
    return parse_body(raw)


def parse_body(raw: bytes) -> dict[str, Any] | Invalid:
    """Decode ``raw`` into a JSON object, or return why it is not one."""
    try:
        # Strict decoding: json.loads(bytes) would let encoded surrogates through.
        text = raw.decode(_detect_encoding(raw))
    except UnicodeDecodeError:
        return Invalid(f"{_CANNOT_PARSE}: it is not UTF-8 text.")
    try:
        parsed = _loads(text)
    except RecursionError:
        return Invalid(f"{_CANNOT_PARSE}: it is nested too deeply.")
    except ValueError:
        return Invalid(f"{_CANNOT_PARSE}. The request body must be a JSON object.")
    if type(parsed) is not dict:
        return Invalid("Invalid type for request body: expected an object.")
    if _SURROGATE_ESCAPE_RE.search(text) is not None:
        problem = _lone_surrogate(parsed)
        if problem is not None:
            return problem
    return parsed


def _lone_surrogate(body: dict[str, Any]) -> Invalid | None:
    """Name the top-level field holding a lone surrogate, which no UTF-8 text can carry."""
    for key, value in body.items():
        if _SURROGATE_RE.search(key) is not None:
            where, param = "Invalid request body: an object key contains", None
        elif _holds_surrogate(value):
            where, param = f"Invalid '{key}': it contains", key
        else:
            continue
        message = f"{where} a lone UTF-16 surrogate, which is not valid Unicode."
        return Invalid(message, param, "invalid_unicode")
    return None


def _holds_surrogate(value: object) -> bool:
    # A stack, not recursion: the body may be nested as deeply as json.loads allowed.
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if _SURROGATE_RE.search(item) is not None:
                return True
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return False


# -- the fields -------------------------------------------------------------------------------


def _dims_for_ratio(ratio: str) -> tuple[int, int]:
    wide, tall = (int(part) for part in ratio.split(":"))
    if wide >= tall:
        return LONG_SIDE, round(LONG_SIDE * tall / wide)
    return round(LONG_SIDE * wide / tall), LONG_SIDE


_RATIO_DIMS: Final[dict[str, tuple[int, int]]] = {r: _dims_for_ratio(r) for r in ASPECT_RATIOS}


def _missing(param: str) -> Invalid:
    return Invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _wrong_type(param: str, expected: str, value: object) -> Invalid:
    got = _JSON_TYPE_NAMES.get(type(value), "a value")
    message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
    return Invalid(message, param, "invalid_type")


def _bad_value(param: str, value: object, allowed: Iterable[str]) -> Invalid:
    choices = ", ".join(f"'{v}'" for v in allowed)
    message = f"Invalid value for '{param}': {value!r}. Supported values are: {choices}."
    return Invalid(message, param, "invalid_value")


def validate(body: dict[str, Any], require_aspect_ratio: bool) -> Job:
    """Check the fields of a generation body; raise :class:`Invalid` naming the first bad one.

    JSON null counts as "not given", as OpenAI does for optional parameters.
    """
    prompt = _prompt(body)
    instruction, images = _input_images(prompt)
    dims = _ratio_dims(body, require_aspect_ratio)
    n = _count(body)
    dims = _size_dims(body) or dims
    for param, allowed in _STRING_FIELDS:
        value = body.get(param)
        if value is None:
            continue
        if type(value) is not str:
            raise _wrong_type(param, "a string", value)
        if allowed is not None and value not in allowed:
            raise _bad_value(param, value, sorted(allowed))
    b64 = body.get("response_format") == "b64_json"
    return Job(prompt, n, dims[0], dims[1], b64, instruction, images)


def _input_images(prompt: str) -> tuple[str, tuple[str, ...]]:
    """The prompt's instruction and its input image URLs (a kontext edit), if it has any."""
    if "://" not in prompt:  # the common case: plain text, no regex
        return prompt, ()
    images = tuple(_IMAGE_URL_RE.findall(prompt))
    if not images:
        return prompt, ()
    # "A prompt and/or an input image": URLs alone are a valid request, with no words.
    return _IMAGE_URL_RE.sub("", prompt).strip(), images


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if type(prompt) is not str:
        raise _wrong_type("prompt", "a string", prompt)
    if not prompt.strip():
        raise Invalid("Invalid 'prompt': empty string.", "prompt", "empty_string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise Invalid(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
            "prompt",
            "string_above_max_length",
        )
    return prompt


def _ratio_dims(body: dict[str, Any], required: bool) -> tuple[int, int]:
    ratio = body.get("aspect_ratio")
    if ratio is None:
        if required:
            raise _missing("aspect_ratio")
        return LONG_SIDE, LONG_SIDE
    if type(ratio) is not str:
        raise _wrong_type("aspect_ratio", "a string", ratio)
    found = _RATIO_DIMS.get(ratio)
    if found is None:
        raise _bad_value("aspect_ratio", ratio, ASPECT_RATIOS)
    return found


def _count(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if type(n) is not int:
        raise _wrong_type("n", "an integer", n)
    if n < 1:
        raise Invalid(
            f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} "
            "instead.",
            "n",
            "integer_below_min_value",
        )
    if n > MAX_N:
        raise Invalid(
            f"Invalid 'n': integer above maximum value. Expected a value <= {MAX_N}, but got "
            f"{n} instead.",
            "n",
            "integer_above_max_value",
        )
    return n


def _size_dims(body: dict[str, Any]) -> tuple[int, int] | None:
    size = body.get("size")
    if size is None:
        return None
    if type(size) is not str:
        raise _wrong_type("size", "a string", size)
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        raise Invalid(
            f"Invalid value for 'size': {size!r}. Expected WIDTHxHEIGHT, e.g. '1024x1024'.",
            "size",
            "invalid_value",
        )
    width, height = int(match[1]), int(match[2])
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise Invalid(
            f"Invalid value for 'size': {size!r}. Each side must be 1..{MAX_SIDE}.",
            "size",
            "invalid_value",
        )
    return width, height
