"""The fetch stage against a fault-injecting server on loopback.

Every test runs offline: an autouse fixture fails any connection to an address
that is not loopback, so "refused without connecting" is checked, not hoped.
Time limits are short so that retries and timeouts take fractions of a second.
"""
from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import io
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from PIL import Image

from tests.http_server import FaultServer
from pipeline.options import fetch_config
from transforms.fetch.stage import FetchImages
from transforms.fetch.config import FetchConfig, source_url
from transforms.fetch.outcome import backoff_delay, parse_retry_after, sniff_format
from transforms.fetch.fetcher import Fetcher
from transforms.common.records import FAILURES, NOT_MODIFIED
from transforms.common.tally import TALLY, MergeTallies


def _jpeg(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (180, 90, 30)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


JPEG = _jpeg()
HTML = b"<!DOCTYPE html><html><head><title>Login</title></head><body>...</body></html>"
LOOPBACK = ("127.0.0.1/32",)


def config(**overrides) -> FetchConfig:
    """Small limits: retries in milliseconds, timeouts in fractions of a second."""
    values = dict(allow_private_networks=LOOPBACK, connect_timeout=1.0, read_timeout=0.5,
                  fetch_timeout=5.0, max_attempts=3, backoff_base=0.02, backoff_max=0.1,
                  per_host_concurrency=8, per_host_rate=1000.0, max_image_bytes=100_000,
                  fetch_concurrency=8)
    values.update(overrides)
    return FetchConfig(**values)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any connection to a non-loopback address, and remember it."""
    refused: list = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address):
        if isinstance(address, tuple):
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
            if not ip.is_loopback:
                refused.append(address)
                raise OSError(f"test forbids connecting to {address}")

    def connect(sock, address):
        check(address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield refused
    assert refused == [], f"tried to connect outside loopback: {refused}"


@pytest.fixture
def server():
    with FaultServer() as fault_server:
        yield fault_server


@pytest.fixture
def fetcher():
    instance = Fetcher(config())
    yield instance
    instance.close()


# ---------------------------------------------------------------- success

def test_an_image_is_fetched_with_its_metadata(server, fetcher):
    url = server.add("/a.jpg", JPEG, headers={"ETag": '"v1"',
                                              "Last-Modified": "Tue, 01 Jul 2025 10:00:00 GMT"})
    result = fetcher.fetch(url)
    assert result.ok and result.reason is None
    assert result.content == JPEG and result.image_format == "jpeg"
    assert (result.http_status, result.attempts, result.final_url) == (200, 1, url)
    assert result.etag == '"v1"'
    assert result.last_modified == "Tue, 01 Jul 2025 10:00:00 GMT"
    sent = server.request_headers("/a.jpg")[0]
    assert sent["User-Agent"] == fetcher.config.user_agent
    assert sent["Accept-Encoding"] == "identity"
    assert "If-None-Match" not in sent


def test_a_host_name_is_pinned_to_its_vetted_address_and_keeps_its_host_header(server):
    url = server.add("/named.jpg", JPEG).replace("127.0.0.1", "localhost")
    fetcher = Fetcher(config(allow_private_networks=("127.0.0.1/32", "::1/128")))
    result = fetcher.fetch(url)
    assert result.ok, result.detail
    assert server.request_headers("/named.jpg")[0]["Host"] == f"localhost:{server.port}"


def test_the_format_comes_from_magic_numbers_not_the_name(server, fetcher):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    url = server.add("/looks-like.jpg", png.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert fetcher.fetch(url).image_format == "png"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_sniff_format_knows_the_common_formats(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, fmt)
    assert sniff_format(buffer.getvalue()[:16]) == fmt.lower()


def test_a_body_without_length_is_read_to_the_end(server, fetcher):
    url = server.add("/nolength.jpg", JPEG, headers={"Content-Length": None})
    assert fetcher.fetch(url).content == JPEG


# ---------------------------------------------------------------- https, pinned

@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory):
    """A self-signed certificate for the name `localhost` only (no IP entry)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.fixture
def tls_server(localhost_cert):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*localhost_cert)
    server_names: list = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    with FaultServer(tls=context) as fault_server:
        fault_server.server_names = server_names
        yield fault_server


