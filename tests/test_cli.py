"""The ``flux-async`` command line: generate, demo, emulator, and ``python -m flux_async``.

A command calls ``asyncio.run`` itself, so `run` invokes it (through click's CliRunner) in
a worker thread, with a loop of its own; a test that needs a server outliving one command
(to count what reached it, or to check a key) runs an `Emulator` in the test's loop.

The tests are async although most only wait on that thread: a plain test that runs first
in a session makes pytest-asyncio and looptime leave an event loop that is later dropped
unclosed (a ResourceWarning at exit, an error under filterwarnings), and test_cli.py sorts
first.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from flux_async._batch import BatchDirectory
from flux_async._cli import cli, sample_prompts
from flux_async._models import FIELD_SPECS
from flux_async.emulator import Emulator

from .conftest import serving

KEY = "sk-cli-secret-0123456789abcdef"


def _invoke(args: list[str], input: str | None, env: dict[str, str]) -> Result:
    # No FLUX_* from the developer's shell may leak into a test.
    clean: dict[str, str | None] = {"FLUX_API_KEY": None, "FLUX_BASE_URL": None}
    return CliRunner().invoke(cli, args, input=input, env={**clean, **env})


async def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in a worker thread (its asyncio.run cannot nest in the test's loop)."""
    return await asyncio.to_thread(_invoke, list(args), input, env or {})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


async def python(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python *args`` in a subprocess, without the FLUX_* variables of this shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
async def server() -> AsyncIterator[Emulator]:
    """An emulator that requires ``KEY``, running in the test's loop, closed after it."""
    async with Emulator(api_keys=[KEY]) as emu:
        yield emu


async def test_generate_writes_one_line_per_prompt(tmp_path: Path) -> None:
    """generate --emulator: one ok JSON line with urls per prompt; blanks and # skipped."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\n# a comment\n  a crow  \na cat\n", "utf-8")
    out = tmp_path / "out.jsonl"
    result = await run("generate", str(prompts), "--emulator", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    by_index = {r["index"]: r for r in records}
    assert [by_index[i]["prompt"] for i in range(3)] == ["a fox", "a crow", "a cat"]
    for record in records:
        assert record["ok"] is True
        assert record["attempts"] == 1
        assert len(record["urls"]) == 1
        assert record["urls"][0].startswith("http://127.0.0.1:")
        assert "error" not in record
    assert "no real API is used" in result.output
    assert "3 prompts: 3 succeeded, 0 failed" in result.output


async def test_generate_reads_stdin_and_writes_stdout() -> None:
    """With no PROMPTS and no --out, prompts come from stdin and results go to stdout."""
    result = await run("generate", "--emulator", "--aspect-ratio", "16:9", input="one\ntwo\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    assert sorted(r["prompt"] for r in lines) == ["one", "two"]
    # The emulator's image URLs carry the size the aspect ratio asked for.
    assert all("/1024x576/" in r["urls"][0] for r in lines)


async def test_generate_jsonl_per_line_fields(tmp_path: Path) -> None:
    """--jsonl: each line's own fields apply; a line with a bad field fails alone (exit 1)."""
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "two wide foxes", "n": 2, "aspect_ratio": "16:9"},
        {"prompt": "a tall crow", "aspect_ratio": "9:16"},
        {"prompt": "a bad ratio", "aspect_ratio": "5:4"},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines), "utf-8")
    out = tmp_path / "out.jsonl"
    result = await run("generate", "--jsonl", str(prompts), "--emulator", "-o", str(out))
    assert result.exit_code == 1, result.output
    by_index = {r["index"]: r for r in read_jsonl(out)}
    assert sorted(by_index) == [0, 1, 2]
    assert by_index[0]["ok"]
    assert len(by_index[0]["urls"]) == 2
    assert all("/1024x576/" in url for url in by_index[0]["urls"])
    assert by_index[1]["ok"]
    assert "/576x1024/" in by_index[1]["urls"][0]
    bad = by_index[2]
    assert bad["ok"] is False
    assert "urls" not in bad
    assert bad["error"]["type"] == "ValidationError"
    assert "5:4" in bad["error"]["message"]
    assert "2 succeeded, 1 failed" in result.output


