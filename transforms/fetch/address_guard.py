"""Refuses image URLs that would make a worker reach inside its own network.

Image URLs are written by third parties (publishers' multimedia rows), so a
URL can point at the cloud metadata server, at a private service next to the
worker, or at a name that resolves there. Every hop of every fetch is vetted
here, and the fetcher connects to exactly the addresses vetted (pinning) so
that a second DNS answer cannot swap in a private address (DNS rebinding).
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Resolver = Callable[..., list]

ALLOWED_SCHEMES = ("http", "https", "gs")
DEFAULT_PORTS = {"http": 80, "https": 443}

# Names of metadata servers: refused by name, before DNS, whatever the
# allow-list says (an allow-list for an intranet must not open these).
BLOCKED_NAMES = frozenset({"metadata.google.internal", "metadata.goog"})

# Ranges that `ipaddress` does not flag by itself on every Python version.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")

# Successful resolutions are reused this long: one host may serve most of a
# download, and a resolver call per image adds latency for no safety gain
# (the cached answer is the one that was vetted and is the one connected to).
DNS_CACHE_SECONDS = 30.0
DNS_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Verdict:
    """The outcome of vetting one URL; `addresses` are the ones to connect to."""

    ok: bool
    reason: Optional[str] = None
    detail: str = ""
    host: str = ""
    port: int = 0
    addresses: tuple[str, ...] = field(default=())
    transient: bool = False  # worth retrying: a resolver time-out, not NXDOMAIN

    def as_tuple(self) -> tuple[bool, Optional[str], str]:
        return self.ok, self.reason, self.detail


def parse_networks(value: Union[str, Iterable[str], None]) -> tuple[IPNetwork, ...]:
    """CIDRs from `--allow_private_networks` (comma-separated) or a list."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(ipaddress.ip_network(item.strip(), strict=False)
                 for item in items if item and item.strip())


def embedded_ipv4(ip: IPAddress) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address tunnels to, if any.

    IPv4-mapped, NAT64, 6to4 and Teredo addresses all deliver to an IPv4
    host, so `::ffff:169.254.169.254` must be judged as 169.254.169.254.
    """
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def blocked_category(ip: IPAddress) -> Optional[str]:
    """Why an address must not be fetched from, or None if it is public."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        category = blocked_category(inner)
        return f"{category} (embedded in {ip})" if category else None
    checks = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("carrier-grade NAT", ip.version == 4 and ip in _CGNAT),
        ("site-local", ip.version == 6 and ip.is_site_local),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


def _literal_ip(host: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


class AddressGuard:
    """Vets URLs and resolves hosts to the addresses that may be connected to.

    Thread-safe. `allowed` CIDRs punch holes in the block list (tests on
    loopback, an intranet image server); they never unblock a scheme.
    """

    def __init__(self, allowed: Union[str, Iterable[str], None] = (),
                 resolver: Optional[Resolver] = None,
                 cache_seconds: float = DNS_CACHE_SECONDS):
        self.allowed: tuple[IPNetwork, ...] = parse_networks(allowed)
        self._resolver = resolver or socket.getaddrinfo
        self._cache_seconds = cache_seconds
        self._cache: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_option(cls, value: Union[str, Iterable[str], None]) -> "AddressGuard":
        return cls(value)

    def check_url(self, url: str) -> tuple[bool, Optional[str], str]:
        """(ok, reason, detail) for one URL; resolves its host."""
        return self.vet(url).as_tuple()

    def vet(self, url: str) -> Verdict:
        """Like `check_url`, also giving the vetted addresses to pin to."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            return Verdict(False, "invalid_url", f"cannot parse URL: {exc}")
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            return Verdict(False, "unsupported_scheme",
                           f"scheme {scheme or '(none)'!r} is not http, https or gs")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            return Verdict(False, "invalid_url", "URL has no host")
        if scheme == "gs":
            # Read through the Cloud Storage API, whose endpoint is fixed.
            return Verdict(True, host=host)
        return self.resolve(host, port or DEFAULT_PORTS[scheme])

    def resolve(self, host: str, port: int) -> Verdict:
        """Every address of `host`; refused if ANY of them is blocked.

        Judging all answers (not just the first) matters because the client
        may fall back to a later one, and the attacker controls the order.
        """
        host = host.rstrip(".").lower()
        if host in BLOCKED_NAMES:
            # Refused before any lookup: no allow-list entry makes the
            # metadata server an image host, and the lookup itself would leak.
            return Verdict(False, "blocked_address", f"{host} is a metadata server name",
                           host, port)
        literal = _literal_ip(host)
        if literal is not None:
            addresses: tuple[str, ...] = (str(literal),)
        else:
            try:
                addresses = self._lookup(host, port)
            except (socket.gaierror, UnicodeError, OSError) as exc:
                return Verdict(False, "dns_error", f"cannot resolve {host}: {exc}",
                               host, port, transient=_transient_dns(exc))
        if not addresses:
            return Verdict(False, "dns_error", f"no addresses for {host}", host, port)
        for address in addresses:
            refusal = self._refusal(ipaddress.ip_address(address))
            if refusal:
                where = host if literal is not None else f"{host} resolves to {address}, which"
                return Verdict(False, "blocked_address", f"{where} is a {refusal}", host, port)
        return Verdict(True, None, "", host, port, addresses)

    def needs_lookup(self, url: str) -> bool:
        """Whether vetting `url` may wait on DNS (callers bound that wait)."""
        try:
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").rstrip(".").lower()
            port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)
        except ValueError:
            return False
        if not host or parts.scheme.lower() not in DEFAULT_PORTS or _literal_ip(host):
            return False
        with self._lock:
            hit = self._cache.get((host, port))
        return not (hit and hit[0] > time.monotonic())

    def is_allowed(self, ip: IPAddress) -> bool:
        inner = embedded_ipv4(ip)
        return any(ip in net or (inner is not None and inner in net)
                   for net in self.allowed)

    def _refusal(self, ip: IPAddress) -> Optional[str]:
        if self.is_allowed(ip):
            return None
        category = blocked_category(ip)
        return f"{category} address" if category else None

    def _lookup(self, host: str, port: int) -> tuple[str, ...]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((host, port))
        if hit and hit[0] > now:
            return hit[1]
        infos = self._resolver(host, port, 0, socket.SOCK_STREAM)
        addresses = _unique(info[4][0].split("%", 1)[0] for info in infos)
        with self._lock:
            if len(self._cache) >= DNS_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[(host, port)] = (now + self._cache_seconds, addresses)
        return addresses


def _transient_dns(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def pick_address(addresses: Sequence[str], attempt: int) -> str:
    """The address to use on one attempt: a retry moves on to the next one."""
    return addresses[(max(attempt, 1) - 1) % len(addresses)]