def test_https_is_pinned_to_the_vetted_address_with_sni_and_certificate_for_the_name(
        tls_server, localhost_cert):
    url = tls_server.add("/secure.jpg", JPEG).replace("127.0.0.1", "localhost")
    fetcher = Fetcher(config(ca_certs=localhost_cert[0]))
    result = fetcher.fetch(url)
    assert result.ok, result.detail
    assert tls_server.server_names == ["localhost"]
    assert tls_server.request_headers("/secure.jpg")[0]["Host"] == f"localhost:{tls_server.port}"


def test_a_certificate_for_another_name_is_a_permanent_tls_error(tls_server, localhost_cert):
    url = tls_server.add("/secure.jpg", JPEG)  # https://127.0.0.1: not in the certificate
    result = Fetcher(config(ca_certs=localhost_cert[0])).fetch(url)
    assert (result.ok, result.reason, result.attempts) == (False, "tls_error", 1)
    assert tls_server.hits("/secure.jpg") == 0


def test_an_untrusted_certificate_is_a_permanent_tls_error(tls_server):
    url = tls_server.add("/secure.jpg", JPEG).replace("127.0.0.1", "localhost")
    result = Fetcher(config()).fetch(url)
    assert (result.ok, result.reason, result.attempts) == (False, "tls_error", 1)
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail


# ---------------------------------------------------------------- transient faults

@pytest.mark.parametrize("first", [
    {"status": 500}, {"status": 502}, {"status": 503}, {"status": 504},
    {"status": 429}, {"body": JPEG, "behaviour": "drop"}, {"behaviour": "close"},
    {"body": JPEG, "delay": 1.5},
], ids=["500", "502", "503", "504", "429", "dropped_mid_body", "closed", "slow"])
def test_a_transient_failure_is_retried_and_ends_ok(server, fetcher, first):
    url = server.add("/flaky.jpg", script=[first, {"body": JPEG}])
    result = fetcher.fetch(url)
    assert result.ok, result.detail
    assert result.content == JPEG
    assert result.attempts == 2 and server.hits("/flaky.jpg") == 2


@pytest.mark.parametrize("response, reason", [
    ({"status": 503}, "http_503"),
    ({"status": 500}, "http_500"),
    ({"body": JPEG, "behaviour": "drop"}, "connection_dropped"),
    ({"behaviour": "close"}, "connection_error"),
    ({"body": JPEG, "delay": 1.0}, "timeout"),
], ids=["503_storm", "500_storm", "always_dropped", "always_closed", "always_slow"])
def test_no_url_is_requested_more_than_max_attempts(server, fetcher, response, reason):
    url = server.add("/storm.jpg", script=[response])
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, reason)
    assert result.attempts == 3
    assert server.hits("/storm.jpg") == 3


def test_a_slow_response_past_the_read_timeout_is_a_timeout(server):
    url = server.add("/slow.jpg", JPEG, delay=2.0)
    fetcher = Fetcher(config(read_timeout=0.2, max_attempts=2))
    started = time.monotonic()
    result = fetcher.fetch(url)
    assert result.reason == "timeout"
    assert server.hits("/slow.jpg") == 2
    assert time.monotonic() - started < 2.0


def test_a_body_that_drips_cannot_outlive_the_fetch_deadline(server):
    url = server.add("/drip.jpg", script=[{"body": JPEG * 20, "behaviour": "stall",
                                           "stall": 5.0}])
    fetcher = Fetcher(config(read_timeout=4.0, fetch_timeout=1.0))
    started = time.monotonic()
    result = fetcher.fetch(url)
    elapsed = time.monotonic() - started
    assert (result.ok, result.reason) == (False, "timeout")
    assert elapsed < 1.5
    assert result.elapsed_s == pytest.approx(elapsed, abs=0.05)


