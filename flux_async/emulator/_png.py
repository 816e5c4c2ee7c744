"""A tiny pure-Python PNG encoder (zlib + struct), enough for the emulator's images.

The emulator serves one deterministic picture per ``(prompt, index)``: a horizontal gradient
between two colours taken from a SHA-256 of the seed. Every row of such a picture is the same,
so rows after the first are written with PNG filter type 2 ("Up"), which turns them into runs
of zero bytes; zlib squeezes those to almost nothing, so even a 2048x2048 image encodes in a
few milliseconds and weighs a few kilobytes.

>>> data = gradient_png(4, 2, "00ff")
>>> data[:8] == PNG_SIGNATURE and png_size(data) == (4, 2)
True
"""

from __future__ import annotations

import hashlib
import struct
import zlib

__all__ = ["PNG_SIGNATURE", "encode_rgb", "gradient_png", "png_size"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The eight bytes every PNG file starts with."""

_IHDR = struct.Struct(">IIBBBBB")
_U32 = struct.Struct(">I")
# 8 bits per channel, colour type 2 (truecolour RGB), deflate, adaptive filtering, no interlace.
_BIT_DEPTH, _COLOUR_RGB, _COMPRESSION, _FILTER_METHOD, _NO_INTERLACE = 8, 2, 0, 0, 0
_FILTER_NONE = b"\x00"
_FILTER_UP = b"\x02"
_MAX_SIDE = 1 << 16
_IEND = b""
_ROWS_PER_BLOCK = 64


def _chunk(tag: bytes, data: bytes) -> bytes:
    return _U32.pack(len(data)) + tag + data + _U32.pack(zlib.crc32(tag + data))


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        raise ValueError(f"PNG sides must be in 1..{_MAX_SIDE}, got {width}x{height}")


def _assemble(width: int, height: int, idat: bytes) -> bytes:
    header = _IHDR.pack(
        width, height, _BIT_DEPTH, _COLOUR_RGB, _COMPRESSION, _FILTER_METHOD, _NO_INTERLACE
    )
    return b"".join(
        (PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", _IEND))
    )


def encode_rgb(width: int, height: int, pixels: bytes) -> bytes:
    """Encode raw 8-bit RGB pixels (rows top to bottom, no padding) as a PNG file.

    >>> png = encode_rgb(2, 1, bytes([255, 0, 0, 0, 0, 255]))  # a red and a blue pixel
    >>> png_size(png)
    (2, 1)
    """
    _check_size(width, height)
    stride = width * 3
    if len(pixels) != stride * height:
        raise ValueError(f"expected {stride * height} bytes of RGB for {width}x{height}")
    scanlines = b"".join(
        _FILTER_NONE + pixels[row : row + stride] for row in range(0, len(pixels), stride)
    )
    return _assemble(width, height, zlib.compress(scanlines, 6))


def gradient_png(width: int, height: int, seed: str) -> bytes:
    """Encode the emulator's deterministic picture for ``seed``: a left-to-right gradient.

    The same ``(width, height, seed)`` always gives the same bytes.

    >>> gradient_png(64, 32, "c0ffee") == gradient_png(64, 32, "c0ffee")
    True
    """
    _check_size(width, height)
    digest = hashlib.sha256(seed.encode()).digest()
    r0, g0, b0, r1, g1, b1 = digest[:6]
    span = max(width - 1, 1)
    row = bytearray(width * 3)
    for x in range(width):
        i = 3 * x
        row[i] = r0 + (r1 - r0) * x // span
        row[i + 1] = g0 + (g1 - g0) * x // span
        row[i + 2] = b0 + (b1 - b0) * x // span
    # Filter "Up" turns every row after the first into zeros, and run-length deflate
    # swallows zeros at memory speed; feeding them in blocks avoids one huge buffer.
    deflate = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    parts = [deflate.compress(_FILTER_NONE + bytes(row))]
    zero_row = _FILTER_UP + bytes(width * 3)
    remaining = height - 1
    while remaining > 0:
        rows = min(remaining, _ROWS_PER_BLOCK)
        parts.append(deflate.compress(zero_row * rows))
        remaining -= rows
    parts.append(deflate.flush())
    return _assemble(width, height, b"".join(parts))


def png_size(data: bytes) -> tuple[int, int]:
    """Return ``(width, height)`` from a PNG's IHDR chunk; raise ``ValueError`` if not a PNG.

    >>> png_size(gradient_png(3, 5, "ab"))
    (3, 5)
    """
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
