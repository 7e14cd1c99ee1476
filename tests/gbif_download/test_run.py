"""`gbif-embed run --gbif_dataset/--gbif_download` end to end, against GBIF's
API on loopback (tests/gbif_api.py) and pictures on loopback: the snapshot
says which download it came from, the report shows its DOI as the citation,
the account is never written or printed, and a failure or a Ctrl-C leaves
the output folder as it was."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.cli import main
from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import jpeg_bytes, make_sample, synthetic_photo
from tests.conftest import LOOPBACK, ROOT, shared_path
from tests.gbif_api import Download, GbifApi
from tests.http_server import FaultServer
from transforms.write.snapshot import read_latest, read_manifest

DMS = "84d26682-f762-11e1-a439-00145eb45e9a"
ACCOUNT = {"GBIF_USER": "fungus-fan", "GBIF_PWD": "pw-Zq8#not-shown",
           "GBIF_EMAIL": "fan@example.org"}
QUICK = ["--gbif_poll_seconds", "0.05", "--batch_size", "4", "--report_samples", "0", *LOOPBACK]


def _environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GBIF_")}
    env.update(extra, PYTHONPATH=str(ROOT))
    return env


def _all_bytes(folder: str) -> bytes:
    found = b""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                found += handle.read()
    return found


def test_a_dataset_straight_from_gbif_to_a_snapshot_that_cites_it(tmp_path, tiny_model, capsys):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    output = str(tmp_path / "out")
    with serve_folder(str(images)) as base_url, \
            GbifApi(ACCOUNT["GBIF_USER"], ACCOUNT["GBIF_PWD"], ACCOUNT["GBIF_EMAIL"]) as api:
        sample = make_sample(str(tmp_path / "data"), base_url, 6, photo_size=(320, 240),
                             with_problems=False)
        with open(sample.export, "rb") as handle:
            api.next_download = Download(sample.download_key, handle.read(), doi=sample.doi,
                                         statuses=["PREPARING", "RUNNING", "SUCCEEDED"],
                                         total_records=6)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--gbif_dataset", DMS, "--model",
             tiny_model, "--output", output, "--gbif_api", api.root, *QUICK],
            capture_output=True, text=True, timeout=600, cwd=str(ROOT),
            env=_environment(**ACCOUNT))
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"gbif: requested download {sample.download_key}" in done.stdout

        manifest = read_manifest(output)
        assert manifest["counts"]["embedded"] == sample.expected_images
        export = manifest["export"]
        assert export["path"] == os.path.join(output, "downloads", f"{sample.download_key}.zip")
        assert export["download_key"] == sample.download_key and export["doi"] == sample.doi
        provenance = export["gbif_download"]
        assert provenance["download_key"] == sample.download_key
        assert provenance["doi"] == sample.doi
        assert provenance["predicate"] == {"type": "and", "predicates": [
            {"type": "equals", "key": "DATASET_KEY", "value": DMS},
            {"type": "equals", "key": "MEDIA_TYPE", "value": "StillImage"}]}
        assert provenance["requested_at"] == "2026-11-30T08:00:01.123+00:00"
        assert provenance["completed_at"] == "2026-11-30T08:06:40.456+00:00"
        assert provenance["total_records"] == 6 and provenance["requested_by_this_run"]
        assert manifest["options"]["gbif_dataset"] == DMS
        snapshot = os.path.join(output, read_latest(output))
        report = open(os.path.join(snapshot, "report.html"), encoding="utf-8").read()
        assert "Cite the data as: GBIF.org (30 November 2026) GBIF Occurrence Download" in report
        assert f'href="https://doi.org/{sample.doi}"' in report

        # The account reached GBIF and nothing else: not the output, not the terminal.
        written = _all_bytes(output) + (done.stdout + done.stderr).encode()
        for secret in ACCOUNT.values():
            assert secret.encode() not in written, secret

        # The same download again by its key: no account needed, the zip is not fetched
        # again, and the run is a refresh of the first.
        zip_gets = len(api.requests("GET", "/files/"))
        assert main(["run", "--gbif_download", sample.download_key, "--model", tiny_model,
                     "--output", output, "--gbif_api", api.root, "--quiet", *QUICK]) == 0
        assert len(api.requests("GET", "/files/")) == zip_gets
        again = read_manifest(output)
        assert again["refresh_mode"] == "refresh"
        assert again["counts"]["reused"] == sample.expected_images
        assert again["export"]["gbif_download"]["requested_by_this_run"] is False
        assert again["export"]["gbif_download"]["doi"] == sample.doi


def test_the_real_download_served_by_the_api_is_embedded_and_cited(tmp_path, tiny_model):
    """GBIF's download 0022697-200613084148143 (../shared), served by the loopback API
    with GBIF's own key, DOI, date and record count; its first iNaturalist pictures
    come from a loopback mirror (synthetic JPEGs: this machine reaches no image host)."""
    key = "0022697-200613084148143"
    data = shared_path("gbif-samples", f"amblyomma_dl_4gbcs6_2020_RECONSTRUCTED_{key}.zip")
    media = shared_path("gbif-samples", "amblyomma_dl_4gbcs6_2020", "multimedia.txt")
    urls = [line.split("\t")[3] for line in media.read_text().splitlines()[1:7]]
    output = str(tmp_path / "out")
    with GbifApi() as api, FaultServer() as pictures:
        for i, url in enumerate(urls):
            path = "/inat/" + url.split("static.inaturalist.org/", 1)[1].split("?")[0]
            pictures.add(path, jpeg_bytes(synthetic_photo(i, size=(200, 150))))
        api.add(Download(key, data.read_bytes(), doi="10.15468/dl.4gbcs6",
                         statuses=["RUNNING", "SUCCEEDED"], total_records=1310,
                         number_datasets=24, created="2020-07-16T10:01:28.134+0000",
                         modified="2020-07-16T10:04:13.960+0000"))
        assert main(["run", "--gbif_download", key, "--model", tiny_model, "--output", output,
                     "--gbif_api", api.root, "--max_images", "6", "--quiet", "--mirror",
                     f"https://static.inaturalist.org/={pictures.url('/inat/')}", *QUICK]) == 0
    manifest = read_manifest(output)
    assert manifest["counts"]["embedded"] == 6
    assert manifest["export"]["download_key"] == key  # from its metadata.xml and the API alike
    assert manifest["export"]["gbif_download"]["total_records"] == 1310
    report = open(os.path.join(output, read_latest(output), "report.html"),
                  encoding="utf-8").read()
    assert "Cite the data as: GBIF.org (16 July 2020) GBIF Occurrence Download " \
           '<a href="https://doi.org/10.15468/dl.4gbcs6">' in report


def test_ctrl_c_while_waiting_prints_how_to_resume(tmp_path):
    output = tmp_path / "out"
    model = tmp_path / "model"
    model.mkdir()
    key = "0012345-261130080001234"
    with GbifApi(ACCOUNT["GBIF_USER"], ACCOUNT["GBIF_PWD"], ACCOUNT["GBIF_EMAIL"]) as api:
        api.next_download = Download(key, b"PK never served", statuses=["PREPARING", "RUNNING"])
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--gbif_dataset", DMS, "--model",
             str(model), "--output", str(output), "--gbif_api", api.root,
             "--gbif_poll_seconds", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
            env=_environment(**ACCOUNT))
        deadline = time.monotonic() + 120
        while len(api.requests("GET", f"/v1/occurrence/download/{key}")) < 3:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"stopped by SIGINT while waiting for GBIF download {key}" in stderr
    assert stderr.strip().endswith(f"--gbif_api {api.root} --gbif_poll_seconds 0.05 "
                                   f"--gbif_download {key}")
    assert "--gbif_dataset" not in stderr.splitlines()[-1]
    assert not output.exists()  # nothing touched, not even the download folder
    for secret in ACCOUNT.values():
        assert secret not in stdout + stderr


@pytest.mark.parametrize("state", ["FAILED", "KILLED", "CANCELLED"])
def test_a_failed_download_ends_the_run_before_the_output_is_touched(tmp_path, capsys, state):
    output = tmp_path / "out"
    (output / "snapshot-20261101T000000.000000Z-abcd").mkdir(parents=True)
    (output / "LATEST").write_text("snapshot-20261101T000000.000000Z-abcd\n")
    before = sorted(os.listdir(output))
    key = "0012345-261130080001234"
    with GbifApi() as api:
        api.add(Download(key, b"", statuses=["RUNNING", state]))
        code = main(["run", "--gbif_download", key, "--model", str(tmp_path),
                     "--output", str(output), "--gbif_api", api.root,
                     "--gbif_poll_seconds", "0.02"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err == [err[0]] and err[0].startswith(f"gbif-embed run: error: GBIF download {key} "
                                                 f"is {state}")
    assert sorted(os.listdir(output)) == before
    assert (output / "LATEST").read_text() == "snapshot-20261101T000000.000000Z-abcd\n"
