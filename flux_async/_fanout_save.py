"""``save_to=`` in a fan-out: the settings (`SaveTo`, from `save_settings`) and the step
after each successful generation (`Saver`), which saves its images before the worker
takes another prompt (``docs/design.md``, "The fan-out").
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import attrs

from ._exceptions import ImageSaveError, ValidationError
from ._models import ImageRequest, ImagesResponse
from ._save import Downloader, ImageJob, check_directory, check_stem
from ._writer_process import ProcessWriter

__all__ = ["SaveTo", "Saver", "default_stem", "not_saved", "save_settings"]


def default_stem(index: int, prompt: str) -> str:
    """The file name (without suffix) of prompt ``index``'s images under ``save_to``: the
    index, zero-padded to six digits, so a directory listing sorts in input order.

    Example::

        default_stem(42, "a red fox")  # '000042' -> 000042.png (000042-0.png ... for n > 1)
    """
    return f"{index:06d}"


@attrs.frozen(kw_only=True)
class SaveTo:
    """Where and how a fan-out saves each prompt's images (made by `save_settings`).

    ``stem(index, prompt)`` names a prompt's files inside ``directory``; ``downloads``
    bounds the URL downloads in progress at once (they use the pool's connections beyond
    the fan-out's ``concurrency``).

    Example::

        SaveTo(downloader=client.downloader, directory=Path("out"), stem=default_stem,
               downloads=32)
    """

    downloader: Downloader
    directory: Path
    stem: Callable[[int, str], str]
    downloads: int


def save_settings(
    save_to: object,
    save_stem: object,
    downloader: Downloader,
    *,
    concurrency: int,
    pool: int | None,
) -> SaveTo | None:
    """Check ``save_to`` and ``save_stem``; the `SaveTo` they ask for (None: no saving).

    Downloads get the pool's connections beyond ``concurrency`` (at least one, at most
    2 x ``concurrency``), so they never hold a connection a generation is waiting for.

    Example::

        save_settings("out", None, client.downloader, concurrency=16, pool=100)
    """
    if save_stem is not None and not callable(save_stem):
        raise ValidationError(
            "save_stem", save_stem, "a function (index, prompt) -> file name, or None"
        )
    if save_to is None:
        if save_stem is not None:
            raise ValidationError("save_stem", save_stem, "None unless save_to is given")
        return None
    directory = check_directory("save_to", save_to)
    downloads = max(1, min(2 * concurrency, pool - concurrency)) if pool else 2 * concurrency
    return SaveTo(
        downloader=downloader,
        directory=directory,
        stem=default_stem if save_stem is None else save_stem,
        downloads=downloads,
    )


class Saver:
    """Saves each successful prompt's images as its `SaveTo` says, with at most
    ``SaveTo.downloads`` URL downloads at once, writing the files from a process of its
    own (`ProcessWriter`; a thread where there can be none). `aclose` ends that process.
    ``on_saved`` is called each time a prompt's images are all saved.

    Example::

        saver = Saver(save, on_saved=lambda: None)
        try:
            files = await saver.store(index, request, response, attempts)
        finally:
            await saver.aclose()
    """

    __slots__ = (
        "_child",
        "_downloads",
        "_folder",
        "_max_bytes",
        "_on_saved",
        "_save",
        "_stem_always_valid",
        "_writer",
    )

    def __init__(self, save: SaveTo, on_saved: Callable[[], None]) -> None:
        self._on_saved = on_saved
        self._writer = ProcessWriter()
        self._save = attrs.evolve(save, downloader=save.downloader.with_writer(self._writer))
        self._downloads = asyncio.Semaphore(save.downloads)
        self._folder = os.fspath(save.directory)
        # The path of a file in the directory: pathlib's own shortcut for a name it need
        # not parse (~0.4 µs against ~3.4 µs for `directory / name` on Python 3.11, per
        # prompt), where this Python has it.
        self._child: Callable[[str], Path] = getattr(
            save.directory, "_make_child_relpath", save.directory.joinpath
        )
        self._max_bytes = save.downloader.max_bytes
        # The default stem makes a valid file name from any index: only a caller's is checked.
        self._stem_always_valid = save.stem is default_stem

    def start(self) -> None:
        """Start the writer process as the fan-out starts: it takes ~25 ms, mostly over
        before the first image comes back (a thread writes those that come sooner)."""
        self._writer.start()

    async def aclose(self) -> None:
        """Wait for the files handed over to be written, and end the writer process."""
        await self._writer.aclose()

    def abandon(self) -> None:
        """End the writer process now (the fan-out's handle was collected)."""
        self._writer.abandon()

    async def store(
        self, index: int, request: ImageRequest, response: ImagesResponse, attempts: int
    ) -> tuple[Path, ...]:
        """Save a successful prompt's images; an `ImageSaveError` that says the generation
        succeeded (and carries its response) when they cannot be."""
        # The worker saves before it takes another prompt, and no stand-in replaces it
        # meanwhile: prompts generated but not yet saved never outnumber `concurrency`,
        # which bounds what a crash can make a rerun pay for twice. (A stand-in would
        # keep the wire full while it downloads; with generations taking seconds and
        # downloads a fraction of that, the wire stays nearly full anyway.)
        save = self._save
        data = response.data
        try:
            stem = save.stem(index, request.prompt)
            if len(data) == 1 and data[0].b64_json is not None:
                # A batch's common case, in one frame: the general path below costs the
                # event loop ~6-10 us more a prompt (`bench_save.py --client-cpu`).
                name = stem if self._stem_always_valid else check_stem(stem)
                job = ImageJob(self._folder, name, data[0].b64_json, None, None, self._max_bytes)
                written = await self._writer.write(job)
                self._on_saved()
                return (self._child(os.path.basename(written)),)
            images = [(image.url, image.b64_json) for image in data]
            if any(b64 is None for _, b64 in images):
                async with self._downloads:
                    paths = await save.downloader.save_all(images, save.directory, stem)
            else:
                paths = await save.downloader.save_all(images, save.directory, stem)
        except (ImageSaveError, OSError) as exc:
            error = not_saved(exc, response, attempts, len(data))
            if error is exc:
                raise
            raise error from exc
        self._on_saved()
        return tuple(paths)


def not_saved(
    exc: BaseException, response: ImagesResponse, attempts: int, count: int
) -> ImageSaveError:
    """The error of a prompt whose generation succeeded but whose images were not saved
    (``exc``, an `ImageSaveError` or an ``OSError``): it says so, keeps the URL and
    carries the response (and an ``OSError`` as its ``__cause__``). A fan-out's and
    ``flux-async batch``'s alike.

    Example::

        raise not_saved(OSError(28, "No space left on device"), response, 1, 1)
    """
    images = "its image" if count == 1 else f"one of its {count} images"
    where = f" (request_id {response.request_id})" if response.request_id else ""
    if isinstance(exc, ImageSaveError):
        verb = "could not be fetched" if exc.url is not None else "could not be saved"
        message = f"The generation succeeded{where} but {images} {verb}: {exc.message}"
        exc.args = (message,)
        exc.message = message
        error = exc
    else:
        message = f"The generation succeeded{where} but writing {images} failed: {exc}"
        url = next((image.url for image in response.data if image.url), None)
        error = ImageSaveError(message, url=url, path=getattr(exc, "filename", None))
        error.__cause__ = exc  # the OSError says whether every prompt would fail alike
    # The message shows the URL without its query; the whole one stays in error.url.
    error.response = response
    error.request_id = response.request_id
    error.attempts = attempts
    return error
