"""The JSON body of an images response, parsed with its base64 images lifted out first.

Python's JSON scanner reads a string a character at a time: a ``b64_json`` image is
most of its body and most of its parse (~20 µs of ~25 for an 18 KB image, 2-3 ms for a
real 1.8 MB one, during which the event loop does nothing else). `parse_images_body`
finds each long ``b64_json`` string with ``bytes.find``, checks that it is base64 and
nothing else (then it is the same text as a JSON string, with no escape to undo), parses
the rest of the body, and puts the strings back: the same value, checked as strictly as
`parse_json` checks the whole body, in a fraction of the time. Any body it cannot be
sure of is parsed whole.
"""

from __future__ import annotations

import re
from typing import Any, Final

from ._exceptions import parse_json
from ._files import simd_b64decode

__all__ = ["LIFTED_BYTES", "SEARCHED_BYTES", "SKIPPED_KEYS", "parse_images_body"]

#: A body longer than this is searched for ``b64_json`` strings to lift out (an answer
#: of URLs is shorter: it pays no search, ~0.5 ns a byte, for nothing)...
SEARCHED_BYTES: Final = 16 * 1024
#: ...and a string at least this long is lifted (at 4 KiB the checks cost about what the
#: scanner does; a real image is far longer).
LIFTED_BYTES: Final = 8 * 1024
#: Past this many matches of the name that are not a long string to lift, the body is
#: parsed whole: the search would cost more than it saves (an answer holds a few images).
SKIPPED_KEYS: Final = 16
_KEY: Final = b'"b64_json"'
# What follows the name when it is a key with a string value, spaces included: matched
# where the name ends (in C, however long a run of spaces a server sends).
_TO_VALUE: Final = re.compile(rb'[ \t\n\r]*:[ \t\n\r]*"')
_BASE64: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
# The only JSON text that makes a string hold U+0000: a body with it (outside the lifted
# strings, which hold no backslash) is parsed whole, so in the rest of a body, a string
# starting with U+0000 is one of the placeholders.
_ESCAPED_NUL: Final = b"\\u0000"


def parse_images_body(raw: bytes) -> Any:
    """What ``parse_json(raw)`` returns or raises, faster for a body with long
    ``b64_json`` strings (module docstring).

    Example::

        parse_images_body(b'{"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}]}')
        # {'created': 1, 'data': [{'b64_json': 'iVBORw0KGgo='}]}
    """
    lifted = _lift(raw) if len(raw) > SEARCHED_BYTES else None
    if lifted is None:
        return parse_json(raw)
    rest, images = lifted
    try:
        payload = parse_json(rest)
    except ValueError:
        return parse_json(raw)  # its error says where, in the body as it came
    if not _put_back(payload, images):
        return parse_json(raw)  # a lifted key was not an image's: parse it as it came
    return payload


def _lift(raw: bytes) -> tuple[bytes, list[str]] | None:
    """The body with each long ``b64_json`` string replaced by a placeholder (U+0000 and
    its number), and those strings; None when there is none or the body is in doubt."""
    if type(raw) is not bytes:
        return None
    find, match, size, view = raw.find, _TO_VALUE.match, len(_KEY), memoryview(raw)
    pieces: list[bytes] = []
    images: list[str] = []
    copied = at = skipped = 0
    while (key := find(_KEY, at)) >= 0:
        # Followed by ':', this is a key named b64_json, in whatever object, or the end
        # of a longer key ('"x\\"b64_json"'): a placeholder that is not an image's is
        # not found in the data, and the body is then parsed whole.
        at = key + size
        value = match(raw, at)
        if value is None:
            skipped += 1
        else:
            start = value.end()
            stop = find(b'"', start)
            if stop < 0:
                return None  # unterminated: the whole parse says where
            at = stop + 1
            if stop - start >= LIFTED_BYTES:
                text = view[start:stop]  # not copied: decoded once, below
                if not _is_base64(text):
                    return None  # an escape or another character: the scanner reads it
                pieces += (raw[copied:start], b"\\u0000%d" % len(images))
                images.append(str(text, "ascii"))
                copied = stop
                continue
            skipped += 1
        if skipped > SKIPPED_KEYS:
            return None
    if not images:
        return None
    pieces.append(raw[copied:])
    rest = b"".join(pieces)
    if rest.count(_ESCAPED_NUL) != len(images):
        return None  # the server's own U+0000 somewhere: a placeholder's double
    return rest, images


def _is_base64(text: memoryview) -> bool:
    """Whether ``text`` is base64 (no quote, backslash or control character: as a JSON
    string it means itself)."""
    decode = simd_b64decode()
    if decode is not None:
        try:
            decode(text, validate=True)  # ~3 µs for 24 KB: SIMD
        except ValueError:  # binascii.Error too
            return False
        return True
    return not bytes(text).translate(None, _BASE64)  # ~10 µs for 24 KB


def _put_back(payload: object, images: list[str]) -> bool:
    """Put the lifted strings back where their placeholders are: in the ``data`` items'
    ``b64_json``, in order, each once; False if one was anywhere else. (`_lift` made sure
    the body's only U+0000 are its placeholders, one each: no more than ``images`` can
    turn up here.)"""
    data = payload.get("data") if type(payload) is dict else None
    if type(data) is not list:
        return False
    count = 0
    for item in data:
        if type(item) is dict:
            value = item.get("b64_json")
            if type(value) is str and value[:1] == "\0":
                if value != f"\0{count}":  # one lost to a repeated key, or out of place
                    return False
                item["b64_json"] = images[count]
                count += 1
    return count == len(images)
