"""An aiohttp.web app whose handlers share one FluxClient (docs/guides/web-apps.md).

The client is made and closed by a ``cleanup_ctx`` generator: startup runs it to its
``yield``, shutdown runs the rest. Every request in between shares it (one connection
pool, one rate limiter, one retry budget). It reads ``FLUX_API_KEY`` and
``FLUX_BASE_URL`` from the environment.

    pip install flux-async
    FLUX_API_KEY=sk-... python aiohttp_app.py
    curl -X POST localhost:8080/images -d '{"prompt": "a lighthouse at dusk"}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

import flux_async

#: The longest a visitor waits for an image, retries included (seconds).
DEADLINE = 60.0
FLUX = web.AppKey("flux", flux_async.FluxClient)


async def flux_client(app: web.Application) -> AsyncIterator[None]:
    # One client for the whole app. Its defaults suit a web app: a pool of 1000
    # connections, so concurrent handlers never queue for one.
    async with flux_async.FluxClient() as client:
        app[FLUX] = client
        yield


async def create_image(request: web.Request) -> web.Response:
    order = await request.json()
    client = request.app[FLUX]
    try:
        response = await client.generate(
            order.get("prompt"), aspect_ratio=order.get("aspect_ratio", "1:1"), deadline=DEADLINE
        )
    except flux_async.ValidationError as exc:
        # Bad input, caught before anything was sent: the visitor's to fix.
        return web.json_response({"error": f"{exc.field}: {exc}"}, status=422)
    except flux_async.RateLimitError as exc:
        # The server's quota is spent for longer than the client waits: say when to retry.
        retry_after = str(round(exc.retry_after or 1))
        return web.json_response(
            {"error": "busy, try again later"}, status=503, headers={"Retry-After": retry_after}
        )
    except flux_async.APIError as exc:
        return web.json_response(
            {"error": f"image generation failed: {type(exc).__name__}"}, status=502
        )
    return web.json_response({"urls": response.urls})


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(flux_client)
    app.router.add_post("/images", create_image)
    return app


if __name__ == "__main__":
    web.run_app(make_app())