async def test_generate_jsonl_stops_at_a_line_that_is_not_json(tmp_path: Path) -> None:
    """A line that is not JSON ends the input with exit 2; the lines before it are written."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "first"}\nnot json\n{"prompt": "never read"}\n', "utf-8")
    out = tmp_path / "out.jsonl"
    result = await run("generate", "--jsonl", str(prompts), "--emulator", "-o", str(out))
    assert result.exit_code == 2, result.output
    assert [r["prompt"] for r in read_jsonl(out)] == ["first"]
    assert "line 2 is not JSON" in result.output


async def test_bad_aspect_ratio_is_a_clean_usage_error(tmp_path: Path, server: Emulator) -> None:
    """--aspect-ratio 5:4: exit 2, one line naming the value and the choices, nothing sent."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n", "utf-8")
    out = tmp_path / "out.jsonl"
    result = await run(
        "generate",
        str(prompts),
        "--aspect-ratio",
        "5:4",
        "--base-url",
        server.base_url,
        "--api-key",
        KEY,
        "--out",
        str(out),
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --aspect-ratio '5:4' is not allowed: "
        "one of 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21"
    ]
    assert not out.exists()
    assert server.stats.requests == 0


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--user", "", "a non-empty string"),
        ("--user", " ", "a non-empty string"),
        ("--model", "", "a non-empty string such as 'flux-kontext-pro'"),
        (
            "--size",
            "12",
            "WIDTHxHEIGHT such as '1024x1024' (documented: 256x256, 512x512, "
            "1024x1024; the server judges other sizes)",
        ),
    ],
)
async def test_a_blank_or_malformed_value_is_refused_in_cli_terms(
    server: Emulator, option: str, value: str, allowed: str
) -> None:
    """--user "" is refused like --model "" (an unset variable, most likely), in the
    CLI's terms (no Python None), before anything is sent."""
    result = await run(
        "generate", option, value, "--base-url", server.base_url, "--api-key", KEY, input="a\n"
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {option} {value!r} is not allowed: {allowed}"
    ]
    assert server.stats.requests == 0


async def test_batch_deadline_cuts_off_in_progress_and_leaves_the_rest(tmp_path: Path) -> None:
    """--batch-deadline 0.3 against answers that take 60 s: the prompts in progress fail
    naming the deadline as given, the rest are "not run" (no record), the run says why,
    and a rerun without the deadline finishes every one."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(10)), "utf-8")
    out = tmp_path / "out"
    async with Emulator(api_keys=[KEY], latency=60) as slow:
        args = ["--base-url", slow.base_url, "--api-key", KEY, "--concurrency", "2"]
        result = await run(
            "batch", str(prompts), "--out", str(out), *args, "--batch-deadline", "0.3"
        )
        assert result.exit_code == 1, result.output
        records = read_jsonl(out / "manifest.jsonl")
        assert [r["status"] for r in records] == ["failed", "failed"]
        assert {r["error"]["message"] for r in records} == {
            "the batch deadline of 0.3 s passed before this prompt finished"
        }
        assert slow.stats.requests == 2
    lines = result.output.strip().splitlines()
    assert "0 of 10 prompts ok" in lines[-2]
    assert "2 failed, 8 not run" in lines[-2]
    assert lines[-1] == (
        "The batch deadline of 0.3 s passed: the prompts in progress then failed, and the "
        "rest were not run."
    )
    async with Emulator(api_keys=[KEY]) as fast:
        args = ["--base-url", fast.base_url, "--api-key", KEY]
        rerun = await run("batch", str(prompts), "--out", str(out), *args)
        assert rerun.exit_code == 0, rerun.output
        assert fast.stats.requests == 10
    assert "The batch deadline" not in rerun.output


async def test_generate_help_has_an_option_per_request_field() -> None:
    """Every ImageRequest field is an option of `generate`, with its help and choices."""
    result = await run("generate", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # undo click's line wrapping
    for name, spec in FIELD_SPECS.items():
        option = "--" + name.replace("_", "-")
        assert f"{option} {'INTEGER' if spec.type is int else 'TEXT'} {spec.help}" in text
        if spec.choices:
            # aspect_ratio also takes none (send none), as its help says.
            end = "; or none to send none." if name == "aspect_ratio" else "."
            assert "One of: " + ", ".join(spec.choices) + end in text
    assert "-n, --n INTEGER" in text


async def test_request_options_reach_the_body(tmp_path: Path, server: Emulator) -> None:
    """Request options are sent as given; --size alone sends the ratio that size has."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n", "utf-8")
    out = tmp_path / "out.jsonl"
    args = ["--base-url", server.base_url, "--api-key", KEY, "-o", str(out)]
    result = await run(
        "generate", str(prompts), *args, "--size", "1792x1024", "-n", "2", "--user", "u-7"
    )
    assert result.exit_code == 0, result.output
    [seen] = server.requests
    assert seen.body == {
        "prompt": "a fox",
        "model": "flux-kontext-pro",
        "n": 2,
        "aspect_ratio": "16:9",
        "size": "1792x1024",
        "user": "u-7",
    }
    assert all("/1792x1024/" in url for url in read_jsonl(out)[0]["urls"])


