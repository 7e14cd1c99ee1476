"""The GBIF download step against GBIF's API on loopback (tests/gbif_api.py):
the request, the wait, the resumable zip, and every failure as one line."""
from __future__ import annotations

import json
import os
import socket
import time
import types
from typing import Optional

import pytest

from pipeline.gbif_download.client import Api
from pipeline.gbif_download.errors import GbifError
from pipeline.gbif_download.citation import citation
from pipeline.gbif_download.export import export_from_gbif, resume_command
from pipeline.gbif_download.request import STILL_IMAGE
from tests.conftest import shared_path
from tests.gbif_api import Download, GbifApi
from tests.read.archives import eml, gbif_files, media_row, occurrence_row, write

DMS = "84d26682-f762-11e1-a439-00145eb45e9a"
KEY = "0012345-261130080001234"
REAL_KEY = "0022697-200613084148143"  # the real download in ../shared (DOI 10.15468/dl.4gbcs6)
ACCOUNT = {"GBIF_USER": "fungus-fan", "GBIF_PWD": "pw-Zq8#not-shown", "GBIF_EMAIL": "fan@example.org"}


@pytest.fixture
def account(monkeypatch):
    for name, value in ACCOUNT.items():
        monkeypatch.setenv(name, value)
    return ACCOUNT


@pytest.fixture
def api():
    with GbifApi(ACCOUNT["GBIF_USER"], ACCOUNT["GBIF_PWD"], ACCOUNT["GBIF_EMAIL"]) as server:
        yield server


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory) -> bytes:
    """A small GBIF-shaped DwC-A (what always runs; the real one needs ../shared)."""
    media = [media_row(str(1000 + i), f"http://127.0.0.1:9/{i}.jpg") for i in range(300)]
    occurrences = [occurrence_row(str(1000 + i)) for i in range(300)]
    files = gbif_files(media, occurrences)
    files["metadata.xml"] = eml(doi="10.15468/dl.loop01", key=KEY)
    path = write(str(tmp_path_factory.mktemp("zip") / "small.zip"), files)
    with open(path, "rb") as handle:
        return handle.read()


def options(api: GbifApi, tmp_path, **flags) -> types.SimpleNamespace:
    values = dict(export=None, gbif_dataset=None, gbif_predicate=None, gbif_download=None,
                  gbif_api=api.root if api else "", download_dir=str(tmp_path / "downloads"),
                  output=str(tmp_path / "out"), gbif_poll_seconds=0.02, model=None)
    values.update(flags)
    return types.SimpleNamespace(**values)


def fetch(opts, argv: Optional[list] = None):
    lines: list[str] = []
    path, provenance = export_from_gbif(opts, argv, say=lines.append)
    return path, provenance, lines


def test_a_dataset_is_requested_waited_for_fetched_and_described(api, account, small_zip,
                                                                  tmp_path):
    api.next_download = Download(KEY, small_zip, statuses=["PREPARING", "RUNNING", "SUSPENDED",
                                                            "SUCCEEDED"])
    path, provenance, lines = fetch(options(api, tmp_path, gbif_dataset=DMS))

    (post,) = api.requests("POST")
    body = json.loads(post["body"])
    assert body == {"creator": "fungus-fan", "notificationAddresses": ["fan@example.org"],
                    "sendNotification": False, "format": "DWCA",
                    "predicate": {"type": "and", "predicates": [
                        {"type": "equals", "key": "DATASET_KEY", "value": DMS}, STILL_IMAGE]}}
    assert post["headers"]["Authorization"].startswith("Basic ")
    assert len(api.requests("GET", f"/v1/occurrence/download/{KEY}")) == 4
    assert path == str(tmp_path / "downloads" / f"{KEY}.zip")
    with open(path, "rb") as handle:
        assert handle.read() == small_zip
    assert not os.path.exists(path + ".part")
    assert provenance["download_key"] == KEY and provenance["doi"] == "10.15468/dl.loop01"
    assert provenance["predicate"] == body["predicate"]
    assert provenance["requested_at"] == "2026-11-30T08:00:01.123+00:00"
    assert provenance["completed_at"] == "2026-11-30T08:06:40.456+00:00"
    assert provenance["total_records"] == 40 and provenance["size"] == len(small_zip)
    assert provenance["requested_by_this_run"] is True
    assert provenance["citation"] == ("GBIF.org (30 November 2026) GBIF Occurrence Download "
                                      "https://doi.org/10.15468/dl.loop01")
    # What the client keeps and says never holds the account, although GBIF echoes some of it.
    shown = json.dumps(provenance) + "\n".join(lines)
    assert not any(secret in shown for secret in ACCOUNT.values())
    assert any("PREPARING" in line for line in lines) and any("RUNNING" in line for line in lines)


