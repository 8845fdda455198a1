"""SafeFetcher against a real HTTP(S) server on 127.0.0.1: limits, timeouts, redirects, and SSRF refusals
that must happen before any request reaches a server."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from urllib.parse import quote

import pytest

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.fetch import FetchResult, SafeFetcher, registered_domain
from service.settings import IntakeSettings
from tests.intake.conftest import CertificateAuthority, ImageServer, TlsServer

LIMIT = 64 * 1024  # above the 20 KB test photo, far below the streamed/declared bodies


def _settings(**overrides: object) -> IntakeSettings:
    values: dict[str, object] = {"max_image_bytes": LIMIT, "fetch_timeout_s": 2.0, "max_redirects": 2,
                                 "allow_private_hosts": ["localhost"]}
    values.update(overrides)
    return IntakeSettings.model_validate(values)


@pytest.fixture(scope="module")
def fetcher() -> Iterator[SafeFetcher]:
    with SafeFetcher(_settings()) as f:
        yield f


@pytest.fixture(scope="module")
def strict_fetcher() -> Iterator[SafeFetcher]:
    """No host allowed to be private, as in production."""
    with SafeFetcher(_settings(allow_private_hosts=[])) as f:
        yield f


def _get(f: SafeFetcher, mode: str, url: str, field: str = "images[0].url") -> FetchResult:
    """One fetch through the sync (CLI) or the async (API) entry point."""
    return f.fetch_sync(url, field) if mode == "sync" else asyncio.run(f.fetch(url, field))


def _refused(call: object, code: IntakeErrorCode, field: str = "images[0].url") -> IntakeError:
    assert callable(call)
    with pytest.raises(IntakeError) as info:
        call()
    assert info.value.code == code, info.value
    assert info.value.field == field
    return info.value


# -- the happy path --------------------------------------------------------------------------------


def test_fetch_sync_returns_the_served_bytes(fetcher: SafeFetcher, image_server: ImageServer,
                                             photo_bytes: bytes) -> None:
    result = fetcher.fetch_sync(image_server.url("/photo.jpg"), "images[0].url")
    assert result == FetchResult(photo_bytes, image_server.url("/photo.jpg"), "image/jpeg", 0)
    assert image_server.hits[0].host == f"localhost:{image_server.port}"


def test_fetch_async_returns_the_served_bytes(fetcher: SafeFetcher, image_server: ImageServer,
                                              photo_bytes: bytes) -> None:
    async def both() -> tuple[FetchResult, FetchResult]:
        # Two at once on one loop: the API fetches a listing's images concurrently.
        return await asyncio.gather(fetcher.fetch(image_server.url("/photo.jpg"), "images[0].url"),
                                    fetcher.fetch(image_server.url("/redirect/1"), "images[1].url"))

    first, second = asyncio.run(both())
    assert first.content == photo_bytes and second.content == photo_bytes
    assert second.redirects == 1 and second.url == image_server.url("/photo.jpg")


def test_allow_list_may_name_an_ip_literal(image_server: ImageServer, photo_bytes: bytes) -> None:
    with SafeFetcher(_settings(allow_private_hosts=["127.0.0.1"])) as f:
        assert f.fetch_sync(image_server.url("/photo.jpg", host="127.0.0.1")).content == photo_bytes


# -- size limits --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_declared_content_length_over_the_limit_is_refused_before_reading(
        fetcher: SafeFetcher, image_server: ImageServer, mode: str) -> None:
    url = image_server.url("/declared-huge")
    started = time.monotonic()
    err = _refused(lambda: _get(fetcher, mode, url), IntakeErrorCode.TOO_LARGE)
    # The server sends no body at all; anything but the header check would wait for the 2 s timeout.
    assert time.monotonic() - started < 1.5
    assert "1000000000" in err.message


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chunked_body_is_aborted_once_past_the_limit(fetcher: SafeFetcher, image_server: ImageServer,
                                                     mode: str) -> None:
    url = image_server.url(f"/chunked?bytes={50 * LIMIT}")
    _refused(lambda: _get(fetcher, mode, url), IntakeErrorCode.TOO_LARGE)


# -- time limits --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("route", ["/slow-headers?s=3", "/drip"])
def test_slow_servers_hit_the_total_deadline(image_server: ImageServer, mode: str, route: str) -> None:
    url = image_server.url(route)
    with SafeFetcher(_settings(fetch_timeout_s=0.4)) as f:
        started = time.monotonic()
        _refused(lambda: _get(f, mode, url), IntakeErrorCode.TIMEOUT)
        elapsed = time.monotonic() - started
    # /drip answers every read within 50 ms, so only a deadline over the whole fetch stops it.
    assert 0.35 < elapsed < 1.5, elapsed


# -- redirects ----------------------------------------------------------------------------------------------


def test_redirects_up_to_the_limit_are_followed(fetcher: SafeFetcher, image_server: ImageServer,
                                                photo_bytes: bytes) -> None:
    result = fetcher.fetch_sync(image_server.url("/redirect/2"))
    assert result.content == photo_bytes and result.redirects == 2
    assert image_server.paths() == ["/redirect/2", "/redirect/1", "/photo.jpg"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_redirect_chain_beyond_the_limit_is_refused(fetcher: SafeFetcher, image_server: ImageServer,
                                                    mode: str) -> None:
    url = image_server.url("/redirect/3")
    _refused(lambda: _get(fetcher, mode, url), IntakeErrorCode.TOO_MANY_REDIRECTS)
    # Three answers seen, the fourth hop never requested.
    assert image_server.paths() == ["/redirect/3", "/redirect/2", "/redirect/1"]


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{port}/photo.jpg",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[::ffff:127.0.0.1]:{port}/photo.jpg",
    "http://0x7f000001:{port}/photo.jpg",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://10.0.0.1/",
    "file:///etc/passwd",
    "gopher://localhost:{port}/_GET",
    "http://user:pw@localhost:{port}/photo.jpg",
])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_redirect_from_an_allowed_host_to_a_forbidden_target_is_refused(
        fetcher: SafeFetcher, image_server: ImageServer, target: str, mode: str) -> None:
    url = image_server.url("/to?u=" + quote(target.format(port=image_server.port), safe=""))
    err = _refused(lambda: _get(fetcher, mode, url), IntakeErrorCode.URL_FORBIDDEN)
    assert err.message.startswith("redirect target")
    assert image_server.paths() == [image_server.hits[0].path]  # only the redirecting request
    assert image_server.hits[0].path.startswith("/to?")


@pytest.mark.parametrize("location", ["http://[::1/x.jpg", "//[/x", "http://[evil.example]/", "https://[1.2.3.4]/",
                                      "http://example.com/a b.jpg", "http://example.com/a\\b.jpg"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_redirect_to_a_malformed_location_is_the_servers_failure(
        fetcher: SafeFetcher, image_server: ImageServer, location: str, mode: str) -> None:
    """The image server wrote the Location: one that does not parse is fetch_failed (422), not a 500 (urljoin
    raises ValueError on some) and not invalid_url (400, the caller's fault)."""
    url = image_server.url("/to?u=" + quote(location, safe=""))
    err = _refused(lambda: _get(fetcher, mode, url, "images[2].url"), IntakeErrorCode.FETCH_FAILED,
                   "images[2].url")
    assert err.http_status == 422 and "redirect" in err.message
    assert image_server.paths() == [image_server.hits[0].path]  # nothing fetched after it


def test_error_statuses_are_fetch_failed(fetcher: SafeFetcher, image_server: ImageServer) -> None:
    err = _refused(lambda: fetcher.fetch_sync(image_server.url("/status?code=404"), "images[0].url"),
                   IntakeErrorCode.FETCH_FAILED)
    assert "404" in err.message
    _refused(lambda: fetcher.fetch_sync(image_server.url("/status?code=500"), "images[0].url"),
             IntakeErrorCode.FETCH_FAILED)


def test_nothing_listening_is_fetch_failed(fetcher: SafeFetcher) -> None:
    # Port 9 (discard) is closed on test machines; the host is allowed, so the connection is attempted.
    _refused(lambda: _get(fetcher, "sync", "http://localhost:9/x.jpg"), IntakeErrorCode.FETCH_FAILED)


# -- SSRF: refused before any connection ---------------------------------------------------------------------

FORBIDDEN_URLS = [
    # loopback in every spelling
    "http://127.0.0.1:{port}/photo.jpg",
    "http://127.1:{port}/photo.jpg",
    "http://127.0.1:{port}/photo.jpg",
    "http://0x7f000001:{port}/photo.jpg",
    "http://0x7f.0.0.1:{port}/photo.jpg",
    "http://2130706433:{port}/photo.jpg",
    "http://0177.0.0.1:{port}/photo.jpg",
    "http://017700000001:{port}/photo.jpg",
    "http://127.000.000.001:{port}/photo.jpg",
    "http://127.0.0.1.:{port}/photo.jpg",
    "http://%31%32%37.0.0.1:{port}/photo.jpg",
    "http://１２７.０.０.１:{port}/photo.jpg",
    "http://[::1]:{port}/photo.jpg",
    "http://[::ffff:127.0.0.1]:{port}/photo.jpg",
    "http://[::ffff:7f00:1]:{port}/photo.jpg",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/photo.jpg",
    "http://[::127.0.0.1]:{port}/photo.jpg",
    "http://[64:ff9b::7f00:1]:{port}/photo.jpg",
    "http://[2002:7f00:1::]:{port}/photo.jpg",
    "http://0:{port}/photo.jpg",
    "http://0.0.0.0:{port}/photo.jpg",
    "http://[::]:{port}/photo.jpg",
    # private, link-local, CGNAT, metadata
    "http://10.0.0.1/",
    "http://10.255.255.254:{port}/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.170.2/v2/credentials",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fc00::1]/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata.google.internal./computeMetadata/v1/",
    "http://METADATA.GOOGLE.INTERNAL/",
    "http://metadata/",
    "http://instance-data/latest/",
    "http://anything.localhost:{port}/photo.jpg",
    "http://printer.local/",
    "http://intranet/",
    # schemes and credentials
    "file:///etc/passwd",
    "ftp://localhost:{port}/photo.jpg",
    "gopher://localhost:{port}/",
    "javascript:alert(1)",
    "//localhost:{port}/photo.jpg",
    "http://user:pass@localhost:{port}/photo.jpg",
    "http://user@localhost:{port}/photo.jpg",
    "http://@localhost:{port}/photo.jpg",
    "http://localhost:{port}\\@evil.example.com/photo.jpg",
]