def test_a_server_dripping_its_headers_cannot_outlive_the_fetch_deadline(server):
    """Each byte arrives within the read time-out; only the deadline ends it."""
    url = server.add("/slowloris.jpg", script=[{"body": JPEG, "behaviour": "drip",
                                                "stall": 0.2}])
    fetcher = Fetcher(config(read_timeout=1.0, fetch_timeout=1.0))
    started = time.monotonic()
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, "timeout")
    assert time.monotonic() - started < 1.5
    assert server.hits("/slowloris.jpg") == 1


# ---------------------------------------------------------------- permanent faults

@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
def test_a_permanent_http_error_is_not_retried(server, fetcher, status):
    url = server.add(f"/gone{status}.jpg", b"no", status=status)
    result = fetcher.fetch(url)
    assert (result.ok, result.reason, result.http_status) == (False, f"http_{status}", status)
    assert result.attempts == 1 and server.hits(f"/gone{status}.jpg") == 1


def test_an_unknown_path_is_http_404(server, fetcher):
    assert fetcher.fetch(server.url("/nothing-here.jpg")).reason == "http_404"


def test_html_served_as_jpeg_is_not_an_image(server, fetcher):
    url = server.add("/login.jpg", HTML, headers={"Content-Type": "image/jpeg"})
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, "not_an_image")
    assert "HTML" in result.detail and "image/jpeg" in result.detail
    assert server.hits("/login.jpg") == 1


def test_zero_bytes_is_an_empty_body(server, fetcher):
    url = server.add("/empty.jpg", b"")
    result = fetcher.fetch(url)
    assert (result.ok, result.reason, result.http_status) == (False, "empty_body", 200)
    assert server.hits("/empty.jpg") == 1


def test_a_truncated_jpeg_is_fetched_as_served(server, fetcher):
    """Only a decoder can tell a cut JPEG; the fetch delivers what was sent."""
    cut = _jpeg(64)[:300]
    result = fetcher.fetch(server.add("/cut.jpg", cut))
    assert result.ok and result.content == cut and result.image_format == "jpeg"


def test_a_body_announced_too_large_is_refused_unread(server, fetcher):
    url = server.add("/huge.jpg", JPEG + b"\0" * 200_000)
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, "too_large")
    assert "Content-Length" in result.detail
    assert server.hits("/huge.jpg") == 1


def test_a_body_growing_too_large_is_cut_off(server, fetcher):
    url = server.add("/endless.jpg", JPEG + b"\0" * 200_000, headers={"Content-Length": None})
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, "too_large")
    assert server.hits("/endless.jpg") == 1


# ---------------------------------------------------------------- redirects

def test_a_redirect_chain_is_followed(server, fetcher):
    final = server.add("/final.jpg", JPEG)
    server.add("/r3", status=307, headers={"Location": final})
    server.add("/r2", status=302, headers={"Location": "/r3"})
    start = server.add("/r1", status=301, headers={"Location": server.url("/r2")})
    result = fetcher.fetch(start)
    assert result.ok and result.content == JPEG
    assert result.final_url == final
    assert (result.attempts, result.requests) == (1, 4)


def test_more_redirects_than_allowed_fail(server):
    for i in range(4):
        server.add(f"/hop{i}", status=302, headers={"Location": f"/hop{i + 1}"})
    server.add("/hop4", JPEG)
    result = Fetcher(config(max_redirects=2)).fetch(server.url("/hop0"))
    assert (result.ok, result.reason) == (False, "too_many_redirects")
    assert server.hits("/hop3") == 0


def test_a_redirect_loop_ends(server, fetcher):
    server.add("/loop-a", status=302, headers={"Location": "/loop-b"})
    server.add("/loop-b", status=302, headers={"Location": "/loop-a"})
    result = fetcher.fetch(server.url("/loop-a"))
    assert (result.ok, result.reason) == (False, "too_many_redirects")
    assert "loop" in result.detail
    assert server.hits("/loop-a") == 1 and server.hits("/loop-b") == 1