def test_a_predicate_file_gets_still_images_added(api, account, small_zip, tmp_path):
    predicate = {"type": "in", "key": "TAXON_KEY", "values": ["5248454", "2524217"]}
    (tmp_path / "request.json").write_text(json.dumps({"predicate": predicate, "format": "X"}))
    api.next_download = Download(KEY, small_zip)
    fetch(options(api, tmp_path, gbif_predicate=str(tmp_path / "request.json")))
    body = json.loads(api.requests("POST")[0]["body"])
    assert body["predicate"] == {"type": "and", "predicates": [predicate, STILL_IMAGE]}
    assert body["format"] == "DWCA"


@pytest.mark.parametrize("content, found", [("{not json", "JSONDecodeError"),
                                            ('["a list"]', "found list"),
                                            ('{"key": "X"}', "keys ['key']")])
def test_a_bad_predicate_file_is_refused_before_asking_gbif(api, account, tmp_path, content,
                                                            found):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_predicate=str(tmp_path / "p.json")))
    assert err.value.exit_code == 2 and found in str(err.value)
    assert api.log == []


def test_the_account_comes_from_the_environment_only(api, monkeypatch, tmp_path):
    monkeypatch.setenv("GBIF_USER", "fungus-fan")
    monkeypatch.delenv("GBIF_PWD", raising=False)
    monkeypatch.delenv("GBIF_EMAIL", raising=False)
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_dataset=DMS))
    assert err.value.exit_code == 2
    assert "GBIF_USER, GBIF_PWD, GBIF_EMAIL (not set: GBIF_PWD, GBIF_EMAIL)" in str(err.value)
    assert api.log == []


@pytest.mark.parametrize("flags, expected", [
    ({"gbif_dataset": "not-a-uuid"}, "expected a GBIF dataset key"),
    ({"gbif_download": "../../etc"}, "expected a GBIF download key"),
    ({"gbif_download": KEY, "export": "x.zip"}, "found --export and --gbif_download"),
    ({"gbif_download": KEY, "gbif_poll_seconds": 0}, "--gbif_poll_seconds"),
])
def test_bad_flags_are_one_line_before_any_request(api, account, tmp_path, flags, expected):
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, **flags))
    assert err.value.exit_code == 2 and expected in str(err.value)
    assert api.log == []


@pytest.mark.parametrize("state", ["FAILED", "KILLED", "CANCELLED", "FILE_ERASED"])
def test_a_download_gbif_could_not_make_ends_the_command(api, small_zip, tmp_path, state):
    api.add(Download(KEY, small_zip, statuses=["RUNNING", state]))
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_download=KEY))
    message = str(err.value)
    assert err.value.exit_code == 3 and f"GBIF download {KEY} is {state}" in message
    assert "\n" not in message
    assert api.requests("GET", "/files/") == []
    assert not (tmp_path / "downloads").exists()


@pytest.mark.parametrize("status", [401, 403])
def test_bad_credentials_are_named_without_showing_them(api, account, monkeypatch, tmp_path,
                                                        status):
    if status == 401:
        monkeypatch.setenv("GBIF_PWD", "wrong-password-xyz")
    else:
        api.answers["request"] = [{"status": 403}]
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_dataset=DMS))
    message = str(err.value)
    assert err.value.exit_code == 3 and f"HTTP {status}" in message and "GBIF_PWD" in message
    assert "wrong-password-xyz" not in message and ACCOUNT["GBIF_PWD"] not in message
    assert len(api.requests("POST")) == 1  # a refused account is not asked again


