"""Which URLs and network addresses the server may fetch images from.

Owns the SSRF policy, applied without any network access: parsing an untrusted URL strictly (http/https
only, no userinfo, no whitespace, control characters, backslashes or percent-encoded hosts), normalising
its host (IDNA, lower case, one trailing dot), refusing numeric hosts in legacy spellings (``127.1``,
``0x7f000001``, ``2130706433``, ``0177.0.0.1``) and names that only make sense inside a network
(``localhost``, ``*.internal``, dotless names, cloud metadata names), and judging every address a host
resolves to (loopback, private, link-local, CGNAT, multicast, reserved, unspecified, documentation,
IPv4 embedded in IPv6, cloud metadata endpoints).

The parser is our own instead of a general URL library's on purpose: a library that is lenient (accepts
``0177.0.0.1`` as an error but ``127.1`` as a name, or port 99999) would make the policy depend on its
quirks; here every accepted URL is rebuilt from checked parts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from service.intake.errors import IntakeError, IntakeErrorCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Cloud metadata and instance-service endpoints.  They are refused even for hosts named in
# allow_private_hosts: a test or closed-network host never legitimately resolves to one.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "169.254.169.253",  # AWS VPC DNS
        "169.254.169.250",  # Azure
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS time sync over IPv6
        "fd00:ec2::253",  # AWS DNS over IPv6
    )
)

METADATA_HOSTNAMES: frozenset[str] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)

# Names and suffixes that resolve inside the network the server runs in.
_BLOCKED_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "broadcasthost"}
)
_BLOCKED_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".arpa", ".lan",
                     ".intranet", ".corp", ".private", ".test", ".invalid", ".example", ".onion")

# Networks refused in addition to Python's ``is_global`` test, written out so the policy does not depend
# on which Python patch release classifies which range.
_FORBIDDEN_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/8",  # unspecified, loopback, IPv4-compatible, IPv4-mapped (mapped handled first) ...
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from (a short phrase), or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a scoped (link-local) IPv6 address"
        # IPv4 carried inside IPv6 is judged as the IPv4 address it reaches.
        if ip.ipv4_mapped is not None:
            inner = address_problem(ip.ipv4_mapped)
            return f"an IPv4-mapped form of {inner}" if inner else None
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            inner = address_problem(embedded)
            return f"a NAT64 form of {inner}" if inner else None
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour)
            if inner:
                return f"a 6to4 form of {inner}"
    if ip in METADATA_ADDRESSES:
        return f"{ip} (a cloud metadata address)"
    if ip.is_loopback:
        return f"{ip} (loopback)"
    if ip.is_unspecified:
        return f"{ip} (unspecified)"
    if ip.is_link_local:
        return f"{ip} (link-local)"
    if ip.is_multicast:
        return f"{ip} (multicast)"
    if ip.is_private:
        return f"{ip} (private)"
    if ip.is_reserved:
        return f"{ip} (reserved)"
    for net in _FORBIDDEN_NETWORKS:
        if ip.version == net.version and ip in net:
            return f"{ip} (in special-purpose network {net})"
    if not ip.is_global:
        return f"{ip} (not a global address)"
    return None


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address:
    """Parse a numeric host the way ``inet_aton`` and browsers do (``127.1``, ``0x7f.1``, ``0177.0.0.1``,
    ``2130706433``); raise ValueError when it is numeric-looking but no valid address."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        raise ValueError("too many parts")
    values: list[int] = []
    for part in parts:
        if part.startswith("0x"):
            digits = part[2:]
            values.append(int(digits, 16) if digits else 0)
        elif len(part) > 1 and part.startswith("0"):
            values.append(int(part, 8))  # ValueError on 8 or 9, like inet_aton
        elif part:
            values.append(int(part, 10))
        else:
            raise ValueError("empty part")
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise ValueError("part out of range")
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


@dataclass(frozen=True, slots=True)
class TargetUrl:
    """An untrusted URL after every syntactic check: the only form the fetcher connects to."""

    scheme: str  # "http" or "https"
    host: str  # ASCII, lower case, no trailing dot; an IPv6 literal without brackets
    port: int
    target: str  # origin-form request target: path plus optional "?query"
    ip: IPAddress | None  # set when the host is an IP literal

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.target}"


