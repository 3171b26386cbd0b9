"""Fetching a URL that someone else chose (a searcher's `url` query) without becoming a proxy
into the backend's own network (SSRF).

Each hop's host is resolved once, every address it resolves to must be public (or allowed), and
the connection goes to that vetted address: no second DNS lookup between the check and the
connection. Redirects are followed by hand, each one vetted the same way. TLS still verifies the
certificate against the host name. Size and time limits are the image loader's.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from lookalike.core.images import ImageLimits, ImageLoadError, read_limited, shown_url
from lookalike.core.images import too_slow_error as _too_slow

MAX_REDIRECTS = 5
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlRefusedError(ImageLoadError):
    """The URL points somewhere a searcher may not make the backend go."""

    def __init__(self, message: str) -> None:
        super().__init__("url_refused", message)


@dataclass(frozen=True)
class UrlPolicy:
    """Which non-public destinations are allowed anyway (e.g. an internal image server)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> UrlPolicy:
        """`spec`: comma-separated host names and networks, e.g. "images.corp,10.1.0.0/16"."""
        hosts, networks = set(), []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IpAddress) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        if any(address in network for network in self.networks):
            return True
        mapped = getattr(address, "ipv4_mapped", None)
        return _public(mapped or address)


def _public(address: IpAddress) -> bool:
    # is_global excludes loopback, private, link-local, shared (100.64/10), reserved and
    # documentation ranges; multicast is excluded separately (some of it is "global").
    return address.is_global and not address.is_multicast


def vetted_address(host: str, port: int, policy: UrlPolicy) -> str:
    """The address to connect to for `host`: every address it resolves to must be allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageLoadError("download_failed", f"cannot resolve {host}: {exc}") from exc
    addresses = _unique(ipaddress.ip_address(info[4][0]) for info in infos)
    refused = [a for a in addresses if not policy.allows(host, a)]
    if not addresses or refused:
        raise UrlRefusedError(
            f"{host} resolves to a non-public address ({refused[0] if refused else 'none'}); "
            "URL queries may only fetch public http(s) addresses (LOOKALIKE_URL_ALLOW lists "
            "exceptions)"
        )
    return str(addresses[0])


def _unique(addresses: Iterable[IpAddress]) -> list[IpAddress]:
    return list(dict.fromkeys(addresses))


def fetch_public_url(url: str, limits: ImageLimits, policy: UrlPolicy) -> bytes:
    """GET `url` (following up to MAX_REDIRECTS redirects), each hop vetted by `policy`."""
    shown = shown_url(url)
    deadline = time.monotonic() + limits.download_timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise UrlRefusedError(f"{shown_url(url)}: only http(s) URLs with a host are fetched")
        port = parts.port or (443 if scheme == "https" else 80)
        address = vetted_address(parts.hostname, port, policy)
        response = _get(scheme, address, port, parts, limits)
        try:
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status >= 400:
                raise ImageLoadError("http_error", f"GET {shown} returned HTTP {response.status}")
            return read_limited(
                response.headers.get("Content-Length"), _chunks(response), shown, limits, deadline
            )
        except urllib3.exceptions.HTTPError as exc:
            raise (
                _too_slow(shown, limits)
                if "timed out" in str(exc)
                else ImageLoadError("download_failed", f"GET {shown} failed: {exc}")
            ) from exc
        finally:
            response.release_conn()
    raise UrlRefusedError(f"{shown}: more than {MAX_REDIRECTS} redirects")


def _chunks(response) -> Iterator[bytes]:
    while chunk := response.read1(64 * 1024):
        yield chunk


def _get(scheme: str, address: str, port: int, parts, limits: ImageLimits):
    """One GET to the vetted `address`, with the URL's host in the Host header and for TLS."""
    timeout = urllib3.Timeout(connect=limits.download_timeout, read=limits.download_timeout)
    host = parts.hostname
    if scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            address,
            port,
            timeout=timeout,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            server_hostname=host,
            assert_hostname=host,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    headers = {"Host": host if default else f"{host}:{port}", "User-Agent": "lookalike"}
    try:
        return pool.urlopen(
            "GET", target, headers=headers, redirect=False, retries=False, preload_content=False
        )
    except urllib3.exceptions.HTTPError as exc:
        shown = shown_url(parts.geturl())
        if isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
            exc, urllib3.exceptions.NewConnectionError
        ):
            raise _too_slow(shown, limits) from exc
        raise ImageLoadError("download_failed", f"GET {shown} failed: {exc}") from exc
