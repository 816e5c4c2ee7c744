"""A FastAPI app whose handlers share one FluxClient (docs/guides/web-apps.md).

The client lives in the app's lifespan: made at startup, closed at shutdown, shared by
every request in between (one connection pool, one rate limiter, one retry budget).
It reads ``FLUX_API_KEY`` and ``FLUX_BASE_URL`` from the environment.

    pip install flux-async fastapi uvicorn
    FLUX_API_KEY=sk-... uvicorn fastapi_app:app
    curl -X POST localhost:8000/images -H 'content-type: application/json' \
         -d '{"prompt": "a lighthouse at dusk"}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import flux_async

#: The longest a visitor waits for an image, retries included (seconds).
DEADLINE = 60.0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One client for the whole app. Its defaults suit a web app: a pool of 1000
    # connections, so concurrent handlers never queue for one.
    async with flux_async.FluxClient() as client:
        app.state.flux = client
        yield


app = FastAPI(lifespan=lifespan)


class ImageOrder(BaseModel):
    prompt: str
    aspect_ratio: str = "1:1"


@app.post("/images")
async def create_image(order: ImageOrder, request: Request) -> dict[str, list[str]]:
    client: flux_async.FluxClient = request.app.state.flux
    try:
        response = await client.generate(
            order.prompt, aspect_ratio=order.aspect_ratio, deadline=DEADLINE
        )
    except flux_async.ValidationError as exc:
        # Bad input, caught before anything was sent: the visitor's to fix.
        raise HTTPException(422, f"{exc.field}: {exc}") from None
    except flux_async.RateLimitError as exc:
        # The server's quota is spent for longer than the client waits: say when to retry.
        retry_after = str(round(exc.retry_after or 1))
        raise HTTPException(
            503, "busy, try again later", headers={"Retry-After": retry_after}
        ) from None
    except flux_async.APIError as exc:
        raise HTTPException(502, f"image generation failed: {type(exc).__name__}") from None
    return {"urls": response.urls}


@app.get("/health")
async def health(request: Request) -> JSONResponse:
    client: flux_async.FluxClient = request.app.state.flux
    stats = client.limiter.statistics()
    return JSONResponse({"outage": client.outage.is_open, "waiting": stats.waiting})
