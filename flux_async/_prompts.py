"""A fan-out's input: the items it accepts, how each becomes a request, and the `Feed`
that hands them to the workers one at a time.

The input is read lazily (a worker takes the next item when it is free), so a million
prompts from a file take O(concurrency) memory; `checked_requests` is the eager reading
`FluxClient.gather_generate` does instead, validating every item before anything is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

from ._exceptions import ValidationError
from ._models import ImageRequest

__all__ = [
    "BuildRequest",
    "Feed",
    "PromptInput",
    "checked_requests",
    "prompt_text",
    "request_maker",
    "to_request",
]

#: Builds a request from a prompt (or request) and fields: `FluxClient.build_request`.
BuildRequest: TypeAlias = Callable[[Any, Mapping[str, Any] | None], ImageRequest]

#: One item of a fan-out's input: a prompt, a full request, or a mapping of request
#: fields (``{"prompt": ..., "n": 2}``) applied over the call's fields.
PromptInput: TypeAlias = str | ImageRequest | Mapping[str, Any]

_END = object()


def prompt_text(item: object) -> str | None:
    """The prompt of an input item, when it has a readable one (for a failed result).

    Example::

        prompt_text({"prompt": "a fox", "n": 2})  # 'a fox'
    """
    if isinstance(item, str):
        return item
    if isinstance(item, ImageRequest):
        return item.prompt
    if isinstance(item, Mapping):
        value = item.get("prompt")
        return value if isinstance(value, str) else None
    return None


def to_request(build: BuildRequest, item: object, fields: Mapping[str, Any]) -> ImageRequest:
    """One input item as a validated request; ``fields`` are the batch's own fields.

    Example::

        to_request(client.build_request, {"prompt": "a fox", "n": 2}, {})
    """
    if isinstance(item, ImageRequest):
        return item
    if isinstance(item, str):
        return build(item, fields)
    if isinstance(item, Mapping):
        own = {k: v for k, v in item.items() if k != "prompt"}
        return build(item.get("prompt"), {**fields, **own})
    raise ValidationError(
        "prompt", item, "a string, an ImageRequest, or a mapping with a 'prompt' key"
    )


def request_maker(
    build: BuildRequest, fields: Mapping[str, Any]
) -> Callable[[object], ImageRequest]:
    """The function that turns each input item into its request, for a batch whose own
    fields (the model included) are ``fields``.

    Example::

        make = request_maker(client.build_request, {"model": client.model, "n": 2})
        make("a fox")  # ImageRequest(prompt='a fox', n=2, ...)
    """
    # The batch's fields are checked once, in this template: a string prompt, the hot
    # path of a big batch, only has its prompt checked.
    with_prompt = ImageRequest(prompt="x", **fields).with_prompt

    def make(item: object) -> ImageRequest:
        if isinstance(item, str):
            return with_prompt(item)
        return to_request(build, item, fields)

    return make


async def checked_requests(
    build: BuildRequest,
    prompts: Iterable[PromptInput] | AsyncIterable[PromptInput],
    fields: Mapping[str, Any],
) -> list[ImageRequest]:
    """Read every item of ``prompts`` and validate it into a request, before anything is
    sent; a bad one raises `ValidationError` naming its index.

    Example::

        requests = await checked_requests(client.build_request, ["a fox", "a crow"], {})
    """
    if isinstance(prompts, AsyncIterable):
        items: list[PromptInput] = [item async for item in prompts]
    elif isinstance(prompts, Iterable) and not isinstance(prompts, str | bytes | Mapping):
        items = list(prompts)
    else:
        raise ValidationError(
            "prompts", prompts, "an iterable of prompts (wrap a single prompt in a list)"
        )
    requests: list[ImageRequest] = []
    # Every string prompt shares the batch's fields: validate those once, then only
    # each prompt (the per-prompt cost of a million-prompt batch).
    template = build("x", fields)
    for index, item in enumerate(items):
        try:
            if isinstance(item, str):
                requests.append(template.with_prompt(item))
            else:
                requests.append(to_request(build, item, fields))
        except ValidationError as exc:
            exc.add_note(f"in prompt #{index} of {len(items)}; nothing was sent")
            raise
    return requests


class Feed:
    """Hands a fan-out's input items to its workers one at a time, numbered in input
    order; an async iterable is read by one worker at a time.

    Example::

        feed = Feed(["a fox", "a crow"])
        feed.start()
        await feed.take()  # (0, 'a fox')
    """

    __slots__ = ("_async_items", "_lock", "_sync_items", "exhausted", "taken")

    def __init__(self, items: Iterable[PromptInput] | AsyncIterable[PromptInput]) -> None:
        self._sync_items: Iterator[PromptInput] | None = None
        self._async_items: AsyncIterator[PromptInput] | None = None
        if isinstance(items, AsyncIterable):
            self._async_items = aiter(items)
        elif isinstance(items, Iterable) and not isinstance(items, str | bytes | Mapping):
            self._sync_items = iter(items)
        else:
            raise ValidationError(
                "prompts",
                items,
                "an iterable or async iterable of prompts (a lone string "
                "is one prompt: wrap it in a list)",
            )
        self._lock: asyncio.Lock | None = None
        #: True once the input has ended, failed, or the fan-out stopped taking from it.
        self.exhausted = False
        #: Items taken so far, which is also the index of the next one.
        self.taken = 0

    def start(self) -> None:
        """Make what reading needs in the running loop (the lock of an async input)."""
        if self._async_items is not None:
            self._lock = asyncio.Lock()

    async def take(self) -> tuple[int, object] | None:
        """The next item and its index, or None once the input is exhausted."""
        if self._sync_items is not None:
            item: object = next(self._sync_items, _END)
        else:
            assert self._lock is not None
            assert self._async_items is not None
            async with self._lock:
                if self.exhausted:
                    return None
                item = await anext(self._async_items, _END)
        if item is _END:
            self.exhausted = True
            return None
        index = self.taken
        self.taken = index + 1
        return index, item
