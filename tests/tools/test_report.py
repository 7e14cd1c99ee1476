"""report.html: what it says, that it is self-contained, and that a real
headless browser (Debian's chromium) renders it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.demo.demo import serve_folder
from pipeline.tools.evaluate import evaluate, write_evaluation
from pipeline.tools.report import REPORT, write_report
from pipeline.demo.sample_data import FUNGI, jpeg_bytes, synthetic_photo
from tests.tools.test_evaluate import DIM, row, write_snapshot
from transforms.common.files import join

SPECIES = 6
PER_SPECIES = 4
LOOPBACK = {"allow_private_networks": "127.0.0.1/32"}
MISSING = "sp0-occ1.jpg"  # listed in the snapshot, never served: a 404


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Synthetic fungus photos on a loopback server; yields (folder, base URL)."""
    folder = tmp_path_factory.mktemp("pictures")
    for species in range(SPECIES):
        for occurrence in range(PER_SPECIES):
            name = f"sp{species}-occ{occurrence}.jpg"
            if name != MISSING:
                photo = synthetic_photo(species * 10 + occurrence, species=species, size=(400, 300))
                (folder / name).write_bytes(jpeg_bytes(photo))
    with serve_folder(str(folder)) as base_url:
        yield str(folder), base_url


def fungus_rows(base_url: str) -> list[dict]:
    """Species clusters in embedding space, each image at its served URL."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((SPECIES, DIM))
    return [row(1000 + species * 10 + occurrence, FUNGI[species].scientificName,
                centres[species] + 0.6 * rng.standard_normal(DIM),
                identifier=f"{base_url}sp{species}-occ{occurrence}.jpg")
            for species in range(SPECIES) for occurrence in range(PER_SPECIES)]


def _report(output: str, folder: str) -> str:
    with fsspec.open(join(output, os.path.basename(folder), REPORT), "r") as handle:
        return handle.read()


def test_report_shows_counts_reasons_neighbours_and_placeholders(pictures, tmp_path):
    _, base_url = pictures
    output = str(tmp_path / "out")
    folder = write_snapshot(output, fungus_rows(base_url), options=LOOPBACK)
    path = write_report(output)
    assert path == join(folder, REPORT)
    page = _report(output, folder)

    assert "Outcomes" in page and "Failures by reason" in page and "Throughput" in page
    assert re.search(r"<td>fetch</td><td><code>http_404</code></td><td class=\"num\">1", page)
    assert "not_still_image" in page and "10.15468/dl.synth1" in page
    assert "gbif-embed evaluate --output" in page  # no evaluation yet: how to get one
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 30 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert page.count('class="query"') == 6 and page.count('class="hit"') == 30
    assert "image unavailable" in page and "<b>http_404</b>" in page  # MISSING, if sampled
    assert page.count('href="https://www.gbif.org/occurrence/') == 36
    # Self-contained: nothing loaded from elsewhere.
    assert not re.search(r'<(link|script)|src="(?!data:)|url\((?!data:)', page)

    result = evaluate(output)
    write_evaluation(output, result)
    write_report(output)
    page = _report(output, folder)
    assert "Retrieval quality" in page and "Recall@1" in page and "Recall@10" in page
    assert f"{result['recall']['5']:.3f}" in page and "0.399" in page


def test_thumbnails_respect_the_address_guard(pictures, tmp_path):
    """The run did not open loopback, so the report must not fetch from it either."""
    _, base_url = pictures
    output = str(tmp_path / "out")
    folder = write_snapshot(output, fungus_rows(base_url))
    write_report(output)
    page = _report(output, folder)
    assert "data:image/jpeg" not in page
    assert page.count("<b>blocked_address</b>") == 36


def test_a_refresh_reuses_thumbnails_of_unchanged_pictures(pictures, tmp_path):
    """Reused rows are not fetched again for the report; a changed picture is."""
    folder_served, base_url = pictures
    output = str(tmp_path / "out")
    rows = fungus_rows(base_url)
    first = write_snapshot(output, rows, options=LOOPBACK, name="snapshot-1")
    write_report(output)
    assert _report(output, first).count("data:image/jpeg") >= 30

    changed = dict(rows[5], image_sha256="f" * 64)  # new bytes at the same URL
    hidden = tmp_path / "hidden"
    shutil.move(folder_served, hidden)  # the host is gone: only the cache can help
    try:
        second = write_snapshot(output, rows[:5] + [changed] + rows[6:], options=LOOPBACK,
                                name="snapshot-2", previous="snapshot-1")
        write_report(output)
    finally:
        shutil.move(str(hidden), folder_served)
    page = _report(output, second)
    first_keys = set(re.findall(r'data-key="([0-9a-f]{32})"', _report(output, first)))
    second_keys = set(re.findall(r'data-key="([0-9a-f]{32})"', page))
    assert second_keys and second_keys <= first_keys  # every picture shown came from the cache
    # The changed picture is in the sample (seeded), so it had to be fetched: the host is gone.
    assert f'title="{changed["identifier"]}"><span>image unavailable</span><b>http_404</b>' in page


def test_report_on_gcs(pictures, gcs_bucket):
    _, base_url = pictures
    output = f"{gcs_bucket}/report-test"
    folder = write_snapshot(output, fungus_rows(base_url), options=LOOPBACK)
    assert write_report(output).startswith("gs://")
    assert "Nearest neighbours" in _report(output, folder)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("needs Debian's chromium to render report.html in a real browser "
                    "(apt-get install -y chromium; .ci/run installs it); absent here")
    return path


def _headless(browser: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    """Chromium as root in a container: no sandbox, no GPU, no network chatter."""
    os.makedirs(profile)
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(pictures, tmp_path):
    browser = _chromium()
    _, base_url = pictures
    output = str(tmp_path / "out")
    write_snapshot(output, fungus_rows(base_url), options=LOOPBACK)
    write_evaluation(output, evaluate(output))
    url = "file://" + write_report(output)

    png = tmp_path / "report.png"
    shot = _headless(browser, str(tmp_path / "profile-1"), f"--screenshot={png}",
                     "--window-size=1280,2000", url)
    assert png.exists(), shot.stderr[-3000:]
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 500  # text, tables and photographs, not blank
    header = image.getpixel((20, 20))
    assert header[1] > header[0] and sum(header) < 250  # the dark green header band
    thumbs = np.asarray(image.crop((60, 1000, 1220, 1900)), np.float32)
    assert thumbs.std() > 20  # the neighbour grid holds pictures

    dom = _headless(browser, str(tmp_path / "profile-2"), "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert dom.stdout.count("<table") >= 5
    assert "Recall@1" in dom.stdout and "Failures by reason" in dom.stdout
    assert len(re.findall(r"<img ", dom.stdout)) >= 30
