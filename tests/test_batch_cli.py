"""``flux-async batch`` end to end: the CLI and the emulator each in a process of its own.

What is checked is what a user of a long, paid batch relies on: nothing lost under faults,
URLs that expire, a rate limit; ``kill -9`` at any moment and a rerun that finishes the job
without generating again more than what was in flight; a wrong key that stops the batch
at once with the reason on stderr; a bad input line refused before anything is sent.
Counts come from the emulator's own ``/_emulator/stats``, not from the client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

KEY = "sk-batch-test-0123456789"
CONCURRENCY = 8


class EmulatorProcess:
    """``python -m flux_async.emulator`` on a free port; its stats over HTTP."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flux_async.emulator", "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), line
        self.base_url = line.split()[1]
        self.root = self.base_url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/_emulator/stats", timeout=10) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.root}/_emulator/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _env() -> dict[str, str]:
    # No FLUX_* from the developer's shell may leak into a test.
    return {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    """A plain emulator requiring KEY, with a model-like latency."""
    emu = EmulatorProcess("--api-key", KEY, "--latency", "0.05")
    try:
        yield emu
    finally:
        emu.close()


def batch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flux_async", "batch", *args]


def batch(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batch_command(*args), input=input, capture_output=True, text=True, env=_env(), timeout=120
    )


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(f"prompt {i}, a lighthouse at dusk\n" for i in range(count)))
    return path


def manifest(directory: Path) -> list[dict[str, Any]]:
    """Every complete record (a torn last line, from a kill, is skipped as the CLI does)."""
    records = []
    for line in (directory / "manifest.jsonl").read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def effective(directory: Path) -> dict[int, dict[str, Any]]:
    return {r["index"]: r for r in manifest(directory)}


def assert_all_saved(directory: Path, count: int) -> None:
    """Every prompt ok exactly once in the effective manifest, every file a whole PNG."""
    records = effective(directory)
    assert sorted(records) == list(range(count))
    assert [i for i, r in records.items() if r["status"] != "ok"] == []
    for record in records.values():
        for name in record["files"]:
            data = (directory / name).read_bytes()
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
            assert data.endswith(b"\x00\x00\x00\x00IEND\xaeB`\x82"), name
    assert list(directory.rglob("*.part")) == []


class _Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)


def gallery_refs(directory: Path) -> list[str]:
    parser = _Sources()
    parser.feed((directory / "gallery.html").read_text("utf-8"))
    return parser.refs


def test_500_prompts_under_faults_a_rate_limit_and_expiring_urls_lose_nothing(
    tmp_path: Path,
) -> None:
    """5 % 5xx, 2 % dropped connections, a strict 150/s capacity (burst 1, so every run
    draws 429s: with a burst of 10 some drew none) and image URLs that expire 2 s
    after their generation: every prompt ends ok with its image on disk, and the gallery
    shows each one from a file that exists, with nothing fetched from elsewhere."""
    emu = EmulatorProcess(
        "--error-rate", "0.05", "--drop-rate", "0.02", "--rate-limit", "150", "--burst", "1",
        "--url-ttl", "2", "--seed", "7",
    )  # fmt: skip
    try:
        prompts = write_prompts(tmp_path / "prompts.txt", 500)
        out = tmp_path / "run"
        done = batch(
            str(prompts), "--out", str(out), "--base-url", emu.base_url,
            "--concurrency", "16", "--max-attempts", "8", "--no-progress",
        )  # fmt: skip
        stats = emu.stats()
    finally:
        emu.close()
    assert done.returncode == 0, done.stderr
    assert_all_saved(out, 500)
    assert stats["faults"] > 0  # the weather really happened
    assert stats["rate_limited"] > 0
    assert stats["successes"] == 500  # nothing generated twice
    assert "500 of 500 prompts ok" in done.stderr
    refs = gallery_refs(out)
    assert len([r for r in refs if r.startswith("images/")]) == 2 * 500  # <a> and <img>
    assert all((out / ref).is_file() for ref in refs)
    assert "http" not in (out / "gallery.html").read_text("utf-8")  # no external asset