async def test_size_contradicting_aspect_ratio_is_a_usage_error(
    tmp_path: Path, server: Emulator
) -> None:
    """--aspect-ratio 1:1 --size 1792x1024: exit 2, one line, nothing sent."""
    result = await run(
        "generate",
        "--aspect-ratio",
        "1:1",
        "--size",
        "1792x1024",
        "--base-url",
        server.base_url,
        "--api-key",
        KEY,
        input="a fox\n",
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --aspect-ratio '1:1' is not allowed: the ratio of size='1792x1024', '16:9' "
        "(within 3 %); or leave aspect_ratio out"
    ]
    assert server.stats.requests == 0


async def test_a_size_with_no_ratio_needs_aspect_ratio_none(
    tmp_path: Path, server: Emulator
) -> None:
    """--size 1024x512 (none of the nine ratios): exit 2 saying to pass --aspect-ratio
    none, nothing sent; with it, the size goes alone (to a server that takes that)."""
    args = ["--size", "1024x512", "--base-url", server.base_url, "--api-key", KEY]
    refused = await run("generate", *args, input="a fox\n")
    assert refused.exit_code == 2
    [line] = refused.output.strip().splitlines()
    assert line.startswith("Error: --size '1024x512' is not allowed: ")
    assert "or pass --aspect-ratio none to send the size alone" in line
    assert server.stats.requests == 0
    sent = await run("generate", *args, "--aspect-ratio", "none", input="a fox\n")
    assert sent.exit_code == 1  # this emulator requires aspect_ratio, like the API
    [seen] = server.requests
    assert "aspect_ratio" not in seen.body
    assert seen.body["size"] == "1024x512"


async def test_conflicting_rate_limits_are_a_usage_error() -> None:
    """--rate-limit with --rate-limit-per-minute is refused with exit 2 before anything runs."""
    result = await run(
        "generate", "--emulator", "--rate-limit", "5", "--rate-limit-per-minute", "60"
    )
    assert result.exit_code == 2
    assert "not both" in result.output
    assert "no real API" not in result.output


