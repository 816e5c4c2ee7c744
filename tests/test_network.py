"""Network settings over real sockets: proxies from the environment or ``proxy=``, and TLS
verification (``verify=``) against a local HTTPS server with a self-signed certificate.

`ForwardProxy` is a tiny HTTP forward proxy on 127.0.0.1: it takes absolute-form requests
(``POST http://127.0.0.1:PORT/v1/... HTTP/1.1``), counts them, forwards each to its target
over a new connection and relays the answer, closing the client's connection after it.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yarl
from aiohttp import web

from flux_async import (
    AiohttpTransport,
    APIConnectionError,
    ClientClosedError,
    FluxClient,
    MockTransport,
    RetryPolicy,
    TransportRequest,
    TransportResponse,
    ValidationError,
)
from flux_async.emulator import Emulator

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "REQUEST_METHOD",
)


class ForwardProxy:
    """Counts and forwards plain-HTTP absolute-form requests; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[str] = []  # request lines, as received
        self.proxy_authorization: list[str | None] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            headers = [line.split(":", 1) for line in lines if line]
            fields = {name.strip().lower(): value.strip() for name, value in headers}
            body = await reader.readexactly(int(fields.get("content-length", "0")))
            self.requests.append(request_line)
            self.proxy_authorization.append(fields.get("proxy-authorization"))
            url = yarl.URL(target)  # absolute form: that is what makes it a proxy request
            assert url.host is not None
            assert url.port is not None
            upstream_reader, upstream_writer = await asyncio.open_connection(url.host, url.port)
            forwarded = [
                f"{method} {url.raw_path_qs} {version}",
                *(
                    f"{name.strip()}: {value.strip()}"
                    for name, value in headers
                    if name.strip().lower()
                    not in ("proxy-authorization", "proxy-connection", "connection")
                ),
                "Connection: close",
                "",
                "",
            ]
            upstream_writer.write("\r\n".join(forwarded).encode("latin-1") + body)
            await upstream_writer.drain()
            answer = await upstream_reader.read()  # Connection: close: read to the end
            upstream_writer.close()
            await upstream_writer.wait_closed()
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the proxy variables it needs; none leak in from the machine."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emu:
        yield emu


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy() as server:
        yield server


