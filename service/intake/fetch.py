"""Server-side fetching of untrusted image URLs without server-side request forgery.

Owns :class:`SafeFetcher`, the only way the service downloads a caller's URL.

How it is made safe (the design):

* Every URL, the first and every redirect target, goes through :class:`HostPolicy.check_url` first:
  http/https only, no credentials, strict host syntax, IP literals (in any spelling) judged on the spot,
  internal and metadata names refused.  Refusals here happen before any socket is opened.
* Connections are made by our own httpcore *network backend* (``_PinnedBackend``).  httpcore asks it to
  ``connect_tcp(host, port)``; the backend resolves the host itself (``getaddrinfo`` in a worker thread,
  under the fetch deadline; one lookup of a name at a time, a few names of a domain: ``_Lookups``),
  refuses if ANY resolved address is forbidden, and then connects to a vetted IP address, never to the
  name again.  So the address that was checked is the address connected to:
  DNS rebinding between check and connect has nothing to race.  httpcore still sends ``Host`` and TLS
  SNI for the original name and verifies the certificate against it (the backend only swaps the TCP
  destination), so virtual hosting and certificate checks work as for any client.
* Connections kept alive in the pool were vetted when they were opened, so reusing one is safe.
* Redirects are followed by hand (at most ``max_redirects``), each hop re-vetted as above.
* One deadline covers everything (DNS, connect, TLS, redirects, headers, body).  The async path runs
  under ``asyncio.timeout``; both paths also clamp every socket operation to the time left (the streams
  read the deadline of the current fetch from a context variable), so a server dripping one byte at a
  time cannot hold a CLI worker thread past the deadline either.
* The body is streamed and abandoned as soon as it passes ``max_image_bytes``; a larger
  ``Content-Length`` is refused before reading anything.  ``Accept-Encoding: identity`` is sent and
  nothing is decompressed, so there is no compression bomb on this side.
* No proxy from the environment is used (httpcore pools read no environment).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
import ssl
import threading
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urljoin

import httpcore

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.urlpolicy import HostPolicy, TargetUrl

if typing.TYPE_CHECKING:
    from service.settings import IntakeSettings

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> IP address strings``; the system resolver by default, replaceable in tests."""