@pytest.mark.parametrize("template", FORBIDDEN_URLS)
def test_forbidden_urls_never_reach_the_server(fetcher: SafeFetcher, strict_fetcher: SafeFetcher,
                                               image_server: ImageServer, template: str) -> None:
    url = template.format(port=image_server.port)
    for f in (fetcher, strict_fetcher):  # "localhost" being allowed must not open any of these
        with pytest.raises(IntakeError) as sync_info:
            f.fetch_sync(url, "images[3].url")
        with pytest.raises(IntakeError) as async_info:
            asyncio.run(f.fetch(url, "images[3].url"))
        for info in (sync_info, async_info):
            assert info.value.code in (IntakeErrorCode.URL_FORBIDDEN, IntakeErrorCode.INVALID_URL), info.value
            assert info.value.field == "images[3].url"
    assert image_server.hits == []


@pytest.mark.parametrize("template", ["http://127.1:{port}/photo.jpg", "http://0177.0.0.1:{port}/photo.jpg",
                                      "http://2130706433:{port}/photo.jpg", "http://0x7f000001:{port}/photo.jpg",
                                      "http://[::ffff:127.0.0.1]:{port}/photo.jpg"])
def test_odd_loopback_spellings_are_named_as_loopback(fetcher: SafeFetcher, image_server: ImageServer,
                                                      template: str) -> None:
    err = _refused(lambda: fetcher.fetch_sync(template.format(port=image_server.port), "images[0].url"),
                   IntakeErrorCode.URL_FORBIDDEN)
    assert "127.0.0.1 (loopback)" in err.message
    assert image_server.hits == []


