"""Install the built wheel into a fresh venv and check that it works there.

Usage: ``python3 .ci/wheel_smoke.py DIST_DIR`` (run by ``.ci/run`` after ``python -m build``).

The venv gets the wheel with its ``cli`` extra and nothing from this checkout; the checks
run with ``python -I`` from an empty directory, so the repository is not on ``sys.path``
and every import comes from the installed wheel: the package and its ``py.typed``, the
emulator, one call through `FluxClient` and one through `SyncFluxClient`, an input image
reaching the emulator, the pytest plugin's entry point, and ``flux-async --version``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import venv
from pathlib import Path


def inside() -> None:
    """The checks, run by the venv's interpreter."""
    import asyncio
    import threading
    from importlib.metadata import entry_points, version

    import flux_async
    from flux_async import FluxClient, SyncFluxClient
    from flux_async.emulator import Emulator

    where = Path(flux_async.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"imported from {where}, not the venv"
    assert (where.parent / "py.typed").is_file(), "py.typed is missing from the wheel"
    assert version("flux-async") == flux_async.__version__
    plugins = {e.name: e.value for e in entry_points(group="pytest11")}
    assert plugins.get("flux_async") == "flux_async.pytest_plugin", plugins

    async def one_call() -> None:
        async with Emulator() as emu, FluxClient(base_url=emu.base_url) as client:
            response = await client.generate("a fox", input_images=["https://h/fox.png"])
            assert emu.requests[0].body is not None
            assert emu.requests[0].body["prompt"] == "a fox https://h/fox.png"
            assert response.data[0].revised_prompt == "a fox"

    asyncio.run(one_call())

    # The sync facade, against an emulator served from another thread, as a script would
    # reach a server in another process.
    ready, done, urls = threading.Event(), threading.Event(), []

    async def serve() -> None:
        async with Emulator() as emu:
            urls.append(emu.base_url)
            ready.set()
            await asyncio.to_thread(done.wait)

    server = threading.Thread(target=asyncio.run, args=(serve(),))
    server.start()
    try:
        assert ready.wait(30), "the emulator did not start"
        with SyncFluxClient(base_url=urls[0]) as client:
            assert client.generate("a crow").urls
    finally:
        done.set()
        server.join()
    print(f"smoke: flux-async {flux_async.__version__} works from {where.parent}")


def main(dist: Path) -> int:
    [wheel] = sorted(dist.glob("flux_async-*.whl"))
    with tempfile.TemporaryDirectory(prefix="flux-wheel-smoke-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
        python = bin_dir / "python"
        quiet = ["--quiet", "--disable-pip-version-check"]
        subprocess.run(
            [python, "-m", "pip", "install", *quiet, f"{wheel.resolve()}[cli]"], check=True
        )
        empty = Path(tmp) / "cwd"
        empty.mkdir()
        # -I: neither this script's directory nor the working directory is on sys.path.
        subprocess.run([python, "-I", Path(__file__).resolve(), "--inside"], cwd=empty, check=True)
        shown = subprocess.run(
            [bin_dir / "flux-async", "--version"],
            cwd=empty,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        wanted = wheel.name.split("-")[1]
        assert wanted in shown, f"flux-async --version said {shown!r}, not {wanted}"
        print(f"smoke: {shown.strip()}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:
        inside()
    else:
        sys.exit(main(Path(sys.argv[1])))
