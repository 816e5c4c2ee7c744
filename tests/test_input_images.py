"""Input images (kontext edits): URLs sent inside the prompt, as OpenAI-format gateways
take them, checked before anything is sent, and recognised by the emulator."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from flux_async import FluxClient, ImageRequest, ValidationError
from flux_async._cli import cli
from flux_async._models import FIELD_SPECS, MAX_PROMPT_LENGTH
from flux_async.emulator import Emulator
from flux_async.emulator._validation import validate

CAT = "https://img.example/cat.png"
HAT = "https://img.example/hat.png?size=large"


def test_urls_go_at_the_end_of_the_prompt() -> None:
    """The prompt as sent is the instruction, then each URL after a space; no JSON field."""
    request = ImageRequest(prompt="add a red hat", input_images=[CAT, HAT])
    assert request.input_images == (CAT, HAT)
    assert request.sent_prompt == f"add a red hat {CAT} {HAT}"
    body = request.to_json()
    assert body["prompt"] == request.sent_prompt
    assert "input_images" not in body
    assert request.to_bytes() == (
        b'{"prompt":"add a red hat '
        + f"{CAT} {HAT}".encode()
        + b'","model":"flux-kontext-pro","n":1,"aspect_ratio":"1:1"}'
    )
    # A template's URLs follow each prompt of a batch.
    assert request.with_prompt("a blue hat").sent_prompt == f"a blue hat {CAT} {HAT}"
    assert (
        ImageRequest(prompt="x", input_images=()).to_bytes() == ImageRequest(prompt="x").to_bytes()
    )


@pytest.mark.parametrize(
    ("value", "field", "needle"),
    [
        (CAT, "input_images", "wrap a single URL in a list"),
        ({"url": CAT}, "input_images", "a list of http(s) URLs"),
        (5, "input_images", "a list of http(s) URLs"),
        (["ftp://img.example/cat.png"], "input_images[0]", "http:// or https://"),
        ([CAT, "cat.png"], "input_images[1]", "http:// or https://"),
        (["https://"], "input_images[0]", "with a host"),
        (["https://img.example/a cat.png"], "input_images[0]", "no spaces"),
        (["https://img.example/cat.png\n"], "input_images[0]", "no spaces"),
        (["http://[::1/cat.png"], "input_images[0]", "http:// or https://"),
        ([b"https://img.example/cat.png"], "input_images[0]", "http:// or https://"),
    ],
)
def test_bad_input_images_are_refused(value: object, field: str, needle: str) -> None:
    """Each bad value is a ValidationError naming the field (and which URL) and what is allowed."""
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt="add a hat", input_images=value)  # type: ignore[arg-type]
    assert info.value.field == field
    assert needle in info.value.allowed


def test_urls_count_against_the_prompt_limit() -> None:
    """Prompt plus URLs (a space before each) must fit 1,000 characters, and the error says so."""
    url = "https://img.example/" + "c" * 30 + ".png"  # 54 characters, 55 with its space
    fits = "x" * (MAX_PROMPT_LENGTH - len(url) - 1)
    assert len(ImageRequest(prompt=fits, input_images=[url]).sent_prompt) == MAX_PROMPT_LENGTH
    with pytest.raises(ValidationError) as info:
        ImageRequest(prompt=fits + "x", input_images=[url])
    assert info.value.field == "input_images"
    message = str(info.value)
    assert "sent inside the prompt" in message
    assert f"make {MAX_PROMPT_LENGTH + 1}" in message
    # The same check on the batch path, which copies a template instead of rebuilding it.
    template = ImageRequest(prompt="x", input_images=[url])
    with pytest.raises(ValidationError, match="sent inside the prompt"):
        template.with_prompt(fits + "x")


def test_the_emulator_reads_urls_out_of_the_prompt() -> None:
    """revised_prompt is the instruction without the URLs, wherever they stand."""
    for prompt, instruction, images in [
        (f"add a red hat {CAT}", "add a red hat", (CAT,)),
        (f"{CAT} add a red hat", "add a red hat", (CAT,)),
        (f"put the hat {HAT} on the cat {CAT}", "put the hat on the cat", (HAT, CAT)),
        (CAT, "", (CAT,)),
        ("no images here: just text", "no images here: just text", ()),
    ]:
        job = validate({"prompt": prompt, "aspect_ratio": "1:1"}, require_aspect_ratio=True)
        assert (job.prompt, job.instruction, job.input_images) == (prompt, instruction, images)


async def test_an_edit_over_real_sockets(client: FluxClient, emulator: Emulator) -> None:
    """generate(input_images=...) sends the URLs in the prompt; the answer echoes without."""
    response = await client.generate("add a red hat", input_images=[CAT])
    assert [image.revised_prompt for image in response.data] == ["add a red hat"]
    [seen] = emulator.requests
    assert seen.body is not None
    assert seen.body["prompt"] == f"add a red hat {CAT}"
    assert "input_images" not in seen.body
    # Another image to edit is another picture.
    other = await client.generate("add a red hat", input_images=[HAT])
    assert other.urls != response.urls


async def test_fan_out_items_carry_their_own_images(client: FluxClient, emulator: Emulator) -> None:
    """A mapping item's input_images win over the batch's, which string prompts get."""
    results = await client.gather_generate(
        ["make it night", {"prompt": "make it snow", "input_images": [HAT]}],
        input_images=[CAT],
    )
    assert all(r.ok for r in results)
    assert [r.prompt for r in results] == ["make it night", "make it snow"]
    assert sorted(r.body["prompt"] for r in emulator.requests if r.body) == [
        f"make it night {CAT}",
        f"make it snow {HAT}",
    ]
    with pytest.raises(ValidationError, match=r"input_images\[0\]") as info:
        await client.gather_generate([{"prompt": "x", "input_images": ["cat.png"]}])
    assert "nothing was sent" in " ".join(info.value.__notes__)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env={"FLUX_API_KEY": None, "FLUX_BASE_URL": None})
    return result.exit_code, result.output


async def test_the_cli_option_repeats(tmp_path: Path, emulator: Emulator) -> None:
    """--input-image may be given several times; a bad URL is a usage error naming it."""
    assert FIELD_SPECS["input_images"].multiple
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add a red hat\n", "utf-8")
    out = tmp_path / "out.jsonl"
    common = ["generate", str(prompts), "--base-url", emulator.base_url, "-o", str(out)]
    key = ["--api-key", "sk-test-0123456789abcdef"]
    # The CLI runs asyncio.run itself: in a thread, beside the test's loop.
    code, output = await asyncio.to_thread(
        _invoke, *common, *key, "--input-image", CAT, "--input-images", HAT
    )
    assert code == 0, output
    [seen] = emulator.requests
    assert seen.body is not None
    assert seen.body["prompt"] == f"add a red hat {CAT} {HAT}"
    code, output = await asyncio.to_thread(_invoke, *common, *key, "--input-image", "cat.png")
    assert code == 2
    assert "Error: --input-images 'cat.png' is not allowed: an http:// or https:// URL" in output


QUICKSTART = Path(__file__).parent.parent / "docs" / "quickstart.md"


async def test_the_quickstart_edit_example_runs(client: FluxClient, emulator: Emulator) -> None:
    """The quickstart's edit example is real code: run it against the emulator."""
    section = QUICKSTART.read_text("utf-8").split("## Edit an image", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    compiled = compile(code, "quickstart.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    await eval(compiled, {"client": client})
    [seen] = emulator.requests
    assert seen.body is not None
    assert seen.body["prompt"] == "put a red hat on the cat https://example.com/cat.png"