@pytest.mark.parametrize("target, reason", [
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "blocked_address"),
    ("http://10.0.0.1/admin", "blocked_address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "blocked_address"),
    ("http://[::ffff:169.254.169.254]/", "blocked_address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "blocked_address"),
    ("gs://private-bucket/secret.jpg", "unsupported_scheme"),
    ("file:///etc/passwd", "unsupported_scheme"),
])
def test_a_redirect_into_a_refused_address_is_refused_without_connecting(
        server, fetcher, loopback_only, target, reason):
    url = server.add("/evil.jpg", status=302, headers={"Location": target})
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, reason)
    assert result.attempts == 1 and server.hits("/evil.jpg") == 1
    assert loopback_only == []


def test_loopback_is_refused_unless_allowed(server):
    url = server.add("/local.jpg", JPEG)
    result = Fetcher(config(allow_private_networks=())).fetch(url)
    assert (result.ok, result.reason) == (False, "blocked_address")
    assert server.hits("/local.jpg") == 0


@pytest.mark.parametrize("url, reason", [
    ("ftp://127.0.0.1/a.jpg", "unsupported_scheme"),
    ("file:///etc/passwd", "unsupported_scheme"),
    ("", "unsupported_scheme"),
    ("http://[::1/a.jpg", "invalid_url"),
    ("http://metadata.google.internal/computeMetadata/v1/", "blocked_address"),
])
def test_bad_urls_fail_without_raising(fetcher, url, reason):
    result = fetcher.fetch(url)
    assert (result.ok, result.reason) == (False, reason)


# ---------------------------------------------------------------- conditional requests

def test_a_matching_etag_gets_not_modified(server, fetcher):
    url = server.add("/cached.jpg", JPEG, headers={"ETag": '"v7"'})
    result = fetcher.fetch(url, etag='"v7"')
    assert result.ok and result.not_modified and result.content is None
    assert result.http_status == 304
    assert server.request_headers("/cached.jpg")[0]["If-None-Match"] == '"v7"'

    changed = fetcher.fetch(url, etag='"v6"')
    assert changed.ok and not changed.not_modified and changed.content == JPEG


def test_a_matching_last_modified_gets_not_modified(server, fetcher):
    stamp = "Wed, 02 Jul 2025 08:00:00 GMT"
    url = server.add("/dated.jpg", JPEG, headers={"Last-Modified": stamp})
    result = fetcher.fetch(url, last_modified=stamp)
    assert result.not_modified
    assert server.request_headers("/dated.jpg")[0]["If-Modified-Since"] == stamp


# ---------------------------------------------------------------- politeness

def test_a_host_answering_429_sees_its_request_rate_drop(server):
    server.add("/busy", script=[{"status": 429}])
    fetcher = Fetcher(config(per_host_rate=50.0, max_attempts=1))
    for i in range(5):
        assert fetcher.fetch(server.url(f"/busy?i={i}")).reason == "http_429"
    times = server.hit_times("/busy")
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 50/s is a 20 ms gap; four halvings later it is 16 times as long.
    assert gaps[-1] > 3 * gaps[0]
    assert gaps[-1] >= 0.25
    assert fetcher.politeness.current_rate("127.0.0.1") <= 50.0 / 16


def test_retry_after_seconds_is_honoured(server, fetcher):
    url = server.add("/later.jpg", script=[{"status": 429, "headers": {"Retry-After": "1"}},
                                           {"body": JPEG}])
    result = fetcher.fetch(url)
    assert result.ok and result.attempts == 2
    first, second = server.hit_times("/later.jpg")
    assert second - first >= 0.95


def test_retry_after_holds_back_the_whole_host(server):
    server.add("/a.jpg", status=503, headers={"Retry-After": "1"})
    other = server.add("/b.jpg", JPEG)
    fetcher = Fetcher(config(max_attempts=1))
    assert fetcher.fetch(server.url("/a.jpg")).reason == "http_503"
    assert fetcher.fetch(other).ok
    assert server.hit_times("/b.jpg")[0] - server.hit_times("/a.jpg")[0] >= 0.95


def test_a_retry_after_beyond_the_deadline_fails_at_once(server):
    url = server.add("/closed-today.jpg", status=429, headers={"Retry-After": "3600"})
    fetcher = Fetcher(config(fetch_timeout=2.0))
    started = time.monotonic()
    result = fetcher.fetch(url)
    assert (result.reason, result.http_status) == ("http_429", 429)
    assert "Retry-After" in result.detail
    assert time.monotonic() - started < 1.0 and server.hits("/closed-today.jpg") == 1


