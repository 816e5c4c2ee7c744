"""A fan-out's results: what each prompt ends as (`GenerationResult`), the progress
snapshot (`FanoutStatistics`), and how results reach the caller (`Delivery`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import attrs

from ._models import ImageRequest, ImagesResponse

__all__ = ["END", "Delivery", "FanoutStatistics", "GenerationResult"]


@attrs.frozen(kw_only=True)
class GenerationResult:
    """The outcome of one prompt of a fan-out: a ``response`` or the ``error`` that ended it.

    ``index`` is the prompt's position in the input, ``attempts`` the HTTP attempts it
    took (all chunks together for ``n`` > 10), ``elapsed`` seconds from start to finish.
    ``files`` are the paths its images were saved to, in the order of
    ``response.data``, when the fan-out had ``save_to=`` (else empty); once saved, an
    image's ``b64_json`` is dropped from ``response`` (its bytes are in the file, and a
    gathered batch would otherwise hold every image in memory). A generation that
    succeeded but whose images could not be saved has both: its ``response``, whole
    (nothing the server returned is lost), and an `ImageSaveError` as its ``error``.

    Example::

        for result in await client.gather_generate(prompts, save_to="out"):
            if result.ok:
                print(result.index, result.files)
            else:
                print(result.index, "failed:", result.error)
    """

    index: int
    prompt: str | None
    request: ImageRequest | None
    response: ImagesResponse | None = None
    error: BaseException | None = None
    attempts: int = 0
    elapsed: float = 0.0
    files: tuple[Path, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the prompt produced images.

        Example::

            failed = [r for r in results if not r.ok]
        """
        return self.error is None

    def unwrap(self) -> ImagesResponse:
        """The response, or raise the error that ended this prompt.

        Example::

            urls = results[0].unwrap().urls
        """
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


@attrs.frozen(kw_only=True)
class FanoutStatistics:
    """A snapshot of a running fan-out, for progress bars and logs.

    ``submitted`` prompts taken from the input, ``in_flight`` HTTP attempts on the wire,
    ``done`` prompts finished (``succeeded`` + ``failed``), ``retries`` extra attempts,
    ``rate_limited`` 429 answers seen, ``rate`` the limiter's current pacing rate
    (requests/s, ``None`` when unpaced), ``elapsed`` seconds since the fan-out started.

    Example::

        def show(stats: FanoutStatistics) -> None:
            print(f"{stats.done}/{stats.submitted} done, {stats.rate_limited} x 429")

        await client.gather_generate(prompts, on_progress=show)
    """

    submitted: int
    in_flight: int
    done: int
    succeeded: int
    failed: int
    retries: int
    rate_limited: int
    rate: float | None
    elapsed: float


#: What a worker puts into the queue as it ends.
END = object()


class Delivery:
    """How a fan-out's results reach the caller: through a bounded queue, the
    back-pressure on a slow consumer (`next`), or, for a drain, handed to a ``sink`` in
    the worker, with no queue and no hand-over between tasks.

    Each worker puts `END` into the queue as it ends: the results are over once every
    worker started has ended and the queue is empty.

    Example::

        delivery = Delivery()
        delivery.open(maxsize=64)
        result = await delivery.next()  # None: every worker has ended
    """

    __slots__ = ("input_error", "queue", "running", "sink")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[GenerationResult | object] | None = None
        self.sink: Callable[[GenerationResult], None] | None = None
        #: Workers started and not yet seen to end (queue mode).
        self.running = 0
        #: The caller's input failed: raised from `next` once its worker has ended.
        self.input_error: Exception | None = None

    def open(self, maxsize: int) -> None:
        """Make the queue (in the running loop), unless results go to a sink."""
        if self.sink is None:
            self.queue = asyncio.Queue(maxsize=maxsize)

    def worker_started(self) -> None:
        """Count a worker, whose `END` the queue will carry."""
        self.running += 1

    async def next(self) -> GenerationResult | None:
        """The next result from the queue, or None once every worker has ended; raises
        the caller's input error once the worker that met it has ended."""
        queue = self.queue
        assert queue is not None
        while True:
            if self.running == 0 and queue.empty():
                return None
            item = await queue.get()
            if item is END:
                self.running -= 1
                error = self.input_error
                if error is not None:
                    self.input_error = None
                    raise error
                continue
            assert isinstance(item, GenerationResult)
            return item

    def close(self) -> None:
        """Forget the queue and the sink: the workers are gone."""
        self.running = 0
        self.queue = None
        # The engine lives in reference cycles (its parts call back into it), so it goes
        # only at the collector's next pass over its generation: a sink kept here would
        # keep a gather's results, payloads included, alive that long after the caller
        # dropped them.
        self.sink = None