@pytest.mark.parametrize("endpoint, status", [("request", 420), ("status", 429)])
def test_retry_after_is_honoured(api, account, small_zip, tmp_path, endpoint, status):
    """With a 20 ms poll interval, only Retry-After: 1 can make the client wait a second."""
    api.answers[endpoint] = [{"status": status, "Retry-After": "1"}]
    api.next_download = Download(KEY, small_zip)
    fetch(options(api, tmp_path, gbif_dataset=DMS))
    method, path = ("POST", "/v1/occurrence/download/request") if endpoint == "request" else \
        ("GET", f"/v1/occurrence/download/{KEY}")
    first, second = [r["time"] for r in api.requests(method, path)][:2]
    assert second - first >= 0.95


def test_polling_backs_off_to_a_cap(api, small_zip, tmp_path):
    """Intervals of 0.1 s × 1.5 per check, capped at 5 × 0.1 s."""
    api.add(Download(KEY, small_zip, statuses=["RUNNING"] * 7 + ["SUCCEEDED"]))
    fetch(options(api, tmp_path, gbif_download=KEY, gbif_poll_seconds=0.1))
    times = [r["time"] for r in api.requests("GET", f"/v1/occurrence/download/{KEY}")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    expected = [0.1, 0.15, 0.225, 0.3375, 0.5, 0.5, 0.5]
    assert len(gaps) == len(expected)
    for gap, wanted in zip(gaps, expected):
        assert wanted * 0.95 <= gap < wanted + 0.25, (gaps, expected)


@pytest.mark.parametrize("status", [500, 502])
def test_an_ambiguous_answer_to_the_request_is_not_sent_again(api, account, tmp_path, status):
    """GBIF may have made the download before failing: a second POST could make two."""
    api.answers["request"] = [{"status": status}]
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_dataset=DMS))
    assert err.value.exit_code == 3 and "https://www.gbif.org/user/download" in str(err.value)
    assert len(api.requests("POST")) == 1


def _zip_gets(api: GbifApi) -> list[Optional[str]]:
    return [r["headers"].get("Range") for r in api.requests("GET", "/files/")]


def _real_zip() -> bytes:
    return shared_path("gbif-samples",
                       f"amblyomma_dl_4gbcs6_2020_RECONSTRUCTED_{REAL_KEY}.zip").read_bytes()


@pytest.mark.parametrize("source", ["small", "real"])
def test_a_zip_cut_short_is_resumed_with_range(api, small_zip, tmp_path, source):
    data = small_zip if source == "small" else _real_zip()
    key = KEY if source == "small" else REAL_KEY
    first, second = len(data) // 5, len(data) // 3
    api.add(Download(key, data, cuts=[first, second]))
    path, provenance, _ = fetch(options(api, tmp_path, gbif_download=key))
    with open(path, "rb") as handle:
        assert handle.read() == data
    assert _zip_gets(api) == [None, f"bytes={first}-", f"bytes={first + second}-"]
    assert provenance["requested_by_this_run"] is False
    if source == "real":
        from transforms.read.export import Archive, read_identity, read_spec
        with Archive(path) as archive:
            identity = read_identity(archive, read_spec(archive))
        assert identity["download_key"] == REAL_KEY and identity["doi"] == "10.15468/dl.4gbcs6"


def test_a_part_left_by_an_earlier_run_is_continued(api, small_zip, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / f"{KEY}.zip.part").write_bytes(small_zip[:1234])
    api.add(Download(KEY, small_zip))
    path, _, _ = fetch(options(api, tmp_path, gbif_download=KEY))
    assert _zip_gets(api) == ["bytes=1234-"]
    assert open(path, "rb").read() == small_zip
    # And a complete zip is not fetched again.
    fetch(options(api, tmp_path, gbif_download=KEY))
    assert len(_zip_gets(api)) == 1