async def test_http_proxy_from_the_environment_carries_the_requests(
    emulator: Emulator, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with FluxClient(base_url=emulator.base_url) as client:
        assert (await client.generate("a fox")).urls
        results = await client.gather_generate(["a", "b", "c"], concurrency=3)
    assert all(r.ok for r in results)
    assert len(proxy.requests) == 4
    assert proxy.requests[0] == f"POST {emulator.base_url}/images/generations HTTP/1.1"
    assert emulator.stats.successes == 4


async def test_no_proxy_exempts_the_host(
    emulator: Emulator, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    async with FluxClient(base_url=emulator.base_url) as client:
        assert (await client.generate("a fox")).urls
    assert proxy.requests == []
    assert emulator.stats.successes == 1


async def test_trust_env_false_ignores_the_environment(
    emulator: Emulator, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", proxy.url)
    async with FluxClient(base_url=emulator.base_url, trust_env=False) as client:
        assert (await client.generate("a fox")).urls
    assert proxy.requests == []


async def test_explicit_proxy_wins_and_gets_the_credentials(
    emulator: Emulator, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``proxy=`` is used even where NO_PROXY exempts the host; the credentials in its URL
    go to the proxy as Proxy-Authorization."""
    monkeypatch.setenv("NO_PROXY", "*")
    with_credentials = yarl.URL(proxy.url).with_user("me").with_password("s3cret")
    async with FluxClient(base_url=emulator.base_url, proxy=str(with_credentials)) as client:
        assert (await client.generate("a fox")).urls
    assert len(proxy.requests) == 1
    expected = "Basic " + base64.b64encode(b"me:s3cret").decode()
    assert proxy.proxy_authorization == [expected]
    assert emulator.stats.successes == 1


async def test_a_socks_proxy_in_the_environment_is_skipped_with_a_warning(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://user:pw@127.0.0.1:1080")
    async with FluxClient(base_url=emulator.base_url) as client:
        assert (await client.generate("a fox")).urls
    assert "only http:// and https:// proxies are supported" in caplog.text
    assert "pw" not in caplog.text


def test_bad_network_settings_name_the_field(tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-bundle.pem"
    garbage.write_text("not a certificate")
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"verify": str(tmp_path / "missing.pem")}, "verify", "no file or directory"),
        ({"verify": str(garbage)}, "verify", "PEM"),
        ({"verify": 1}, "verify", "ssl.SSLContext"),
        ({"verify": ""}, "verify", "CA bundle"),
        ({"proxy": "socks5://127.0.0.1:1080"}, "proxy", "http:// or https://"),
        ({"proxy": "http://user:pw@"}, "proxy", "http:// or https://"),
        ({"proxy": 3128}, "proxy", "proxy URL"),
        ({"trust_env": "yes"}, "trust_env", "True or False"),
    ]
    for kwargs, field, allowed in cases:
        with pytest.raises(ValidationError, match=allowed) as info:
            FluxClient(base_url="http://127.0.0.1:1/v1", **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
        assert "pw" not in str(info.value)


async def test_network_settings_with_a_transport_or_session_are_refused() -> None:
    """Set there, not on the client: two places for one setting would leave one unused."""
    mock = MockTransport(lambda request: TransportResponse(500))
    with pytest.raises(ValidationError, match=r"AiohttpTransport\(proxy=") as info:
        FluxClient(transport=mock, proxy="http://127.0.0.1:3128")
    assert info.value.field == "proxy"
    with pytest.raises(ValidationError, match="transport") as info:
        FluxClient(transport=mock, verify=False)
    assert info.value.field == "verify"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValidationError, match="TCPConnector") as info:
            FluxClient(session=session, verify=False)
        assert info.value.field == "verify"
        with pytest.raises(ValidationError, match=r"aiohttp\.ClientSession") as info:
            AiohttpTransport(session=session, trust_env=False)
        assert info.value.field == "trust_env"
    # The defaults are fine anywhere; a CA bundle directory or a context is accepted.
    FluxClient(transport=mock, trust_env=True, proxy=None, verify=True)
    AiohttpTransport(verify=ssl.create_default_context())
    AiohttpTransport(verify=Path(ssl.get_default_verify_paths().openssl_capath))


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = (
        f"openssl req -x509 -newkey rsa:2048 -nodes -days 2 -keyout {key} -out {cert} "
        "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"
    )
    subprocess.run(command.split(), check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def https_server(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """An HTTPS answer of the right shape at ``https://127.0.0.1:PORT/v1``."""

    async def generations(request: web.Request) -> web.Response:
        return web.json_response({"created": 1, "data": [{"url": "https://x/1.png"}]})

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_tls_is_verified_by_default(https_server: str) -> None:
    async with FluxClient(
        base_url=https_server, retry=RetryPolicy.for_tests(max_attempts=1)
    ) as client:
        with pytest.raises(APIConnectionError, match=r"(?i)certificate"):
            await client.generate("a fox")


async def test_verify_takes_a_ca_bundle_a_context_or_false(
    https_server: str, certificate: tuple[Path, Path]
) -> None:
    cert, _ = certificate
    trusting = ssl.create_default_context(cafile=str(cert))
    for verify in (str(cert), cert, trusting, False):
        async with FluxClient(base_url=https_server, verify=verify) as client:
            assert (await client.generate("a fox")).urls == ["https://x/1.png"]


async def test_the_transport_takes_the_same_settings(
    emulator: Emulator, proxy: ForwardProxy
) -> None:
    transport = AiohttpTransport(proxy=proxy.url)
    async with FluxClient(base_url=emulator.base_url, transport=transport) as client:
        assert (await client.generate("a fox")).urls
    assert len(proxy.requests) == 1
    request = TransportRequest(
        method="POST", url=emulator.base_url + "/images/generations", headers={}
    )
    with pytest.raises(ClientClosedError):
        await transport.send(request)
