"""flux-async: the async-first SDK for OpenAI-format image generation APIs.

Example::

    import asyncio
    from flux_async import FluxClient

    async def main() -> None:
        async with FluxClient(api_key="sk-...", base_url="https://gateway/v1") as client:
            response = await client.generate("a lighthouse at dusk", aspect_ratio="16:9")
            print(response.urls)

    asyncio.run(main())
"""

from ._client import (
    DEFAULT_BASE_URL,
    ENV_API_KEY,
    ENV_BASE_URL,
    FluxClient,
    RequestFields,
)
from ._config import DEFAULT_TIMEOUT, DOWNLOAD_READ_TIMEOUT, Timeout
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchStoppedError,
    ClientClosedError,
    ConflictError,
    DeadlineExceededError,
    EventLoopError,
    FluxError,
    ImageDownloadError,
    ImageSaveError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    ValidationError,
)
from ._fanout import (
    DEFAULT_CONCURRENCY,
    DEFAULT_STOP_ON,
    DOWNLOAD_FAILURES_TO_STOP,
    Fanout,
    FanoutStatistics,
    GenerationResult,
    PromptInput,
)
from ._limits import ConcurrencyLimit, Limiter, LimiterStatistics, RateLimiter
from ._models import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_MODEL,
    MAX_N_PER_REQUEST,
    Image,
    ImageRequest,
    ImagesResponse,
)
from ._outage import OutageGuard, OutageStatistics
from ._retry import RetryBudget, RetryBudgetStatistics, RetryPolicy
from ._save import DEFAULT_MAX_IMAGE_BYTES, Downloader
from ._sync import SyncFluxClient
from ._transport import (
    AiohttpTransport,
    AsyncTransport,
    MockTransport,
    TransportRequest,
    TransportResponse,
)
from ._version import __version__

__all__ = [
    "ASPECT_RATIOS",
    "DEFAULT_ASPECT_RATIO",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MODEL",
    "DEFAULT_STOP_ON",
    "DEFAULT_TIMEOUT",
    "DOWNLOAD_FAILURES_TO_STOP",
    "DOWNLOAD_READ_TIMEOUT",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "MAX_N_PER_REQUEST",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AiohttpTransport",
    "AsyncTransport",
    "AuthenticationError",
    "BadRequestError",
    "BatchStoppedError",
    "ClientClosedError",
    "ConcurrencyLimit",
    "ConflictError",
    "DeadlineExceededError",
    "Downloader",
    "EventLoopError",
    "Fanout",
    "FanoutStatistics",
    "FluxClient",
    "FluxError",
    "GenerationResult",
    "Image",
    "ImageDownloadError",
    "ImageRequest",
    "ImageSaveError",
    "ImagesResponse",
    "InternalServerError",
    "Limiter",
    "LimiterStatistics",
    "MockTransport",
    "NotFoundError",
    "OutageGuard",
    "OutageStatistics",
    "PermissionDeniedError",
    "PromptInput",
    "RateLimitError",
    "RateLimiter",
    "RequestFields",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryPolicy",
    "SyncFluxClient",
    "Timeout",
    "TransportRequest",
    "TransportResponse",
    "UnprocessableEntityError",
    "ValidationError",
    "__version__",
]