def test_a_remote_download_dir_gets_the_whole_zip_for_distributed_workers(api, small_zip,
                                                                          tmp_path, gcs_bucket):
    """gs:// (the GCS emulator): the zip arrives in a local staging folder, resumable
    there, and is copied once whole; a second run finds it and fetches nothing."""
    import fsspec
    api.add(Download(KEY, small_zip, cuts=[len(small_zip) // 2]))
    folder = f"{gcs_bucket}/runs/downloads"
    path, provenance, lines = fetch(options(api, tmp_path, gbif_download=KEY,
                                            download_dir=folder))
    assert path == provenance["zip"] == f"{folder}/{KEY}.zip"
    with fsspec.open(path, "rb") as handle:
        assert handle.read() == small_zip
    assert len(_zip_gets(api)) == 2 and any("copying" in line for line in lines)
    fetch(options(api, tmp_path, gbif_download=KEY, download_dir=folder))
    assert len(_zip_gets(api)) == 2


def test_a_server_that_ignores_range_sends_it_whole_again(api, small_zip, tmp_path):
    half = len(small_zip) // 2
    api.add(Download(KEY, small_zip, cuts=[half], ignore_range=True))
    path, _, _ = fetch(options(api, tmp_path, gbif_download=KEY))
    assert _zip_gets(api) == [None, f"bytes={half}-"]
    assert open(path, "rb").read() == small_zip


def test_a_zip_that_stays_cut_short_is_kept_for_the_next_run(api, small_zip, tmp_path):
    assert len(small_zip) > 3000
    api.add(Download(KEY, small_zip, cuts=[3000] + [0] * 1000))
    started = time.monotonic()
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_download=KEY))
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert err.value.exit_code == 3 and "was cut short: 3,000 of" in message
    assert f"--gbif_download {KEY}" in message
    part = tmp_path / "downloads" / f"{KEY}.zip.part"
    assert part.read_bytes() == small_zip[:3000]
    assert not (tmp_path / "downloads" / f"{KEY}.zip").exists()


@pytest.mark.parametrize("delta", [+10, -10])
def test_a_size_that_does_not_match_the_api_is_refused(api, small_zip, tmp_path, delta):
    api.add(Download(KEY, small_zip, size=len(small_zip) + delta))
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_download=KEY))
    assert err.value.exit_code == 3
    assert f"GBIF's API says {len(small_zip) + delta:,}" in str(err.value)
    assert os.listdir(tmp_path / "downloads") == []


def test_an_unreachable_api_is_given_up_after_a_bounded_time(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    opts = options(None, tmp_path, gbif_download=KEY, gbif_api=f"http://127.0.0.1:{port}/v1",
                   gbif_poll_seconds=0.05)
    started = time.monotonic()
    with pytest.raises(GbifError) as err:
        fetch(opts)
    elapsed = time.monotonic() - started
    assert 0.7 <= elapsed < 5  # 15 poll intervals of patience, then one line
    message = str(err.value)
    assert err.value.exit_code == 3 and "stayed unusable" in message and "tries" in message


def test_server_errors_are_retried_like_an_outage(api, small_zip, tmp_path):
    api.add(Download(KEY, small_zip))
    api.answers["status"] = [{"status": 503}, {"status": 500}]
    path, _, _ = fetch(options(api, tmp_path, gbif_download=KEY))
    assert len(api.requests("GET", f"/v1/occurrence/download/{KEY}")) == 3
    assert open(path, "rb").read() == small_zip


def test_an_unknown_key_is_a_usage_error(api, tmp_path):
    with pytest.raises(GbifError) as err:
        fetch(options(api, tmp_path, gbif_download="0000000-000000000000000"))
    assert err.value.exit_code == 2 and "HTTP 404" in str(err.value)


def test_resume_command_and_citation():
    argv = ["--gbif_dataset", DMS, "--model", "/m", "--output", "out dir",
            "--gbif_predicate=p.json"]
    assert resume_command(argv, KEY) == (f"gbif-embed run --model /m --output 'out dir' "
                                         f"--gbif_download {KEY}")
    assert citation("10.15468/dl.4gbcs6", "2020-07-16T10:11:12.000+0000") == \
        "GBIF.org (16 July 2020) GBIF Occurrence Download https://doi.org/10.15468/dl.4gbcs6"
    assert citation(None, "2020-07-16") is None
    # A run from a zip one already has: the date of its metadata.xml.
    from pipeline.tools.report import _citation
    shown = _citation({"doi": "10.15468/dl.4gbcs6", "published": "2020-07-16"})
    assert "Cite the data as: GBIF.org (16 July 2020) GBIF Occurrence Download " \
           '<a href="https://doi.org/10.15468/dl.4gbcs6">' in shown
    assert _citation({"doi": None}) == ""
    assert Api("http://h/v1/").url("/occurrence/download/x") == "http://h/v1/occurrence/download/x"
