"""The SSRF policy on its own: address classes, legacy IPv4 spellings, URL parsing and normalisation."""

from __future__ import annotations

import ipaddress

import pytest

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.urlpolicy import HostPolicy, address_problem, parse_legacy_ipv4

FORBIDDEN_ADDRESSES = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "10.1.2.3", "172.16.0.1", "172.31.255.255",
    "192.168.0.1", "100.64.0.1", "100.127.255.254", "169.254.0.1", "169.254.169.254", "192.0.0.1",
    "192.0.2.1", "198.18.0.1", "198.51.100.1", "203.0.113.1", "224.0.0.1", "239.255.255.250",
    "240.0.0.1", "255.255.255.255",
    "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "64:ff9b::127.0.0.1", "64:ff9b::10.0.0.1", "64:ff9b:1::1", "2002:7f00:1::", "2002:a00:1::",
    "2001::1", "2001:db8::1", "fc00::1", "fd00:ec2::254", "fe80::1", "fe80::1%2", "fec0::1", "ff02::1",
    "100::1", "3fff::1",
]
PUBLIC_ADDRESSES = ["8.8.8.8", "93.184.216.34", "1.1.1.1", "100.63.255.255", "100.128.0.1", "172.32.0.1",
                    "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"]


@pytest.mark.parametrize("address", FORBIDDEN_ADDRESSES)
def test_forbidden_addresses_have_a_reason(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_embedded_ipv4_is_named_in_the_reason() -> None:
    reason = address_problem(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert reason == "an IPv4-mapped form of 127.0.0.1 (loopback)"
    reason = address_problem(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))
    assert reason == "a NAT64 form of 169.254.169.254 (a cloud metadata address)"


@pytest.mark.parametrize(("spelling", "address"), [
    ("127.1", "127.0.0.1"), ("127.0.1", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("0x7f.0x0.0x0.0x1", "127.0.0.1"), ("017700000001", "127.0.0.1"),
    ("10.1", "10.0.0.1"), ("0", "0.0.0.0"), ("0x", "0.0.0.0"), ("8.8.2056", "8.8.8.8"),
])
def test_legacy_ipv4_spellings_parse_like_inet_aton(spelling: str, address: str) -> None:
    assert parse_legacy_ipv4(spelling) == ipaddress.IPv4Address(address)


@pytest.mark.parametrize("spelling",
                         ["1.2.3.4.5", "256.1.1.1", "1.2.3.256", "08.1.1.1", "4294967296", "1..1"])
def test_invalid_legacy_spellings_raise(spelling: str) -> None:
    with pytest.raises(ValueError):
        parse_legacy_ipv4(spelling)


def test_public_urls_are_normalised() -> None:
    policy = HostPolicy()
    t = policy.check_url("  HTTPS://Bücher.Example.COM./ä%20c.jpg?size=ü&x=1#frag ", "f")
    assert (t.scheme, t.host, t.port, t.ip) == ("https", "xn--bcher-kva.example.com", 443, None)
    assert t.target == "/%C3%A4%20c.jpg?size=%C3%BC&x=1"
    assert t.url == "https://xn--bcher-kva.example.com/%C3%A4%20c.jpg?size=%C3%BC&x=1"
    t = policy.check_url("http://cdn.example.com:8080", "f")
    assert (t.port, t.target, t.host_header) == (8080, "/", "cdn.example.com:8080")
    t = policy.check_url("http://[2606:4700:4700::1111]/a.png", "f")
    assert t.ip == ipaddress.ip_address("2606:4700:4700::1111")
    assert t.host_header == "[2606:4700:4700::1111]"
    assert policy.check_url("http://93.184.216.34/x", "f").ip == ipaddress.ip_address("93.184.216.34")


def test_the_space_inside_a_url_is_refused_not_guessed() -> None:
    with pytest.raises(IntakeError) as info:
        HostPolicy().check_url("https://cdn.example.com/a b.jpg", "images[1].url")
    assert info.value.code == IntakeErrorCode.INVALID_URL and info.value.field == "images[1].url"


@pytest.mark.parametrize(("url", "code"), [
    ("", IntakeErrorCode.INVALID_URL),
    ("http://", IntakeErrorCode.INVALID_URL),
    ("http://example.com:0/", IntakeErrorCode.INVALID_URL),
    ("http://example.com:99999/", IntakeErrorCode.INVALID_URL),
    ("http://example.com:８０/", IntakeErrorCode.INVALID_URL),
    ("http://exa_mple..com/", IntakeErrorCode.INVALID_URL),
    ("http://[::1/", IntakeErrorCode.INVALID_URL),
    ("http://[127.0.0.1]/", IntakeErrorCode.INVALID_URL),
    ("http://a\tb.com/", IntakeErrorCode.INVALID_URL),
    ("http://" + "a" * 64 + ".com/", IntakeErrorCode.INVALID_URL),
    ("http://0x5db8d822/", IntakeErrorCode.URL_FORBIDDEN),  # public, but a non-canonical spelling
    ("http://1.2.3.4.5/", IntakeErrorCode.URL_FORBIDDEN),
    ("http://example.com@8.8.8.8/", IntakeErrorCode.URL_FORBIDDEN),
    ("data:image/png;base64,AAAA", IntakeErrorCode.URL_FORBIDDEN),
])
def test_malformed_or_sneaky_urls(url: str, code: IntakeErrorCode) -> None:
    with pytest.raises(IntakeError) as info:
        HostPolicy().check_url(url, "u")
    assert info.value.code == code, info.value


def test_allow_list_is_exact_and_normalised() -> None:
    policy = HostPolicy(["Images.Test.", "[::1]"])
    assert policy.check_url("http://images.test/x", "u").host == "images.test"
    assert policy.check_url("http://[::1]:8000/x", "u").host == "::1"
    for url in ("http://sub.images.test/x", "http://images.test.localhost/x", "http://127.0.0.1/x"):
        with pytest.raises(IntakeError):
            policy.check_url(url, "u")
    # A look-alike public name gets no allowance when it resolves somewhere private.
    with pytest.raises(IntakeError):
        policy.check_addresses("images.test.evil.com", ["127.0.0.1"], "u")


def test_resolved_addresses_are_all_judged() -> None:
    policy = HostPolicy(["images.test"])
    assert [str(a) for a in policy.check_addresses("cdn.example.com", ["8.8.8.8", "2606:4700::1"], "u")] == [
        "8.8.8.8", "2606:4700::1"]
    with pytest.raises(IntakeError) as info:
        policy.check_addresses("cdn.example.com", ["8.8.8.8", "192.168.1.20"], "u")
    assert "192.168.1.20 (private)" in info.value.message
    assert policy.check_addresses("images.test", ["127.0.0.1", "10.0.0.1"], "u")
    with pytest.raises(IntakeError):
        policy.check_addresses("images.test", ["fd00:ec2::254"], "u")
    with pytest.raises(IntakeError) as empty:
        policy.check_addresses("cdn.example.com", [], "u")
    assert empty.value.code == IntakeErrorCode.FETCH_FAILED
