"""The emulator speaks the contract well enough for the official `openai` client."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from flux_async.emulator import Emulator, Fault

KEY = "sk-test"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(api_keys=[KEY]) as emulator:
        yield emulator


@pytest.fixture
async def openai_client(emu: Emulator) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=emu.base_url, api_key=KEY, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


def ihdr_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


async def test_openai_client_generates_fetchable_images(
    emu: Emulator, openai_client: openai.AsyncOpenAI
) -> None:
    """images.generate with n=2 and aspect_ratio 16:9 returns two URLs serving 1024x576 PNGs."""
    result = await openai_client.images.generate(
        model="flux-kontext-pro",
        prompt="a lighthouse at dusk",
        n=2,
        extra_body={"aspect_ratio": "16:9"},
    )
    assert result.data is not None
    assert len(result.data) == 2
    assert all(image.revised_prompt == "a lighthouse at dusk" for image in result.data)
    async with aiohttp.ClientSession() as http:
        for image in result.data:
            assert image.url is not None
            async with http.get(image.url) as response:
                assert response.status == 200
                assert response.content_type == "image/png"
                assert ihdr_size(await response.read()) == (1024, 576)
    (seen,) = emu.requests
    assert seen.body is not None
    assert (seen.body["model"], seen.body["n"], seen.body["aspect_ratio"]) == (
        "flux-kontext-pro",
        2,
        "16:9",
    )


async def test_openai_client_b64_json(openai_client: openai.AsyncOpenAI) -> None:
    """response_format=b64_json comes back as an inline base64 PNG the client exposes."""
    result = await openai_client.images.generate(
        prompt="a red fox",
        response_format="b64_json",
        extra_body={"aspect_ratio": "1:1"},
    )
    assert result.data is not None
    (image,) = result.data
    assert image.b64_json is not None
    assert ihdr_size(base64.b64decode(image.b64_json)) == (1024, 1024)


async def test_openai_client_bad_request(openai_client: openai.AsyncOpenAI) -> None:
    """A 400 surfaces as openai.BadRequestError carrying the param."""
    with pytest.raises(openai.BadRequestError) as excinfo:
        await openai_client.images.generate(
            prompt="a red fox", n=11, extra_body={"aspect_ratio": "1:1"}
        )
    assert excinfo.value.status_code == 400
    assert excinfo.value.param == "n"
    assert excinfo.value.code == "integer_above_max_value"


async def test_openai_client_auth_and_rate_errors(emu: Emulator) -> None:
    """401 and scripted 429 map onto openai's AuthenticationError and RateLimitError."""
    wrong = openai.AsyncOpenAI(base_url=emu.base_url, api_key="sk-wrong", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await wrong.images.generate(prompt="a red fox", extra_body={"aspect_ratio": "1:1"})
    finally:
        await wrong.close()
    right = openai.AsyncOpenAI(base_url=emu.base_url, api_key=KEY, max_retries=0)
    try:
        emu.script(Fault.status(429, headers={"Retry-After": "1"}))
        with pytest.raises(openai.RateLimitError) as excinfo:
            await right.images.generate(prompt="a red fox", extra_body={"aspect_ratio": "1:1"})
        assert excinfo.value.response.headers["retry-after"] == "1"
    finally:
        await right.close()