async def test_api_key_is_sent_but_never_shown(tmp_path: Path, server: Emulator) -> None:
    """The key from $FLUX_API_KEY reaches the server and appears in no output, even with -v."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na crow\n", "utf-8")
    out = tmp_path / "out.jsonl"
    env = {"FLUX_API_KEY": KEY, "FLUX_BASE_URL": server.base_url}
    result = await run("generate", str(prompts), "-v", "--out", str(out), env=env)
    assert result.exit_code == 0, result.output
    assert server.stats.successes == 2  # the server requires KEY: it was sent
    assert KEY not in result.output
    assert KEY not in out.read_text("utf-8")


async def test_wrong_api_key_fails_each_prompt_with_401(tmp_path: Path, server: Emulator) -> None:
    """A rejected key: every prompt fails with status_code 401, exit 1, key not shown."""
    wrong = "sk-wrong-key-fedcba9876543210"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n", "utf-8")
    out = tmp_path / "out.jsonl"
    result = await run(
        "generate", str(prompts), "--api-key", wrong, "--base-url", server.base_url, "-o", str(out)
    )
    assert result.exit_code == 1, result.output
    [record] = read_jsonl(out)
    assert record["ok"] is False
    assert record["error"]["type"] == "AuthenticationError"
    assert record["error"]["status_code"] == 401
    assert wrong not in result.output
    assert wrong not in out.read_text("utf-8")


async def test_generate_stops_on_a_wrong_key_and_says_why_on_stderr(
    tmp_path: Path, server: Emulator
) -> None:
    """60 prompts with a refused key: at most `concurrency` requests, a line per prompt
    (the rest BatchStoppedError), and one stderr line with the count and the hint."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(60)), "utf-8")
    out = tmp_path / "out.jsonl"
    result = await run(
        "generate",
        str(prompts),
        "--api-key",
        "sk-wrong",
        "--base-url",
        server.base_url,
        "--concurrency",
        "4",
        "-o",
        str(out),
    )
    assert result.exit_code == 1, result.output
    types = [record["error"]["type"] for record in read_jsonl(out)]
    refused = types.count("AuthenticationError")
    assert len(types) == 60
    assert 1 <= refused <= 4
    assert types.count("BatchStoppedError") == 60 - refused
    assert server.stats.requests == refused
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "AuthenticationError" in line
    assert "The API key was refused" in line
    assert f"{60 - refused} prompts were not sent" in line


@pytest.mark.filterwarnings("default::UserWarning")
async def test_a_warning_is_one_line_and_the_key_check_warns_once(tmp_path: Path) -> None:
    """A key about to cross plain http:// to another host: one ``Warning:`` line, not
    Python's warning format, and once, though the options' check makes a client too."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n", "utf-8")
    result = await run(
        "generate",
        str(prompts),
        "--api-key",
        "sk-plain-http",
        "--base-url",
        "http://192.0.2.1:9/v1",  # TEST-NET-1: never answers
        "--deadline",
        "0.2",
        "-o",
        str(tmp_path / "out.jsonl"),
        env={"NO_PROXY": "*", "no_proxy": "*"},
    )
    warned = [line for line in result.stderr.splitlines() if "clear text" in line]
    assert warned == [
        "Warning: FluxClient sends credentials to 192.0.2.1 over plain http://: the API key "
        "would cross the network in clear text. Use an https:// base_url (plain http is "
        "fine for a server on this machine: localhost, 127.0.0.1, ::1)."
    ]
    assert "UserWarning" not in result.stderr
    assert "sk-plain-http" not in result.output


async def test_demo_absorbs_429s_and_loses_nothing(tmp_path: Path) -> None:
    """demo (shortened with the hidden --count): a batch directory with every image saved,
    none lost, the bar shown, the gallery's path last; a second demo replaces the first."""
    out = tmp_path / "demo"
    result = await run("demo", "--count", "40", "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = read_jsonl(out / "manifest.jsonl")
    # Every prompt's URLs are recorded ("generated") before its image is fetched.
    first = {r["index"]: r["status"] for r in reversed(lines)}
    assert first == dict.fromkeys(range(40), "generated")
    records = [r for r in lines if r["status"] != "generated"]
    assert sorted(r["index"] for r in records) == list(range(40))
    assert all(r["status"] == "ok" and r["files"] for r in records)
    assert all((out / f).is_file() for r in records for f in r["files"])
    assert {r["prompt"] for r in records} == set(sample_prompts()[:40])
    assert "40 of 40 prompts ok" in result.output
    assert "0 prompts lost" in result.output
    assert "40/40" in result.output  # the progress bar's last state
    assert f"Open the gallery: {out / 'gallery.html'}" in result.output
    again = await run("demo", "--count", "5", "--out", str(out), "--no-progress")
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in read_jsonl(out / "manifest.jsonl")].count("ok") == 5
    assert len(list((out / "images").iterdir())) == 5