USER_AGENT = "counterlens-image-fetch/0.1"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DRAIN_LIMIT = 16 * 1024  # redirect bodies up to this size are read so the connection can be kept
_ACCEPT = b"image/webp,image/png,image/jpeg,image/gif,image/*;q=0.8"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for a TCP connection to ``host:port``, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The bytes of a fetched image and where they finally came from."""

    content: bytes
    url: str  # the final URL, after redirects
    content_type: str | None  # as declared by the server (never trusted for the image type)
    redirects: int


@dataclass(frozen=True, slots=True)
class _FetchScope:
    """What the network layer needs to know about the fetch it is serving."""

    deadline: float  # time.monotonic() value
    field: str | None


_SCOPE: ContextVar[_FetchScope | None] = ContextVar("counterlens_intake_fetch_scope", default=None)


def _scope() -> _FetchScope:
    scope = _SCOPE.get()
    if scope is None:
        # Only SafeFetcher drives these pools; a connection without a fetch scope is a bug, not a case.
        raise RuntimeError("the pinned network backend was used outside SafeFetcher.fetch")
    return scope


def _clamp(timeout: float | None, exc: type[Exception]) -> float:
    """``timeout`` cut to the time the current fetch has left; raise ``exc`` when none is left."""
    left = _scope().deadline - time.monotonic()
    if left <= 0:
        raise exc("fetch deadline reached")
    return left if timeout is None else min(timeout, left)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _ClampedStream(httpcore.NetworkStream):
    """A sync stream whose every read/write is bounded by the deadline of the fetch using it."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout))
        return _ClampedStream(inner)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _AsyncClampedStream(httpcore.AsyncNetworkStream):
    """The async twin of :class:`_ClampedStream`."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        inner = await self._inner.start_tls(ssl_context, server_hostname,
                                            _clamp(timeout, httpcore.ConnectTimeout))
        return _AsyncClampedStream(inner)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


# Second-level labels under which names are sold (co.uk, com.au, ne.jp): a name under one of them in a
# two-letter country domain belongs to the domain of its last three labels, not two.
_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "go", "gov", "ltd", "ne", "net", "or", "org", "plc"})


def registered_domain(host: str) -> str:
    """The domain a name most likely belongs to, the unit somebody registers: its last two labels, or
    three under a second-level label of a country domain (``x.shop.co.uk`` -> ``shop.co.uk``). A
    heuristic without the public suffix list: rare suffixes it misses only group their names coarser."""
    labels = host.rstrip(".").lower().split(".")
    n = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL else 2
    return ".".join(labels[-n:])


class _Lookups:
    """The DNS lookups under way, one per name, at most ``per_domain`` names of a registered domain at
    once, each on a thread of ``executor``.

    getaddrinfo cannot be cancelled: a lookup whose DNS server never answers keeps its thread until the
    resolver gives up (10 s and more), whatever the fetch's deadline. Names are free to make under one
    domain (``x1.evil.example``, ``x2.evil.example``, ...): 8 requests of 8 such URLs held all 64 threads,
    and every other caller's URL fetch timed out meanwhile. So a name of a domain with ``per_domain``
    names being looked up (answered or not) is refused at once, without a lookup, until one returns;
    callers that ask for the same name at once share one lookup (a burst of photos from one image host
    is one lookup, and never meets the limit)."""

    def __init__(self, resolver: Resolver, executor: concurrent.futures.Executor, per_domain: int) -> None:
        self.resolver = resolver
        self.executor = executor
        self.per_domain = per_domain
        self._lock = threading.Lock()
        self._by_name: dict[tuple[str, int], concurrent.futures.Future[Sequence[str]]] = {}
        self._by_domain: dict[str, int] = {}

    def start(self, host: str, port: int) -> concurrent.futures.Future[Sequence[str]]:
        """The lookup of ``host`` under way, or a new one; raises fetch_failed where its domain has
        ``per_domain`` names being looked up. (Never cancelled: other callers may share it.)"""
        key, domain = (host, port), registered_domain(host)
        with self._lock:
            if (running := self._by_name.get(key)) is not None:
                return running
            busy = self._by_domain.get(domain, 0)
            if busy >= self.per_domain:
                raise IntakeError(IntakeErrorCode.FETCH_FAILED,
                                  f"could not resolve host {host!r}: {busy} names under {domain} are being "
                                  f"looked up, and their DNS has not answered yet", _scope().field)
            lookup = self.executor.submit(self.resolver, host, port)
            self._by_name[key] = lookup
            self._by_domain[domain] = busy + 1
        lookup.add_done_callback(lambda _: self._done(key, domain))
        return lookup

    def _done(self, key: tuple[str, int], domain: str) -> None:
        with self._lock:
            del self._by_name[key]
            left = self._by_domain[domain] - 1
            if left:
                self._by_domain[domain] = left
            else:
                del self._by_domain[domain]


class _Vetter:
    """Resolve a host (unless it is an IP literal) and return only addresses the policy accepts."""

    def __init__(self, policy: HostPolicy, lookups: _Lookups) -> None:
        self.policy = policy
        self.lookups = lookups

    def _resolve_failed(self, host: str, exc: Exception) -> IntakeError:
        message = f"could not resolve host {host!r}: {exc}"
        return IntakeError(IntakeErrorCode.FETCH_FAILED, message, _scope().field)

    def vet_sync(self, host: str, port: int) -> list[str]:
        if _is_ip(host):
            addresses: Sequence[str] = [host]
        else:
            timeout = _clamp(None, httpcore.ConnectTimeout)
            try:
                # A hung lookup is abandoned in its thread; the fetch keeps its deadline.
                addresses = self.lookups.start(host, port).result(timeout=timeout)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
            except (OSError, UnicodeError) as exc:
                raise self._resolve_failed(host, exc) from None
        return [str(ip) for ip in self.policy.check_addresses(host, addresses, _scope().field)]

    async def vet_async(self, host: str, port: int) -> list[str]:
        if _is_ip(host):
            addresses: Sequence[str] = [host]
        else:
            timeout = _clamp(None, httpcore.ConnectTimeout)
            # (Our own threads, not the loop's default executor: a hung DNS server must not starve other
            # work the application runs in threads.) Shielded: a caller that gives up, or whose whole
            # fetch is cancelled, must not cancel a lookup that other callers share.
            lookup = asyncio.shield(asyncio.wrap_future(self.lookups.start(host, port)))
            try:
                addresses = await asyncio.wait_for(lookup, timeout)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
            except (OSError, UnicodeError) as exc:
                raise self._resolve_failed(host, exc) from None
        return [str(ip) for ip in self.policy.check_addresses(host, addresses, _scope().field)]


class _PinnedBackend(httpcore.NetworkBackend):
    """httpcore's sync TCP backend, connecting only to addresses vetted at connect time."""

    def __init__(self, vetter: _Vetter) -> None:
        self._vetter = vetter
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        last: Exception | None = None
        for ip in self._vetter.vet_sync(host, port):
            try:
                stream = self._inner.connect_tcp(ip, port, _clamp(timeout, httpcore.ConnectTimeout),
                                                 local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc  # try the host's next vetted address
                continue
            return _ClampedStream(stream)
        assert last is not None  # vet_sync never returns an empty list
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                            ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for fetching images")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    """The async twin of :class:`_PinnedBackend` (on httpcore's anyio backend)."""

    def __init__(self, vetter: _Vetter) -> None:
        self._vetter = vetter
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        last: Exception | None = None
        for ip in await self._vetter.vet_async(host, port):
            try:
                stream = await self._inner.connect_tcp(ip, port, _clamp(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            return _AsyncClampedStream(stream)
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for fetching images")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


class _Body:
    """Collects a streamed body, refusing it the moment it passes the byte limit."""

    def __init__(self, max_bytes: int, field: str | None) -> None:
        self.max_bytes = max_bytes
        self.field = field
        self.buffer = bytearray()

    def add(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) > self.max_bytes:
            raise IntakeError(IntakeErrorCode.TOO_LARGE,
                              f"image is larger than the limit of {self.max_bytes} bytes", self.field)


class SafeFetcher:
    """Fetches untrusted http(s) image URLs: never a private/internal address, bounded in time and size.

    Build one per process (it keeps connection pools and a small DNS thread pool) from
    ``settings.intake``; close it with :meth:`close` / :meth:`aclose` or use it as a context manager.
    ``resolver`` and ``ssl_context`` replace the system resolver and the certifi trust store (for
    tests and closed networks).
    """

    def __init__(self, settings: IntakeSettings, *, resolver: Resolver | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 64) -> None:
        self.max_bytes = settings.max_image_bytes
        self.timeout_s = settings.fetch_timeout_s
        self.max_redirects = settings.max_redirects
        self.policy = HostPolicy(settings.allow_private_hosts)
        self._ssl_context = ssl_context  # the certifi store is loaded on first use (it takes ~0.2 s)
        self._max_connections = max_connections
        # Threads start only as needed; a domain whose DNS never answers holds at most
        # dns_lookups_per_domain of them (see _Lookups).
        self._dns = concurrent.futures.ThreadPoolExecutor(max_workers=settings.dns_threads,
                                                          thread_name_prefix="intake-dns")
        self._vetter = _Vetter(self.policy, _Lookups(resolver or system_resolver, self._dns,
                                                     settings.dns_lookups_per_domain))
        self._pool: httpcore.ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._apool: httpcore.AsyncConnectionPool | None = None
        self._apool_loop: asyncio.AbstractEventLoop | None = None

    # -- public entry points -----------------------------------------------------------------------------

    async def fetch(self, url: str, field: str | None = None) -> FetchResult:
        """Download ``url`` (the API's path).  Raises :class:`IntakeError` naming ``field``."""
        target = self.policy.check_url(url, field)
        token = _SCOPE.set(_FetchScope(time.monotonic() + self.timeout_s, field))
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch_async(target, field)
        except IntakeError:
            raise
        except Exception as exc:
            mapped = self._map_error(exc, field)
            if mapped is None:
                raise
            raise mapped from None
        finally:
            _SCOPE.reset(token)

    def fetch_sync(self, url: str, field: str | None = None) -> FetchResult:
        """Download ``url`` from a plain thread (the CLI's rescan workers).  Same rules as :meth:`fetch`."""
        target = self.policy.check_url(url, field)
        token = _SCOPE.set(_FetchScope(time.monotonic() + self.timeout_s, field))
        try:
            return self._fetch_sync(target, field)
        except IntakeError:
            raise
        except Exception as exc:
            mapped = self._map_error(exc, field)
            if mapped is None:
                raise
            raise mapped from None
        finally:
            _SCOPE.reset(token)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        if self._apool is not None and self._apool_loop is asyncio.get_running_loop():
            await self._apool.aclose()
        self._apool = None
        self.close()

    def __enter__(self) -> SafeFetcher:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> SafeFetcher:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- the hop loops ------------------------------------------------------------------------------------

    async def _fetch_async(self, target: TargetUrl, field: str | None) -> FetchResult:
        pool = self._async_pool()
        redirects = 0
        while True:
            async with pool.stream("GET", self._core_url(target), headers=self._headers(target),
                                   extensions=self._extensions()) as response:
                following = self._follow(response, target, redirects, field)
                if following is not None:
                    # Reading a small redirect body to its end lets the connection be reused by the next hop.
                    drained = 0
                    async for chunk in response.aiter_stream():
                        drained += len(chunk)
                        if drained > _DRAIN_LIMIT:
                            break
                    target, redirects = following, redirects + 1
                    continue
                body = _Body(self.max_bytes, field)
                async for chunk in response.aiter_stream():
                    body.add(chunk)
                return FetchResult(bytes(body.buffer), target.url, _content_type(response), redirects)

    def _fetch_sync(self, target: TargetUrl, field: str | None) -> FetchResult:
        pool = self._sync_pool()
        redirects = 0
        while True:
            with pool.stream("GET", self._core_url(target), headers=self._headers(target),
                             extensions=self._extensions()) as response:
                following = self._follow(response, target, redirects, field)
                if following is not None:
                    drained = 0
                    for chunk in response.iter_stream():
                        drained += len(chunk)
                        if drained > _DRAIN_LIMIT:
                            break
                    target, redirects = following, redirects + 1
                    continue
                body = _Body(self.max_bytes, field)
                for chunk in response.iter_stream():
                    body.add(chunk)
                    # Between chunks too: many tiny chunks each within their read timeout still end here.
                    _clamp(None, httpcore.ReadTimeout)
                return FetchResult(bytes(body.buffer), target.url, _content_type(response), redirects)

    def _follow(self, response: httpcore.Response, target: TargetUrl, redirects: int,
                field: str | None) -> TargetUrl | None:
        """The vetted next hop for a redirect, None for a final 2xx answer; refuse anything else."""
        status = response.status
        if status in _REDIRECT_STATUSES:
            location = _header(response, b"location")
            if not location:
                raise IntakeError(IntakeErrorCode.FETCH_FAILED, f"HTTP {status} redirect without a Location",
                                  field)
            if redirects >= self.max_redirects:
                raise IntakeError(IntakeErrorCode.TOO_MANY_REDIRECTS,
                                  f"more than {self.max_redirects} redirects (last from {target.url})", field)
            return self._redirect_target(target, location, status, field)
        if not 200 <= status < 300:
            raise IntakeError(IntakeErrorCode.FETCH_FAILED, f"the image server answered HTTP {status}", field)
        declared = _header(response, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            message = f"the server declares {int(declared)} bytes; the limit is {self.max_bytes}"
            raise IntakeError(IntakeErrorCode.TOO_LARGE, message, field)
        return None

    def _redirect_target(self, target: TargetUrl, location: str, status: int, field: str | None) -> TargetUrl:
        """The vetted URL a redirect's Location names. The image server wrote it, not the caller: one that
        does not parse (``http://[::1/``: urljoin itself raises) or is not a URL we take is the server's
        failure (fetch_failed, 422), never the caller's bad request (invalid_url, 400) nor an error of ours.
        A well-formed target the policy refuses stays url_forbidden."""
        try:
            joined = urljoin(target.url, location)
        except ValueError as exc:
            raise IntakeError(IntakeErrorCode.FETCH_FAILED,
                              f"HTTP {status} redirect to a malformed Location ({exc})", field) from None
        try:
            return self.policy.check_url(joined, field, what="redirect target")
        except IntakeError as exc:
            if exc.code is not IntakeErrorCode.INVALID_URL:
                raise
            raise IntakeError(IntakeErrorCode.FETCH_FAILED, f"HTTP {status} {exc.message}", field) from None

    # -- plumbing -----------------------------------------------------------------------------------------

    @staticmethod
    def _core_url(target: TargetUrl) -> httpcore.URL:
        return httpcore.URL(scheme=target.scheme.encode(), host=target.host.encode("ascii"), port=target.port,
                            target=target.target.encode("ascii"))

    @staticmethod
    def _headers(target: TargetUrl) -> list[tuple[bytes, bytes]]:
        # Host is written here (httpcore would omit the brackets of an IPv6 literal).
        return [(b"Host", target.host_header.encode("ascii")), (b"User-Agent", USER_AGENT.encode()),
                (b"Accept", _ACCEPT), (b"Accept-Encoding", b"identity")]

    def _extensions(self) -> dict[str, typing.Any]:
        left = max(_scope().deadline - time.monotonic(), 0.001)
        return {"timeout": {"connect": left, "read": left, "write": left, "pool": left}}

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpcore.default_ssl_context()
        return self._ssl_context

    def _sync_pool(self) -> httpcore.ConnectionPool:
        with self._pool_lock:  # rescan worker threads may all start at once
            if self._pool is None:
                self._pool = self._new_sync_pool()
            return self._pool

    def _new_sync_pool(self) -> httpcore.ConnectionPool:
        return httpcore.ConnectionPool(
            ssl_context=self._ssl(), max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections // 4, keepalive_expiry=15.0,
            retries=0, network_backend=_PinnedBackend(self._vetter))

    def _async_pool(self) -> httpcore.AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        # Pooled connections belong to the loop that opened them; a fetcher used from a new loop (tests,
        # asyncio.run in scripts) starts a fresh pool instead of touching sockets of a dead loop.
        if self._apool is None or self._apool_loop is not loop:
            self._apool = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl(), max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections // 4, keepalive_expiry=15.0,
                retries=0, network_backend=_AsyncPinnedBackend(self._vetter))
            self._apool_loop = loop
        return self._apool

    def _map_error(self, exc: Exception, field: str | None) -> IntakeError | None:
        """The intake error a transport failure means for the caller; None for a bug to propagate."""
        if isinstance(exc, TimeoutError | httpcore.TimeoutException):
            return IntakeError(IntakeErrorCode.TIMEOUT,
                               f"fetching the image took longer than {self.timeout_s:g} s", field)
        if isinstance(exc, httpcore.ConnectError):
            return IntakeError(IntakeErrorCode.FETCH_FAILED, f"could not connect to the image server: {exc}",
                               field)
        if isinstance(exc, httpcore.NetworkError | httpcore.ProtocolError | OSError):
            return IntakeError(IntakeErrorCode.FETCH_FAILED, f"the image download failed: {exc}", field)
        if isinstance(exc, httpcore.UnsupportedProtocol):
            return IntakeError(IntakeErrorCode.URL_FORBIDDEN, f"unsupported URL: {exc}", field)
        return None


def _content_type(response: httpcore.Response) -> str | None:
    value = _header(response, b"content-type")
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None
