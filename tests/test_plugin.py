"""The pytest plugin users get with flux-async: its fixtures, markers and the testing
guide's example, each run in a pytest of its own (``pytester``)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

GUIDE = Path(__file__).parent.parent / "docs" / "guides" / "testing.md"
SETTINGS = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner pytests are plain runs even when this suite runs under pytest-xdist.

    Its workers export ``PYTEST_XDIST_*``; an installed pytest-benchmark reads that in
    the inner run as "xdist is on" and warns, which ``filterwarnings = error`` fails.
    """
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


def _guide_files() -> dict[str, str]:
    """The files of the guide's plugin example: each code block starting ``# <name>``."""
    section = GUIDE.read_text("utf-8").split("## pytest fixtures for your app", 1)[1]
    section = section.split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", section, re.DOTALL):
        first, _, rest = block.partition("\n")
        files[first.removeprefix("# ").strip()] = rest
    return files


def test_the_entry_point_is_installed() -> None:
    """pip install registers the plugin as `flux_async` (so `-p no:flux_async` works)."""
    [plugin] = [e for e in entry_points(group="pytest11") if e.name == "flux_async"]
    assert plugin.value == "flux_async.pytest_plugin"


def test_importing_the_plugin_imports_no_async_plugin() -> None:
    """pytest-asyncio is imported by pytest_configure, and only when pytest loaded it."""
    code = (
        "import sys, flux_async.pytest_plugin; "
        "print(sorted(m for m in ('pytest_asyncio', 'anyio') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_guide_example_passes(pytester: pytest.Pytester) -> None:
    """The testing guide's app and tests pass as written, warnings as errors."""
    files = _guide_files()
    assert set(files) == {"thumbnails.py", "test_thumbnails.py", "pyproject.toml"}
    pytester.makepyfile(thumbnails=files["thumbnails.py"])
    pytester.makepyfile(test_thumbnails=files["test_thumbnails.py"])
    pytester.makefile(".toml", pyproject=files["pyproject.toml"] + 'filterwarnings = ["error"]\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_strict_mode_markers_and_the_factory(pytester: pytest.Pytester) -> None:
    """In pytest-asyncio's strict mode (its default) the fixtures still run; the markers'
    options reach the emulator and the client; the factory starts more emulators."""
    pytester.makeini(SETTINGS)
    pytester.makepyfile(
        """
        import pytest
        from flux_async import APIConnectionError, AuthenticationError
        from flux_async.testing import FLUX_TEST_KEY

        @pytest.mark.asyncio
        @pytest.mark.flux_emulator(api_keys=["sk-mine"], latency=0.01)
        @pytest.mark.flux_client(max_connections=7)
        async def test_markers(flux_client, flux_emulator):
            assert (await flux_client.generate("a fox", input_images=["https://h/c.png"])).urls
            assert flux_emulator.requests[0].body["prompt"] == "a fox https://h/c.png"
            assert flux_client.transport.max_connections == 7

        @pytest.mark.asyncio
        async def test_factory(flux_client, flux_emulator, flux_emulator_factory):
            other = await flux_emulator_factory(api_keys=["sk-other"])
            assert other.base_url != flux_emulator.base_url
            from flux_async import FluxClient
            async with FluxClient(base_url=other.base_url, api_key=FLUX_TEST_KEY) as c:
                with pytest.raises(AuthenticationError):
                    await c.generate("a fox")

        @pytest.mark.asyncio
        async def test_mock(flux_mock, flux_mock_client):
            flux_mock.script(APIConnectionError("reset"))
            response = await flux_mock_client.generate("a fox", n=3, response_format="b64_json")
            assert [len(i.decode()) > 0 for i in response.data] == [True] * 3
            assert flux_mock.prompts == ["a fox", "a fox"]
            assert flux_mock.requests[1].headers["Authorization"] == f"Bearer {FLUX_TEST_KEY}"

        @pytest.mark.asyncio
        @pytest.mark.flux_emulator(5)
        async def test_positional(flux_emulator):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.flux_emulator takes keyword options only*"])


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    """`-p no:flux_async` removes the fixtures (and nothing else)."""
    pytester.makeini(SETTINGS)
    pytester.makepyfile(
        """
        def test_uses(flux_mock):
            pass

        def test_plain():
            pass
        """
    )
    off = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:flux_async")
    off.assert_outcomes(passed=1, errors=1)
    off.stdout.fnmatch_lines(["*fixture 'flux_mock' not found*"])
