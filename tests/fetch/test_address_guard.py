"""The address guard: third-party URLs must not reach the worker's own network.

A fake resolver stands in for DNS, so no test here sends a packet anywhere.
"""
from __future__ import annotations

import socket

import pytest

from transforms.fetch.address_guard import AddressGuard, blocked_category, parse_networks


def fake_resolver(table: dict[str, list[str]], calls: list | None = None):
    """getaddrinfo over a table; unknown names fail like NXDOMAIN."""

    def resolve(host, port, family=0, type=0, *args):
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in table[host]]

    return resolve


BLOCKED = [
    "127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "224.0.0.1",
    "240.0.0.1", "255.255.255.255", "::1", "::", "fd00:ec2::254", "fc00::1", "fe80::1",
    "ff02::1", "fec0::1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::ffff:127.0.0.1",
    "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", BLOCKED)
def test_resolving_to_an_internal_address_is_blocked(address):
    guard = AddressGuard(resolver=fake_resolver({"img.example": [address]}))
    ok, reason, detail = guard.check_url("https://img.example/a.jpg")
    assert (ok, reason) == (False, "blocked_address")
    assert address in detail


@pytest.mark.parametrize("address", BLOCKED)
def test_literal_internal_addresses_are_blocked(address):
    calls: list = []
    guard = AddressGuard(resolver=fake_resolver({}, calls))
    host = f"[{address}]" if ":" in address else address
    assert guard.check_url(f"http://{host}/latest/meta-data/")[:2] == (False, "blocked_address")
    assert calls == []  # a literal needs no lookup


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    guard = AddressGuard(resolver=fake_resolver({"img.example": [address]}))
    assert guard.check_url("https://img.example/a.jpg") == (True, None, "")
    assert blocked_category(__import__("ipaddress").ip_address(address)) is None


def test_one_internal_address_among_public_ones_blocks_the_host():
    guard = AddressGuard(resolver=fake_resolver(
        {"rebind.example": ["93.184.216.34", "10.0.0.7", "8.8.8.8"]}))
    ok, reason, detail = guard.check_url("http://rebind.example/x.jpg")
    assert (ok, reason) == (False, "blocked_address")
    assert "10.0.0.7" in detail


@pytest.mark.parametrize("name", ["metadata.google.internal", "METADATA.google.internal.",
                                  "metadata.goog"])
def test_metadata_names_are_blocked_without_a_lookup(name):
    calls: list = []
    guard = AddressGuard(["169.254.0.0/16"], resolver=fake_resolver(
        {name.lower().rstrip("."): ["169.254.169.254"]}, calls))
    assert guard.check_url(f"http://{name}/computeMetadata/v1/")[:2] == (
        False, "blocked_address")
    assert calls == []


def test_allowed_networks_open_exactly_their_addresses():
    guard = AddressGuard.from_option("127.0.0.1/32, 10.0.0.0/8")
    assert guard.check_url("http://127.0.0.1:8080/a.jpg")[0]
    assert guard.check_url("http://10.20.30.40/a.jpg")[0]
    assert guard.check_url("http://[::ffff:10.1.1.1]/a.jpg")[0]
    assert guard.check_url("http://127.0.0.2/a.jpg")[:2] == (False, "blocked_address")
    assert guard.check_url("http://169.254.169.254/")[:2] == (False, "blocked_address")
    assert guard.check_url("http://192.168.0.1/")[:2] == (False, "blocked_address")


def test_loopback_names_are_blocked_unless_allowed():
    assert AddressGuard().check_url("http://localhost/a.jpg")[:2] == (False, "blocked_address")
    assert AddressGuard(["127.0.0.0/8", "::1/128"]).check_url("http://localhost/a.jpg")[0]


def test_numeric_host_forms_are_judged_by_the_address_they_mean():
    # 2130706433 is 127.0.0.1; the system resolver parses it without DNS.
    assert AddressGuard().check_url("http://2130706433/")[:2] == (False, "blocked_address")


@pytest.mark.parametrize("url", ["ftp://example.org/a.jpg", "file:///etc/passwd",
                                 "data:image/jpeg;base64,AAAA", "javascript:alert(1)",
                                 "gopher://127.0.0.1:6379/_INFO", "example.org/a.jpg"])
def test_only_http_https_and_gs_are_fetched(url):
    assert AddressGuard().check_url(url)[:2] == (False, "unsupported_scheme")


def test_gs_needs_no_lookup():
    calls: list = []
    guard = AddressGuard(resolver=fake_resolver({}, calls))
    assert guard.check_url("gs://bucket/images/a.jpg") == (True, None, "")
    assert calls == []


@pytest.mark.parametrize("url", ["http://", "http://[::1/a.jpg", "http://host:99999/a.jpg"])
def test_malformed_urls_are_invalid(url):
    assert AddressGuard().check_url(url)[:2] == (False, "invalid_url")


def test_dns_failures_are_reported_and_classified():
    guard = AddressGuard(resolver=fake_resolver({}))
    verdict = guard.vet("https://gone.example/a.jpg")
    assert (verdict.ok, verdict.reason, verdict.transient) == (False, "dns_error", False)

    def timing_out(*args):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    verdict = AddressGuard(resolver=timing_out).vet("https://slow.example/a.jpg")
    assert (verdict.reason, verdict.transient) == ("dns_error", True)


def test_vet_gives_the_addresses_to_pin_and_caches_them():
    calls: list = []
    guard = AddressGuard(resolver=fake_resolver(
        {"img.example": ["93.184.216.34", "93.184.216.34", "2606:4700::1"]}, calls))
    verdict = guard.vet("https://img.example:8443/a.jpg")
    assert verdict.addresses == ("93.184.216.34", "2606:4700::1")
    assert (verdict.host, verdict.port) == ("img.example", 8443)
    assert not guard.needs_lookup("https://img.example:8443/b.jpg")
    guard.vet("https://img.example:8443/b.jpg")
    assert calls == ["img.example"]


def test_parse_networks_accepts_option_strings_and_lists():
    assert [str(n) for n in parse_networks("127.0.0.1/32,,10.0.0.0/8 ")] == [
        "127.0.0.1/32", "10.0.0.0/8"]
    assert [str(n) for n in parse_networks(["::1"])] == ["::1/128"]
    assert parse_networks("") == () and parse_networks(None) == ()