class HostPolicy:
    """The SSRF policy: which URLs may be requested and which resolved addresses may be connected to.

    ``allow_private_hosts`` names hosts (exact names or IP literals, for tests and closed networks) that
    may be loopback/private names and resolve to private addresses; cloud metadata addresses stay
    refused for them too.
    """

    def __init__(self, allow_private_hosts: Iterable[str] = ()) -> None:
        self.allow_private_hosts = frozenset(_normalise_allowed(h) for h in allow_private_hosts if h.strip())

    def is_allowed_private(self, host: str) -> bool:
        return host in self.allow_private_hosts

    def check_url(self, url: str, field: str | None, *, what: str = "URL") -> TargetUrl:
        """Parse and vet ``url``; raise :class:`IntakeError` (invalid_url / url_forbidden) if refused."""
        if not isinstance(url, str):
            raise _invalid(f"{what} must be a string", field)
        url = url.strip()
        if not url:
            raise _invalid(f"{what} is empty", field)
        if len(url) > MAX_URL_LENGTH:
            raise _invalid(f"{what} is longer than {MAX_URL_LENGTH} characters", field)
        if _BAD_URL_CHARS.search(url):
            raise _invalid(f"{what} contains whitespace, control characters or a backslash", field)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise _invalid(f"{what} cannot be parsed: {exc}", field) from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            shown = f"scheme {scheme!r} is not allowed" if scheme else "has no scheme"
            raise _forbidden(f"{what} {shown}; only http and https URLs are fetched", field)
        netloc = parts.netloc
        if not netloc:
            raise _invalid(f"{what} has no host", field)
        if "@" in netloc:
            raise _forbidden(f"{what} must not contain credentials (user@host)",
                              field)
        host, port = self._split_host_port(netloc, scheme, field, what)
        target_ip: IPAddress | None = None
        if host.startswith("["):
            target_ip = self._ipv6_literal(host, field, what)
            host = str(target_ip)
        else:
            host = self._normalise_name(host, field, what)
            target_ip = self._ipv4_literal(host, field, what)
        allowed = self.is_allowed_private(host)
        if target_ip is not None:
            self._judge(host, [target_ip], allowed, field, what)
        elif not allowed:
            self._judge_name(host, field, what)
        return TargetUrl(scheme=scheme, host=host, port=port, target=_request_target(parts.path, parts.query),
                         ip=target_ip)

    def check_addresses(self, host: str, addresses: Sequence[str], field: str | None) -> list[IPAddress]:
        """Judge every address ``host`` resolved to; refuse if ANY is forbidden (a name with one public
        and one private address is exactly what a rebinding attacker publishes)."""
        ips: list[IPAddress] = []
        for a in addresses:
            try:
                ips.append(ipaddress.ip_address(a))
            except ValueError:
                raise IntakeError(IntakeErrorCode.URL_FORBIDDEN,
                                  f"host {host!r} resolved to an unparseable address {a!r}", field) from None
        if not ips:
            raise IntakeError(IntakeErrorCode.FETCH_FAILED, f"host {host!r} resolved to no address", field)
        self._judge(host, ips, self.is_allowed_private(host), field, "URL")
        return ips

    # -- helpers -----------------------------------------------------------------------------------------

    @staticmethod
    def _judge(host: str, ips: Sequence[IPAddress], allowed: bool, field: str | None, what: str) -> None:
        for ip in ips:
            if allowed:
                # Named test/closed-network hosts may be private, never a metadata endpoint.
                problem = f"{ip} (a cloud metadata address)" if _is_metadata(ip) else None
            else:
                problem = address_problem(ip)
            if problem:
                subject = f"{what} host is" if _is_ip_text(host) else f"{what} host {host!r} resolves to"
                raise _forbidden(f"{subject} {problem}; refused", field)

    @staticmethod
    def _split_host_port(netloc: str, scheme: str, field: str | None, what: str) -> tuple[str, int]:
        if netloc.startswith("["):
            end = netloc.find("]")
            if end < 0:
                raise _invalid(f"{what} has an unterminated IPv6 literal", field)
            host, rest = netloc[: end + 1], netloc[end + 1 :]
            if rest and not rest.startswith(":"):
                raise _invalid(f"{what} has junk after the IPv6 literal", field)
            port_text = rest[1:] if rest else ""
        else:
            host, sep, port_text = netloc.rpartition(":")
            if not sep:
                host, port_text = netloc, ""
        if not host:
            raise _invalid(f"{what} has no host", field)
        if port_text == "":
            return host, _DEFAULT_PORTS[scheme]
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _invalid(f"{what} has an invalid port {port_text!r}", field)
        return host, int(port_text)

    @staticmethod
    def _ipv6_literal(host: str, field: str | None, what: str) -> ipaddress.IPv6Address:
        inner = host[1:-1]
        if "%" in inner:
            raise _forbidden(f"{what} has an IPv6 zone identifier", field)
        try:
            return ipaddress.IPv6Address(inner)
        except ValueError:
            raise _invalid(f"{what} has an invalid IPv6 literal {host!r}",
                              field) from None

    @staticmethod
    def _normalise_name(host: str, field: str | None, what: str) -> str:
        if "%" in host:
            raise _forbidden(f"{what} has a percent-encoded host", field)
        if not host.isascii():
            try:
                # The stdlib IDNA codec also folds full-width digits and ideographic dots, so the
                # numeric check below sees "127.0.0.1" for "１２７。0。0。1".
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise _invalid(f"{what} has an invalid international host name",
                                  field) from None
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        labels = host.split(".")
        if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
            raise _invalid(f"{what} has an invalid host name {host!r}", field)
        return host

    @staticmethod
    def _ipv4_literal(host: str, field: str | None, what: str) -> ipaddress.IPv4Address | None:
        """The address of a numeric host; None for a name.  Hosts whose last label is numeric are
        addresses to browsers and to ``getaddrinfo`` (inet_aton), so they are never treated as names."""
        if not _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
            return None
        try:
            canonical = ipaddress.IPv4Address(host)
        except ValueError:
            canonical = None
        if canonical is not None:
            return canonical
        try:
            legacy = parse_legacy_ipv4(host)
        except ValueError:
            raise _forbidden(f"{what} host {host!r} is numeric but not a valid IPv4 address", field) from None
        problem = address_problem(legacy)
        if problem:
            raise _forbidden(f"{what} host {host!r} is a non-canonical spelling of {problem}; refused", field)
        raise _forbidden(f"{what} host {host!r} is a non-canonical IPv4 spelling (write {legacy}); refused",
                         field)

    @staticmethod
    def _judge_name(host: str, field: str | None, what: str) -> None:
        if host in METADATA_HOSTNAMES:
            raise _forbidden(f"{what} host {host!r} is a cloud metadata service",
                              field)
        if host in _BLOCKED_NAMES or host.endswith(_BLOCKED_SUFFIXES):
            raise _forbidden(f"{what} host {host!r} is a local/internal name",
                              field)
        if "." not in host:
            # Dotless names resolve through the server's search domains, i.e. inside its network.
            raise _forbidden(f"{what} host {host!r} is not a public DNS name",
                              field)


def _forbidden(message: str, field: str | None) -> IntakeError:
    return IntakeError(IntakeErrorCode.URL_FORBIDDEN, message, field)


def _invalid(message: str, field: str | None) -> IntakeError:
    return IntakeError(IntakeErrorCode.INVALID_URL, message, field)


def _is_metadata(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped in METADATA_ADDRESSES
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) in METADATA_ADDRESSES
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip in METADATA_ADDRESSES


def _normalise_allowed(host: str) -> str:
    host = host.strip().lower().strip("[]")
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _is_ip_text(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _request_target(path: str, query: str) -> str:
    # Keep existing %-escapes, escape anything else unsafe (non-ASCII arrives as raw characters).
    safe = "/%:@!$&'()*+,;=-._~"
    target = quote(path or "/", safe=safe)
    if not target.startswith("/"):
        target = "/" + target
    if query:
        target += "?" + quote(query, safe=safe + "?")
    return target
