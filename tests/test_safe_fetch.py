"""URL queries cannot make the backend fetch internal addresses (SSRF). Traffic goes only to
servers these tests start on 127.0.0.1; every other address is refused before connecting."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tests.services import local_http_server

from lookalike.core import safe_fetch
from lookalike.core.images import ImageLimits, ImageLoadError
from lookalike.core.safe_fetch import UrlPolicy, UrlRefusedError, fetch_public_url

LIMITS = ImageLimits(download_timeout=5.0, max_download_bytes=10_000)
NOTHING_ALLOWED = UrlPolicy()


@pytest.fixture
def server(tmp_path: Path):
    (tmp_path / "pic.jpg").write_bytes(b"\xff\xd8 a picture")
    (tmp_path / "big.jpg").write_bytes(b"x" * 20_000)
    with local_http_server(tmp_path) as url:
        yield url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.jpg",
        "http://localhost/x.jpg",
        "http://10.0.0.1/x.jpg",
        "http://192.168.1.1/x.jpg",
        "http://172.16.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "http://100.64.0.1/x.jpg",  # carrier-grade NAT
        "http://0.0.0.0/x.jpg",
        "http://224.0.0.1/x.jpg",  # multicast
        "http://[::1]/x.jpg",
        "http://[fe80::1]/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",  # loopback hidden in IPv6
        "http://[fd00::1]/x.jpg",  # unique local
    ],
)
def test_internal_addresses_are_refused_before_connecting(url: str, monkeypatch) -> None:
    def no_connection(*args, **kwargs):
        raise AssertionError("connected to a refused address")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    with pytest.raises(UrlRefusedError, match="non-public address"):
        fetch_public_url(url, LIMITS, NOTHING_ALLOWED)


def test_a_listed_network_is_allowed(server: str) -> None:
    policy = UrlPolicy.parse("127.0.0.1/32")
    assert fetch_public_url(f"{server}/pic.jpg", LIMITS, policy) == b"\xff\xd8 a picture"
    with pytest.raises(UrlRefusedError):
        fetch_public_url(f"{server}/pic.jpg", LIMITS, NOTHING_ALLOWED)


def test_size_limits_still_hold(server: str) -> None:
    with pytest.raises(ImageLoadError, match="download limit"):
        fetch_public_url(f"{server}/big.jpg", LIMITS, UrlPolicy.parse("127.0.0.1"))


def test_every_redirect_is_vetted(server: str, monkeypatch) -> None:
    """An allowed server redirecting to an internal address: the redirect is refused."""
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2:9/secret")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/x"
        with pytest.raises(UrlRefusedError, match=r"127\.0\.0\.2"):
            fetch_public_url(url, LIMITS, UrlPolicy.parse("127.0.0.1/32"))
    finally:
        httpd.shutdown()


def test_the_connection_goes_to_the_vetted_address(server: str, monkeypatch) -> None:
    """The host is resolved once; the connection uses that address, so a DNS answer that
    changes between the check and the connection (rebinding) cannot redirect it."""
    port = int(server.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    lookups: list[str] = []

    def resolve(host, *args, **kwargs):
        if host == "images.test":
            lookups.append(host)
            if len(lookups) > 1:
                raise AssertionError("resolved twice: a check-then-connect gap")
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    policy = UrlPolicy.parse("images.test")
    body = fetch_public_url(f"http://images.test:{port}/pic.jpg", LIMITS, policy)
    assert body == b"\xff\xd8 a picture" and lookups == ["images.test"]


def test_only_http_urls_with_a_host() -> None:
    for url in ("file:///etc/passwd", "ftp://example.org/x", "http:///x"):
        with pytest.raises(UrlRefusedError, match="only http"):
            fetch_public_url(url, LIMITS, NOTHING_ALLOWED)


def test_policy_parsing() -> None:
    policy = UrlPolicy.parse(" images.corp , 10.1.0.0/16,, ")
    assert policy.hosts == {"images.corp"} and [str(n) for n in policy.networks] == ["10.1.0.0/16"]
    assert safe_fetch.UrlPolicy().allows("x", __import__("ipaddress").ip_address("8.8.8.8"))