@pytest.mark.parametrize("moment", [1, 60, 140])
def test_sigkill_at_any_moment_then_a_rerun_finishes_the_batch(
    tmp_path: Path, emulator: EmulatorProcess, moment: int
) -> None:
    """kill -9 once ``moment`` prompts are recorded; the rerun ends with all 200 ok once,
    on disk, and the server generated at most prompts + concurrency images in all."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 200)
    out = tmp_path / "run"
    args = (str(prompts), "--out", str(out), "--base-url", emulator.base_url, "--api-key", KEY)
    args += ("--concurrency", str(CONCURRENCY), "--no-progress")
    proc = subprocess.Popen(
        batch_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    deadline = time.monotonic() + 30
    path = out / "manifest.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= moment:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the batch ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = sum(r["status"] == "ok" for r in effective(out).values())
    assert killed_at < 200
    rerun = batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert_all_saved(out, 200)
    generated = emulator.stats()["successes"]
    assert 200 <= generated <= 200 + CONCURRENCY, (killed_at, generated)
    # The rerun skipped what was recorded before the kill.
    assert f"{killed_at} from earlier runs" in rerun.stderr


def test_sigterm_ends_a_run_like_ctrl_c_and_a_rerun_finishes_it(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    """SIGTERM (kill, a service manager's stop) mid-run: exit 130 with the summary and
    the gallery written; the rerun finishes every prompt once."""
    prompts = write_prompts(tmp_path / "prompts.txt", 200)
    out = tmp_path / "run"
    args = (str(prompts), "--out", str(out), "--base-url", emulator.base_url, "--api-key", KEY)
    args += ("--concurrency", str(CONCURRENCY), "--no-progress")
    proc = subprocess.Popen(
        batch_command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 30
    path = out / "manifest.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the batch ended before the signal"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Interrupted:" in stderr
    assert "rerun the same command to resume" in stderr
    assert (out / "gallery.html").is_file()
    assert all((out / ref).is_file() for ref in gallery_refs(out))
    rerun = batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert_all_saved(out, 200)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read()  # type: ignore[no-any-return]


def test_a_rerun_fetches_what_a_killed_run_generated_instead_of_paying_again(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    """What a kill between generations and their saves leaves: the URLs recorded (the
    ``generated`` record; or a ``failed`` one, the download having failed), no file. The
    rerun fetches the URLs that still work, with no new generation for those prompts, and
    generates again only the prompt whose URL has expired."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 8)
    out = tmp_path / "run"
    args = (str(prompts), "--out", str(out), "--base-url", emulator.base_url, "--api-key", KEY)
    first = batch(*args, "--no-progress")
    assert first.returncode == 0, first.stderr
    records = effective(out)
    valid = int(time.time() * 1000) + 3_600_000
    urls = {  # signed-bucket URLs of the emulator: ?expires=<unix ms>
        1: f"{emulator.base_url}/images/64x64/a1.png?expires={valid}",
        4: f"{emulator.base_url}/images/96x64/a4.png?expires={valid}",
        6: f"{emulator.base_url}/images/64x96/a6.png?expires=1",  # long expired
    }
    lines = [json.dumps(r) for i, r in sorted(records.items()) if i not in urls]
    for index, url in urls.items():
        for name in records[index]["files"]:
            (out / name).unlink()
        record = {**records[index], "status": "generated", "files": [], "urls": [url]}
        if index == 4:
            record.update(status="failed", error={"type": "ImageDownloadError", "message": "x"})
        lines.append(json.dumps(record))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    emulator.reset()
    rerun = batch(*args, "--no-progress", "-v")
    assert rerun.returncode == 0, rerun.stderr
    assert_all_saved(out, 8)
    stats = emulator.stats()
    assert stats["requests"] == stats["successes"] == 1  # prompt 6 alone
    final = effective(out)
    for index in (1, 4):
        assert final[index]["resumed"] is True
        assert final[index]["run"] == 2
        [name] = final[index]["files"]
        assert (out / name).read_bytes() == fetch(urls[index])  # the recorded image
    assert "resumed" not in final[6]
    assert final[6]["run"] == 2
    assert "prompt #6: the image URLs recorded by run 1 could not be fetched" in rerun.stderr
    assert "(3 this run, 2 of them from the URLs an earlier run recorded, 5 from earlier runs)" in (
        rerun.stderr
    )


@pytest.mark.parametrize(
    ("key", "path", "hint"),
    [
        # The library's hints, in the CLI's terms (its options, not FluxClient's).
        ("sk-wrong-key", "/v1", "The API key was refused: check --api-key / $FLUX_API_KEY"),
        (None, "/v1", "No API key was sent: pass --api-key or set $FLUX_API_KEY"),
        (KEY, "", "Check --base-url: calls go to"),
    ],
)
def test_a_wrong_key_or_base_url_stops_the_batch_at_once(
    tmp_path: Path, emulator: EmulatorProcess, key: str | None, path: str, hint: str
) -> None:
    """500 prompts: at most concurrency + 2 requests reach the server, and stderr says
    why in one line carrying the library's hint; the manifest marks the rest not sent."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 500)
    out = tmp_path / "run"
    args = ["--out", str(out), "--base-url", emulator.root + path, "--concurrency", "8"]
    done = batch(str(prompts), *args, *(["--api-key", key] if key else []), "--no-progress")
    assert done.returncode == 1, done.stderr
    assert emulator.stats()["requests"] <= CONCURRENCY + 2
    [line] = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: the batch stopped on an answer every prompt would get")
    assert hint in line
    assert re.search(r"\b(49[0-9]|500) prompts were not sent", line), line
    if key:
        assert key not in done.stderr
    records = effective(out)
    assert len(records) == 500
    assert sum(bool(r["error"].get("not_sent")) for r in records.values()) >= 490


@pytest.mark.parametrize("stop_on", [None, "401", "none"])
def test_stop_on_chooses_which_answers_stop_the_batch(
    tmp_path: Path, emulator: EmulatorProcess, stop_on: str | None
) -> None:
    """A wrong key on 60 prompts: by default (or --stop-on 401) the batch stops after at
    most concurrency + 2 requests; with --stop-on none every prompt is sent and fails."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 60)
    out = tmp_path / "run"
    args = [str(prompts), "--out", str(out), "--base-url", emulator.base_url]
    args += ["--api-key", "sk-wrong-key", "--concurrency", str(CONCURRENCY), "--no-progress"]
    done = batch(*args, *(["--stop-on", stop_on] if stop_on else []))
    assert done.returncode == 1, done.stderr
    stats = emulator.stats()
    records = effective(out)
    assert len(records) == 60
    assert all(r["status"] == "failed" for r in records.values())
    not_sent = [i for i, r in records.items() if r["error"].get("not_sent")]
    if stop_on == "none":
        assert stats["requests"] == stats["unauthorized"] == 60
        assert not_sent == []
        assert {r["error"]["status_code"] for r in records.values()} == {401}
        assert "the batch stopped" not in done.stderr
    else:
        assert stats["requests"] <= CONCURRENCY + 2
        assert len(not_sent) >= 60 - CONCURRENCY - 2
        assert "Error: the batch stopped on an answer every prompt would get" in done.stderr


@pytest.mark.parametrize("value", ["40x", "401,", "200", "401,600", "", "all"])
def test_a_bad_stop_on_fails_in_one_line_before_any_request(
    tmp_path: Path, emulator: EmulatorProcess, value: str
) -> None:
    """--stop-on that is not statuses 400-599 or none: exit 2, one line naming the option,
    the value and what is allowed; nothing sent, no directory made."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 5)
    out = tmp_path / "run"
    args = ["--out", str(out), "--base-url", emulator.base_url, "--api-key", KEY]
    done = batch(str(prompts), *args, "--stop-on", value)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"Error: --stop-on {value!r} is not allowed: comma-separated HTTP error statuses "
        "from 400 to 599, such as 401,403,404 (the default), or none never to stop"
    ]
    assert emulator.stats()["requests"] == 0
    assert not out.exists()


def test_a_malformed_line_40_fails_before_any_request(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    """Line 40 is not JSON: one line naming file:40, exit 2, nothing sent, no directory."""
    emulator.reset()
    lines = [json.dumps({"prompt": f"prompt {i}"}) for i in range(1, 60)]
    lines[39] = '{"prompt": "prompt 40"'
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    done = batch(str(prompts), "--out", str(out), "--base-url", emulator.base_url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"Error: {prompts}:40: the line is not JSON "
        "(Expecting ',' delimiter: line 1 column 23 (char 22))"
    ]
    assert emulator.stats()["requests"] == 0
    assert not out.exists()
    # A field the API refuses is caught the same way, with what is allowed.
    lines[39] = json.dumps({"prompt": "prompt 40", "n": 0})
    prompts.write_text("\n".join(lines) + "\n")
    done = batch(str(prompts), "--out", str(out), "--base-url", emulator.base_url)
    assert done.returncode == 2
    assert f'{prompts}:40: "n": 0 is not allowed: an integer from 1 to 1000' in done.stderr
    assert emulator.stats()["requests"] == 0
    # In the line's own JSON terms: a missing key, true, null.
    for bad, says in (
        ({"n": 2}, '"prompt" is missing: a string of 1 to 1000 characters'),
        ({"prompt": "x", "n": True}, '"n": true is not allowed'),
        ({"prompt": "x", "size": "12"}, '"size": "12" is not allowed: WIDTHxHEIGHT'),
    ):
        lines[39] = json.dumps(bad)
        prompts.write_text("\n".join(lines) + "\n")
        done = batch(str(prompts), "--out", str(out), "--base-url", emulator.base_url)
        assert done.returncode == 2
        assert f"{prompts}:40: {says}" in done.stderr
        assert "None" not in done.stderr
        assert "True" not in done.stderr
    assert emulator.stats()["requests"] == 0


def test_another_input_is_refused_and_retry_failed_reruns_only_failures(
    tmp_path: Path,
) -> None:
    """A directory made from another input is refused in one line; --retry-failed sends
    exactly the prompts the manifest records as failed."""
    emu = EmulatorProcess("--error-rate", "0.3", "--seed", "3")
    try:
        prompts = write_prompts(tmp_path / "prompts.txt", 40)
        out = tmp_path / "run"
        args = (str(prompts), "--out", str(out), "--base-url", emu.base_url, "--no-progress")
        first = batch(*args, "--max-attempts", "1")
        assert first.returncode == 1
        failed = [i for i, r in effective(out).items() if r["status"] == "failed"]
        assert failed
        emu.reset()
        again = batch(*args, "--max-attempts", "1", "--retry-failed")
        assert emu.stats()["requests"] == len(failed)
        assert {r["index"] for r in manifest(out) if r["run"] == 2} == set(failed)
        while again.returncode == 1:
            again = batch(*args, "--max-attempts", "1", "--retry-failed")
        assert again.returncode == 0
        assert_all_saved(out, 40)
        other = write_prompts(tmp_path / "other.txt", 41)
        refused = batch(str(other), "--out", str(out), "--base-url", emu.base_url)
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"Error: {out} was made from another input")
        assert len(refused.stderr.strip().splitlines()) == 1
        # The same input with another option: the refusal names the option.
        emu.reset()
        changed = batch(*args, "--aspect-ratio", "16:9", "--user", "u-1")
        assert changed.returncode == 2
        [line] = changed.stderr.strip().splitlines()
        assert "the options differ from the run that made it" in line
        assert "--aspect-ratio not given then, '16:9' now" in line
        assert "--user not given then, 'u-1' now" in line
        assert emu.stats()["requests"] == 0
    finally:
        emu.close()


def test_stdin_is_validated_as_it_is_read(tmp_path: Path, emulator: EmulatorProcess) -> None:
    """From a pipe: the prompts before a bad line finish and are saved; exit 2 names it."""
    emulator.reset()
    out = tmp_path / "run"
    text = '{"prompt": "a fox"}\n{"prompt": "a crow"}\n{"prompt": \n{"prompt": "late"}\n'
    done = batch(
        "-", "--jsonl", "--out", str(out), "--base-url", emulator.base_url, "--api-key", KEY,
        input=text,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Error: <stdin>:3: the line is not JSON" in done.stderr
    assert sorted(effective(out)) == [0, 1]
    assert_all_saved(out, 2)
    assert emulator.stats()["successes"] == 2
    # Empty stdin is refused like an empty file (exit 2), not "0 of 0 prompts ok".
    empty = batch("-", "--out", str(tmp_path / "empty"), "--base-url", emulator.base_url,
                  input="\n# nothing\n")  # fmt: skip
    assert empty.returncode == 2, empty.stderr
    assert "Error: <stdin> held no prompt (only blank or # lines)" in empty.stderr
    assert emulator.stats()["successes"] == 2


def test_an_image_host_that_fails_every_download_stops_the_batch(tmp_path: Path) -> None:
    """Image URLs that are expired before they can be fetched: the batch stops once 8
    prompts in a row could not be fetched (a few more were generated meanwhile), with
    one line on stderr saying what to check; each failed record keeps its URL."""
    emu = EmulatorProcess("--url-ttl", "0.001")
    try:
        prompts = write_prompts(tmp_path / "prompts.txt", 200)
        out = tmp_path / "run"
        done = batch(
            str(prompts), "--out", str(out), "--base-url", emu.base_url,
            "--concurrency", "4", "--no-progress",
        )  # fmt: skip
        stats = emu.stats()
    finally:
        emu.close()
    assert done.returncode == 1, done.stderr
    assert stats["successes"] <= 8 + 4 + 2  # DOWNLOAD_FAILURES_TO_STOP + concurrency
    [line] = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: the batch stopped as no prompt's images could be saved")
    assert "could not be fetched" in line
    assert "rerun the same command" in line
    assert "Traceback" not in done.stderr
    records = effective(out)
    assert len(records) == 200
    unsent = [r for r in records.values() if r["error"] and r["error"].get("not_sent")]
    assert len(unsent) >= 200 - stats["successes"]
    fetched = [r for r in records.values() if r not in unsent]
    assert fetched
    assert all(r["status"] == "failed" and r.get("urls") for r in fetched)


def batch_with_file_limit(
    limit: int, prompts: Path, out: Path, emulator: EmulatorProcess, *, concurrency: int
) -> subprocess.CompletedProcess[str]:
    """The batch in a process no file of which may grow past ``limit`` bytes (writes
    beyond it fail with EFBIG, as on a full disk with ENOSPC: Python ignores SIGXFSZ)."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        batch_command(
            str(prompts), "--out", str(out), "--base-url", emulator.base_url,
            "--api-key", KEY, "--concurrency", str(concurrency), "--no-progress",
        ),
        capture_output=True, text=True, env=_env(), timeout=120, preexec_fn=small_files,
    )  # fmt: skip