def test_per_host_concurrency_is_respected(server):
    server.add("/wait.jpg", JPEG, delay=0.3)
    fetcher = Fetcher(config(per_host_concurrency=2))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(fetcher.fetch, [server.url(f"/wait.jpg?i={i}")
                                                for i in range(6)]))
    assert all(r.ok for r in results)
    times = sorted(server.hit_times("/wait.jpg"))
    # Two at a time: requests arrive in three waves about 0.3 s apart.
    assert times[2] - times[0] >= 0.25 and times[4] - times[2] >= 0.25


def test_parse_retry_after_reads_seconds_and_http_dates():
    now = 1_750_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_grows_exponentially_with_jitter():
    assert backoff_delay(1, 1.0, 60, lambda: 0.0) == 0.5
    assert backoff_delay(3, 1.0, 60, lambda: 1.0) == 4.0
    assert backoff_delay(20, 1.0, 60, lambda: 1.0) == 60


# ---------------------------------------------------------------- configuration

def test_config_from_pipeline_options():
    opts = PipelineOptions(["--per_host_rate=2.5", "--max_attempts=2",
                            "--allow_private_networks=127.0.0.1/32,10.0.0.0/8",
                            "--image_source=gbif_cache", "--fetch_timeout=9"])
    cfg = fetch_config(opts)
    assert (cfg.per_host_rate, cfg.max_attempts, cfg.fetch_timeout) == (2.5, 2, 9.0)
    assert cfg.allow_private_networks == ("127.0.0.1/32", "10.0.0.0/8")
    assert cfg.image_source == "gbif_cache" and cfg.per_host_concurrency == 8
    assert cfg.host_overrides() == {"api.gbif.org": (1, 2.5)}
    assert cfg.user_agent.startswith("gbif-embed/")
    assert fetch_config(PipelineOptions(["--user_agent=me/1 (x@y.z)"])
                        ).user_agent == "me/1 (x@y.z)"


def test_source_url_uses_gbif_cache_form():
    # The example from GBIF's occurrence image API documentation.
    task = {"gbifID": "2005380410",
            "identifier": "https://inaturalist-open-data.s3.amazonaws.com/photos/31610070/"
                          "original.jpg"}
    assert source_url(task, "identifier") == task["identifier"]
    assert source_url(task, "gbif_cache") == (
        "https://api.gbif.org/v1/image/cache/occurrence/2005380410/media/"
        "568639b65b65ddb9090d3d6ef1abce14")
    with pytest.raises(ValueError):
        source_url({"gbifID": "1", "identifier": None}, "identifier")


# ---------------------------------------------------------------- gs:// via the emulator