def test_localhost_is_refused_unless_allowed(strict_fetcher: SafeFetcher, image_server: ImageServer) -> None:
    _refused(lambda: strict_fetcher.fetch_sync(image_server.url("/photo.jpg"), "images[0].url"),
             IntakeErrorCode.URL_FORBIDDEN)
    assert image_server.hits == []


# -- DNS: resolved addresses are judged, and the vetted one is the one connected to --------------------------


class CountingResolver:
    """A stand-in for DNS (the true external boundary): fixed answers, counted lookups."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        return self.answers[host]


@pytest.mark.parametrize("answers", [["127.0.0.1"], ["93.184.216.34", "10.0.0.7"],
                                     ["2606:2800:220:1::1", "::1"], ["169.254.169.254"], ["::ffff:10.1.2.3"]])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_public_name_resolving_to_any_forbidden_address_is_refused(
        image_server: ImageServer, answers: list[str], mode: str) -> None:
    resolver = CountingResolver({"shop-images.example.com": answers})
    url = f"http://shop-images.example.com:{image_server.port}/photo.jpg"
    with SafeFetcher(_settings(), resolver=resolver) as f:
        err = _refused(lambda: _get(f, mode, url), IntakeErrorCode.URL_FORBIDDEN)
    assert "shop-images.example.com" in err.message and "resolves to" in err.message
    assert resolver.calls == ["shop-images.example.com"]
    assert image_server.hits == []


def test_an_allowed_name_may_not_resolve_to_a_metadata_address(image_server: ImageServer) -> None:
    resolver = CountingResolver({"images.test": ["127.0.0.1", "169.254.169.254"]})
    with SafeFetcher(_settings(allow_private_hosts=["images.test"]), resolver=resolver) as f:
        err = _refused(lambda: _get(f, "sync", f"http://images.test:{image_server.port}/photo.jpg"),
                       IntakeErrorCode.URL_FORBIDDEN)
    assert "metadata" in err.message
    assert image_server.hits == []


def test_connection_goes_to_the_vetted_address_with_the_original_host_header(
        image_server: ImageServer, photo_bytes: bytes) -> None:
    # "images.test" exists only in this resolver: the request can only arrive if the fetcher connected to
    # the address it vetted rather than asking the system resolver again.
    resolver = CountingResolver({"images.test": ["127.0.0.1"]})
    with SafeFetcher(_settings(allow_private_hosts=["images.test"]), resolver=resolver) as f:
        base = f"http://images.test:{image_server.port}"
        assert f.fetch_sync(f"{base}/photo.jpg").content == photo_bytes
        assert asyncio.run(f.fetch(f"{base}/redirect/1")).content == photo_bytes
    assert [h.host for h in image_server.hits] == [f"images.test:{image_server.port}"] * 3
    # One lookup per new connection (sync pool, async pool); the redirect hop reused the kept-alive one.
    assert resolver.calls == ["images.test", "images.test"]


def test_names_whose_dns_never_answers_do_not_starve_other_callers(image_server: ImageServer,
                                                                    photo_bytes: bytes) -> None:
    """One request's 8 URLs on names whose DNS servers never answer time out; their lookups keep their
    threads (getaddrinfo cannot be cancelled), and another caller's fetch still resolves and succeeds.
    (With the 8 threads there were, it timed out too until the hung lookups returned.)"""
    hung = threading.Event()
    answers = CountingResolver({"images.test": ["127.0.0.1"]})

    def resolver(host: str, port: int) -> Sequence[str]:
        if host.endswith(".slow.example.com"):
            hung.wait(30)
            raise OSError("no answer")
        return answers(host, port)

    async def attack_then_fetch(f: SafeFetcher) -> tuple[list[BaseException | FetchResult], FetchResult]:
        attack = await asyncio.gather(*(f.fetch(f"http://x{k}.slow.example.com/a.jpg", f"images[{k}].url")
                                        for k in range(8)), return_exceptions=True)
        return attack, await f.fetch(f"http://images.test:{image_server.port}/photo.jpg")

    settings = _settings(allow_private_hosts=["images.test"], fetch_timeout_s=0.5)
    try:
        with SafeFetcher(settings, resolver=resolver) as f:
            attack, victim = asyncio.run(attack_then_fetch(f))
    finally:
        hung.set()
    assert all(isinstance(a, IntakeError) and a.code is IntakeErrorCode.TIMEOUT for a in attack), attack
    assert victim.content == photo_bytes


def test_a_domain_whose_dns_never_answers_holds_at_most_its_share_of_the_dns_threads(
        image_server: ImageServer, photo_bytes: bytes) -> None:
    """16 names made up under one domain whose DNS never answers, fetched at once: 8
    (``dns_lookups_per_domain``) are looked up and time out, the other 8 are refused at once
    (fetch_failed, no lookup, no thread), and so is a later name, sync or async, until those lookups
    return; another domain resolves meanwhile, and callers asking for one name at once share its lookup.
    (Before, 8 requests of 8 such names held all 64 DNS threads.)"""
    hung = threading.Event()
    answers = CountingResolver({"images.test": ["127.0.0.1"], "cdn.slow.example.com": ["127.0.0.1"]})

    def resolver(host: str, port: int) -> Sequence[str]:
        if host.startswith("x"):
            answers.calls.append(host)
            hung.wait(30)
            raise OSError("no answer")
        time.sleep(0.2)  # long enough for the callers below to meet
        return answers(host, port)

    async def fetch_all(f: SafeFetcher, names: list[str]) -> list[BaseException | FetchResult]:
        return await asyncio.gather(*(f.fetch(f"http://{n}:{image_server.port}/photo.jpg", f"images[{k}].url")
                                      for k, n in enumerate(names)), return_exceptions=True)

    settings = _settings(allow_private_hosts=["images.test", "cdn.slow.example.com"], fetch_timeout_s=0.5)
    assert settings.dns_lookups_per_domain == 8
    try:
        with SafeFetcher(settings, resolver=resolver) as f:
            burst = asyncio.run(fetch_all(f, [f"x{k}.a{k % 3}.slow.example.com" for k in range(16)]))
            codes = [a.code if isinstance(a, IntakeError) else a for a in burst]
            assert codes.count(IntakeErrorCode.TIMEOUT) == 8 and codes.count(IntakeErrorCode.FETCH_FAILED) == 8
            refused = [a for a in burst if isinstance(a, IntakeError) and a.code is IntakeErrorCode.FETCH_FAILED]
            assert all("8 names under example.com are being looked up" in a.message for a in refused), refused
            assert {a.field for a in refused} <= {f"images[{k}].url" for k in range(16)}
            assert len(answers.calls) == 8
            _refused(lambda: f.fetch_sync(f"http://x99.example.com:{image_server.port}/photo.jpg", "u"),
                     IntakeErrorCode.FETCH_FAILED, "u")
            assert len(answers.calls) == 8
            # Another domain resolves; five callers of one name share one lookup.
            victims = asyncio.run(fetch_all(f, ["images.test"] * 5))
            assert all(isinstance(v, FetchResult) and v.content == photo_bytes for v in victims), victims
            assert answers.calls.count("images.test") == 1
            hung.set()
            deadline = time.monotonic() + 10
            while True:  # the hung lookups return: the domain's names are looked up again
                try:
                    back = f.fetch_sync(f"http://cdn.slow.example.com:{image_server.port}/photo.jpg")
                    break
                except IntakeError as exc:
                    assert "being looked up" in exc.message and time.monotonic() < deadline
                    time.sleep(0.05)
            assert back.content == photo_bytes
    finally:
        hung.set()


@pytest.mark.parametrize(("host", "domain"), [
    ("x1.slow.example.com", "example.com"), ("cdn.example.com.", "example.com"), ("images.test", "images.test"),
    ("a.b.shop.co.uk", "shop.co.uk"), ("img.store.com.au", "store.com.au"), ("x.ab.de", "ab.de"),
    ("CDN.Example.ORG", "example.org"), ("co.uk", "co.uk"), ("localhost", "localhost")])
def test_names_are_grouped_by_the_domain_somebody_registered(host: str, domain: str) -> None:
    assert registered_domain(host) == domain


def test_unresolvable_host_is_fetch_failed(image_server: ImageServer) -> None:
    resolver = CountingResolver({})
    with SafeFetcher(_settings(), resolver=resolver) as f:
        err = _refused(lambda: f.fetch_sync("http://nowhere.example.com/a.jpg", "images[0].url"),
                       IntakeErrorCode.FETCH_FAILED)
    assert "nowhere.example.com" in err.message


# -- TLS: SNI and certificate checks use the hostname, the socket goes to the pinned IP ------------


def _trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_file))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_https_to_a_pinned_address_verifies_the_original_hostname(
        tls_image_server: TlsServer, test_ca: CertificateAuthority, photo_bytes: bytes, mode: str) -> None:
    server = tls_image_server.server
    server.reset()
    tls_image_server.sni_names.clear()
    resolver = CountingResolver({"images.test": ["127.0.0.1"]})
    url = server.url("/photo.jpg", host="images.test")
    with SafeFetcher(_settings(allow_private_hosts=["images.test"]), resolver=resolver,
                     ssl_context=_trusting(test_ca)) as f:
        result = _get(f, mode, url)
    assert result.content == photo_bytes and result.url == url
    assert tls_image_server.sni_names == ["images.test"]
    assert server.hits[0].host == f"images.test:{server.port}"


def test_https_certificate_for_another_name_is_refused(tls_image_server: TlsServer,
                                                       test_ca: CertificateAuthority) -> None:
    server = tls_image_server.server
    server.reset()
    resolver = CountingResolver({"other.test": ["127.0.0.1"]})
    with SafeFetcher(_settings(allow_private_hosts=["other.test"]), resolver=resolver,
                     ssl_context=_trusting(test_ca)) as f:
        err = _refused(lambda: f.fetch_sync(server.url("/photo.jpg", host="other.test"), "images[0].url"),
                       IntakeErrorCode.FETCH_FAILED)
    assert "certificate" in err.message.lower()
    assert server.hits == []


def test_https_with_an_untrusted_certificate_is_refused(tls_image_server: TlsServer) -> None:
    server = tls_image_server.server
    server.reset()
    resolver = CountingResolver({"images.test": ["127.0.0.1"]})
    with SafeFetcher(_settings(allow_private_hosts=["images.test"]), resolver=resolver) as f:  # certifi roots
        _refused(lambda: f.fetch_sync(server.url("/photo.jpg", host="images.test"), "images[0].url"),
                 IntakeErrorCode.FETCH_FAILED)
    assert server.hits == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_hung_resolver_cannot_outlast_the_deadline(mode: str) -> None:
    release = threading.Event()

    def hung(host: str, port: int) -> Sequence[str]:
        release.wait(5.0)
        return ["93.184.216.34"]

    with SafeFetcher(_settings(fetch_timeout_s=0.4), resolver=hung) as f:
        started = time.monotonic()
        _refused(lambda: _get(f, mode, "http://slow-dns.example.com/a.jpg"), IntakeErrorCode.TIMEOUT)
        elapsed = time.monotonic() - started
    release.set()
    assert elapsed < 1.5, elapsed