def test_a_manifest_that_cannot_be_written_stops_the_batch(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    """The manifest stops growing (a file size limit: EFBIG, as a full disk gives
    ENOSPC): the run takes no more prompts, says so in one line and how many records
    were lost, and exits 1 without a traceback."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 2000)
    out = tmp_path / "run"
    # ~100 records; each image (~8.7 KB) stays below it.
    done = batch_with_file_limit(48 * 1024, prompts, out, emulator, concurrency=8)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "manifest.jsonl failed" in line]
    assert "File too large" in line
    assert "No more prompts were sent" in line
    written = len(manifest(out))
    assert 0 < written < 2000
    generated = emulator.stats()["successes"]
    # Stopped soon after the first failed write: what was in progress then, and no more.
    assert generated <= written + 8 + 8, (generated, written)


@pytest.mark.parametrize("where", ["under-a-file", "file"])
def test_an_out_that_cannot_be_made_fails_in_one_line(
    tmp_path: Path, emulator: EmulatorProcess, where: str
) -> None:
    """--out under a file (or a file itself): one line, exit 2, nothing sent."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 3)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub" if where == "under-a-file" else blocker
    done = batch(str(prompts), "--out", str(out), "--base-url", emulator.base_url, "--api-key", KEY)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert str(out) in done.stderr
    assert emulator.stats()["requests"] == 0


def test_images_that_cannot_be_written_stop_the_batch(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    """Every image write fails for a reason every image shares (a file size limit below
    an image's size: EFBIG, as a full disk gives ENOSPC): the batch stops on the first,
    so at most concurrency generations are paid for, and says what to do in one line."""
    emulator.reset()
    prompts = write_prompts(tmp_path / "prompts.txt", 200)
    out = tmp_path / "run"
    # The emulator's images are ~8.7 KB; the state file fits.
    done = batch_with_file_limit(4096, prompts, out, emulator, concurrency=4)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert emulator.stats()["successes"] <= 4 + 2
    [line] = [line for line in done.stderr.splitlines() if "the batch stopped" in line]
    assert line.startswith("Error: the batch stopped as no prompt's images could be saved")
    assert "File too large" in line
    assert "ulimit -f" in line
    assert list((out / "images").glob("*.png")) == []