@pytest.fixture(scope="module")
def gcs_emulator():
    """gcp-storage-emulator on loopback, with bucket `images`; skipped if absent."""
    binary = shutil.which("gcp-storage-emulator") or os.path.join(
        os.path.dirname(sys.executable), "gcp-storage-emulator")
    if not os.path.exists(binary):
        pytest.skip("gcp-storage-emulator is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([binary, "start", "--port", str(port), "--in-memory",
                                "--default-bucket", "images"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",
                                            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://localhost:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.skip("gcp-storage-emulator did not start")
        import gcsfs
        fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
        fs.pipe("images/a.jpg", JPEG)
        fs.pipe("images/page.jpg", HTML)
        fs.pipe("images/huge.jpg", JPEG + b"\0" * 200_000)
        yield
    finally:
        process.terminate()
        process.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.parametrize("path, reason", [("a.jpg", None), ("page.jpg", "not_an_image"),
                                          ("huge.jpg", "too_large"),
                                          ("missing.jpg", "http_404")])
def test_gs_urls_are_read_through_gcsfs(gcs_emulator, path, reason):
    fetcher = Fetcher(config(allow_private_networks=()))
    result = fetcher.fetch(f"gs://images/{path}")
    assert result.reason == reason, result.detail
    if reason is None:
        assert result.content == JPEG and result.image_format == "jpeg"


# ---------------------------------------------------------------- the DoFn in a pipeline

def _task(gbif_id: str, url: str, **extra) -> dict:
    return dict({"gbifID": gbif_id, "identifier": url, "occurrenceID": f"occ-{gbif_id}",
                 "datasetKey": "ds", "taxonKey": 1, "scientificName": "Amanita muscaria",
                 "license": None, "rightsHolder": "R", "creator": "C"}, **extra)


def _has_subset(expected: dict):
    def check(actual):
        [merged] = actual
        missing = {k: v for k, v in expected.items() if merged.get(k) != v}
        if missing:
            raise BeamAssertException(f"tally {merged} lacks {missing}")
        if not any(k.startswith("fetch.latency_ms.") for k in merged):
            raise BeamAssertException(f"tally {merged} has no latency histogram")
    return check


def test_fetch_images_in_a_beam_pipeline(server):
    """Each distinct URL is fetched once and its result goes to every row of it."""
    ok_url = server.add("/p/ok.jpg", JPEG, headers={"ETag": '"v1"'})
    flaky_url = server.add("/p/flaky.jpg", script=[{"status": 500}, {"body": JPEG}])
    missing = server.url("/p/missing.jpg")
    tasks = [
        _task("1", ok_url),
        _task("2", flaky_url),
        _task("3", missing),
        _task("4", server.add("/p/page.jpg", HTML)),
        _task("5", ok_url + "?v=1", etag='"v1"', last_modified=None, revalidate=True),
        _task("6", ok_url + "?v=0", etag='"v0"', revalidate=True),
        _task("7", ok_url),
        _task("8", missing),
    ]
    digest = hashlib.sha256(JPEG).hexdigest()
    pipeline = beam.Pipeline(runner=FnApiRunner())
    outputs = pipeline | beam.Create(tasks) | FetchImages(config())
    assert_that(outputs.images | "ok" >> beam.Map(
        lambda r: (sorted(t["gbifID"] for t in r["tasks"]), r["image_sha256"],
                   r["image_format"], r["http_status"], r["attempts"], r["bytes"],
                   r["content"] == JPEG, sorted(t["occurrenceID"] for t in r["tasks"]))),
        equal_to([(ids, digest, "jpeg", 200, n, len(JPEG), True, [f"occ-{i}" for i in ids])
                  for ids, n in ((["1", "7"], 1), (["2"], 2), (["6"], 1))]), label="fetched")
    assert_that(outputs[FAILURES] | "fail" >> beam.Map(
        lambda f: (f["gbifID"], f["stage"], f["reason"], f["http_status"], f["attempts"])),
        equal_to([("3", "fetch", "http_404", 404, 1), ("8", "fetch", "http_404", 404, 1),
                  ("4", "fetch", "not_an_image", 200, 1)]),
        label="failures")
    assert_that(outputs[NOT_MODIFIED] | "304" >> beam.Map(
        lambda t: (t["gbifID"], t["http_status"], t["attempts"], "content" in t)),
        equal_to([("5", 304, 1, False)]), label="not_modified")
    assert_that(outputs[TALLY] | beam.CombineGlobally(MergeTallies()),
                _has_subset({"fetch.ok": 3, "fetch.failed": 2, "fetch.not_modified": 1,
                             "fetch.reason.http_404": 1, "fetch.reason.not_an_image": 1,
                             "fetch.retries": 1, "fetch.requests": 7,
                             "fetch.distinct_urls": 6, "dedup.rows_sharing_a_fetch": 2,
                             "fetch.bytes": 3 * len(JPEG)}), label="tally")
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in
                result.metrics().query(MetricsFilter().with_namespace("fetch"))["counters"]}
    assert counters["ok"] == 3 and counters["failed"] == 2
    assert counters["reason.http_404"] == 1 and counters["not_modified"] == 1
    assert counters["bytes"] == 3 * len(JPEG)
    [latency] = result.metrics().query(
        MetricsFilter().with_namespace("fetch").with_name("latency_ms"))["distributions"]
    assert latency.committed.count == 6