async def test_demo_removes_only_its_own_files_and_never_a_running_ones(
    tmp_path: Path,
) -> None:
    """A second demo into the same --out keeps a file the demo did not write, and one
    started while another run holds the directory exits 2 having removed nothing."""
    out = tmp_path / "demo"
    first = await run("demo", "--count", "3", "--out", str(out), "--no-progress")
    assert first.exit_code == 0, first.output
    mine = out / "images" / "mine.png"
    mine.write_bytes(b"not the demo's")
    before = sorted(p.name for p in (out / "images").iterdir())
    lock = BatchDirectory(root=out).claim()  # as a running batch holds it
    try:
        refused = await run("demo", "--count", "3", "--out", str(out), "--no-progress")
    finally:
        assert lock is not None
        lock.close()
    assert refused.exit_code == 2, refused.output
    assert "being written by another flux-async batch" in refused.output
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert (out / "manifest.jsonl").is_file()
    assert (out / "batch.json").is_file()
    again = await run("demo", "--count", "3", "--out", str(out), "--no-progress")
    assert again.exit_code == 0, again.output
    assert mine.read_bytes() == b"not the demo's"
    assert sorted(p.name for p in (out / "images").iterdir()) == before


async def test_sample_prompts_are_300_distinct() -> None:
    """The demo's built-in prompts: 300, all different."""
    prompts = sample_prompts()
    assert len(prompts) == len(set(prompts)) == 300


async def test_emulator_command_forwards_to_the_emulator_cli() -> None:
    """`flux-async emulator --help` shows the emulator's own options."""
    result = await run("emulator", "--help")
    assert result.exit_code == 0
    assert "--rate-limit" in result.output
    assert "--latency" in result.output


async def test_python_m_flux_async_help() -> None:
    """`python -m flux_async --help` lists the commands."""
    proc = await python("-m", "flux_async", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("generate", "demo", "emulator"):
        assert command in proc.stdout


async def test_python_m_flux_async_reads_a_pipe() -> None:
    """Prompts piped into a real process (read by the pipe reader thread) all come back."""
    prompts = "".join(f"prompt {i}\n" for i in range(25))
    proc = await python("-m", "flux_async", "generate", "--emulator", input=prompts)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["index"] for r in records) == list(range(25))
    assert all(r["ok"] for r in records)


async def test_python_m_without_the_cli_extra_says_what_to_install() -> None:
    """Without click, `python -m flux_async` prints the pip command and exits 2."""
    code = (
        "import runpy, sys; sys.modules['click'] = None; "
        "runpy.run_module('flux_async', run_name='__main__')"
    )
    proc = await python("-c", code, "--help")
    assert proc.returncode == 2
    assert "pip install 'flux-async[cli]'" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_the_library_does_not_import_the_cli() -> None:
    """`import flux_async` loads neither the CLI module nor click nor tqdm."""
    code = (
        "import sys, flux_async, flux_async.emulator; "
        "print(sorted({'click', 'tqdm', 'flux_async._cli'} & set(sys.modules)))"
    )
    proc = await python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


async def test_a_server_that_sends_fewer_images_than_asked_is_said_so(tmp_path: Path) -> None:
    """-n 3 and a server that answers with 1 image for every other prompt: those prompts
    are ok (their image is paid and saved) with ``missing`` in their record, the summary
    counts them, and the gallery shows every image saved, each from a file that exists."""
    import base64

    from aiohttp import web

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    served = 0

    async def generate(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        body = await request.json()
        count = body["n"] if served % 2 else 1
        data = [{"b64_json": png} for _ in range(count)]
        return web.json_response({"created": 1, "data": data}, headers={"x-request-id": "r1"})

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a fox number {i}\n" for i in range(6)))
    out = tmp_path / "run"
    async with serving(app) as root:
        result = await run(
            "batch", str(prompts), "--out", str(out), "--base-url", f"{root}/v1",
            "--api-key", KEY, "-n", "3", "--response-format", "b64_json",
            "--concurrency", "1", "--no-progress",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_jsonl(out / "manifest.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 6
    assert sorted(r.get("missing", 0) for r in records) == [0, 0, 0, 2, 2, 2]
    assert all(r["request_id"] == "r1" for r in records)
    assert "3 came back with fewer images than asked" in result.output
    page = (out / "gallery.html").read_text("utf-8")
    shown = set(_image_refs(page))
    saved = {name for r in records for name in r["files"]}
    assert len(saved) == 3 * 3 + 3 * 1
    assert shown == saved
    assert all((out / name).is_file() for name in shown)


def _image_refs(page: str) -> list[str]:
    import re

    return re.findall(r'<img src="([^"]+)"', page)
