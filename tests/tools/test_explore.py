"""gbif-embed explore and suspects: the index, filters inside the search, the map,
suspects, the server's API over real HTTP, bad uploads, and the page in a real
headless Chromium (Debian's chromium and chromedriver, driven by selenium)."""
from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import jpeg_bytes, make_sample, synthetic_photo
from pipeline.tools.explore.index import Explorer, Filters, cache_folder, ensure_built
from pipeline.tools.explore.layout import layout
from pipeline.tools.explore.records import (NON_COMMERCIAL, REUSABLE, RESTRICTED,
                                            licence_class)
from pipeline.tools.explore.suspects import compute
from pipeline.tools.query import open_snapshot
from tests.tools.test_evaluate import DIM, row, write_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- helpers

def clustered_rows(species: int = 4, per: int = 6, seed: int = 3) -> list[dict]:
    """Species clusters; licences and ids vary so that filters have something to pick."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((species, DIM)) * 3
    licences = ("http://creativecommons.org/licenses/by/4.0/", "CC_BY_NC_4_0", "")
    rows = []
    for s in range(species):
        for i in range(per):
            one = row(1000 + s * 100 + i, f"Species {s}", centres[s] + rng.standard_normal(DIM))
            one["license"] = licences[i % 3]
            one["image_sha256"] = f"{s:02d}{i:02d}" + "a" * 60
            rows.append(one)
    return rows


def explorer_of(output: str) -> Explorer:
    snapshot = open_snapshot(output)
    return Explorer.load(snapshot, ensure_built(snapshot))


@contextlib.contextmanager
def serving(output: str) -> Iterator[str]:
    """The explorer's app on a real uvicorn server on loopback; yields its base URL."""
    import uvicorn
    from pipeline.tools.explore.photos import Photos
    from pipeline.tools.explore.pictures import Pictures
    from pipeline.tools.explore.server import create_app
    explorer = explorer_of(output)
    photos = Photos(explorer.snapshot)
    photos.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(explorer, Pictures(explorer.snapshot),
                                                      photos), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    photos.wait(300)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def fetch(url: str, data: Optional[bytes] = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def get_json(url: str, data: Optional[bytes] = None) -> tuple[int, dict]:
    status, body, _ = fetch(url, data)
    return status, json.loads(body)


# ---------------------------------------------------------------- the index and filters

def test_licence_classes():
    assert licence_class("http://creativecommons.org/publicdomain/zero/1.0/") == REUSABLE
    assert licence_class("CC_BY_4_0") == REUSABLE
    assert licence_class("https://creativecommons.org/licenses/by-sa/4.0/") == REUSABLE
    assert licence_class("CC_BY_NC_4_0") == NON_COMMERCIAL
    assert licence_class("http://creativecommons.org/licenses/by-nc/4.0/") == NON_COMMERCIAL
    assert licence_class("© All rights reserved") == RESTRICTED
    assert licence_class("") == RESTRICTED and licence_class(None) == RESTRICTED
    assert licence_class("http://creativecommons.org/licenses/by-nd/4.0/") == RESTRICTED


def test_search_is_exact_excludes_the_own_occurrence_and_filters_inside(tmp_path):
    rows = clustered_rows()
    rows.append(dict(rows[0], identifier="http://127.0.0.1:9/second.jpg"))  # same occurrence
    output = str(tmp_path / "out")
    write_snapshot(output, rows)
    explorer = explorer_of(output)
    assert explorer.size == len(rows)
    vectors = np.stack([r["embedding"] for r in rows]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    found = explorer.search(vectors[0], 5, exclude_occurrence=explorer.rows([0])[0]["occurrence"])
    expected = [int(i) for i in np.argsort(-(vectors @ vectors[0]))
                if rows[i]["gbifID"] != rows[0]["gbifID"]][:5]
    assert [r for r, _ in found] == expected
    assert all(explorer.rows([r])[0]["gbifID"] != rows[0]["gbifID"] for r, _ in found)

    # A filter that keeps only another species: still k results (filtering after the
    # search would return none of them, since the query's own species is nearer).
    mask = explorer.filter_mask(Filters(taxon="Species 3"))
    found = explorer.search(vectors[0], 5, mask)
    assert len(found) == 5
    assert {explorer.rows([r])[0]["scientificName"] for r, _ in found} == {"Species 3"}
    reusable = explorer.filter_mask(Filters(licence=REUSABLE))
    found = explorer.search(vectors[0], 50, reusable)
    assert len(found) == int(reusable.sum()) == sum(
        licence_class(r["license"]) == REUSABLE for r in rows)
    assert all(licence_class(rows[r]["license"]) == REUSABLE for r, _ in found)
    assert explorer.find_id(str(rows[5]["gbifID"])) == 5
    assert explorer.find_id("urn:occ:1101") == 7
    name, named = explorer.find_name("species 2")
    assert name == "Species 2" and named == list(range(12, 18))
    assert explorer.find_name("Spec")[0].startswith("Species")


def test_the_snapshot_without_export_fields_says_so(tmp_path):
    output = str(tmp_path / "out")
    write_snapshot(output, clustered_rows(2, 3))
    info = ensure_built(open_snapshot(output))
    assert "export.zip" in info["export_fields_missing"] and info["ranks"] == []
    assert os.path.exists(os.path.join(cache_folder(open_snapshot(output)), "records.parquet"))


def test_layout_separates_clusters_with_umap_and_placement():
    """UMAP on a sample, the rest placed by neighbours: clusters stay apart."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 32)) * 4
    labels = np.repeat(np.arange(3), 80)
    vectors = (centres[labels] + rng.standard_normal((240, 32))).astype(np.float32)
    xy = layout(vectors, sample=120)
    assert xy.shape == (240, 2) and xy.min() >= 0 and xy.max() <= 1
    means = np.stack([xy[labels == c].mean(axis=0) for c in range(3)])
    spread = max(np.linalg.norm(xy[labels == c] - means[c], axis=1).mean() for c in range(3))
    gaps = min(np.linalg.norm(means[a] - means[b]) for a in range(3) for b in range(a + 1, 3))
    assert gaps > 2 * spread


@pytest.mark.parametrize("index", ["exact", "inverted"])
def test_suspects_rank_swapped_names_first(tmp_path, monkeypatch, index):
    if index == "inverted":  # the faiss IVF path that large snapshots take
        monkeypatch.setattr("pipeline.tools.explore.suspects.EXACT_LIMIT", 10)
    rows = clustered_rows(species=5, per=8, seed=5)
    swapped = [3, 17, 30]
    for i in swapped:  # a picture of species s named as the next species
        rows[i]["scientificName"] = f"Species {(i // 8 + 1) % 5}"
    output = str(tmp_path / "out")
    write_snapshot(output, rows)
    table = compute(explorer_of(output), k=5)
    top = table.column("row").to_pylist()[:len(swapped)]
    assert sorted(top) == swapped
    suggested = table.column("suggested_name").to_pylist()[:len(swapped)]
    assert sorted(suggested) == sorted(f"Species {i // 8}" for i in swapped)
    assert all(s > 0.5 for s in table.column("score").to_pylist()[:len(swapped)])


# ---------------------------------------------------------------- a real run's snapshot

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_model):
    """A real run of the demo export (pictures on loopback) with the tiny model:
    snapshot, image store, thumbnails, manifest; yields (output, sample)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipeline.launch import run
    root = tmp_path_factory.mktemp("explore-demo")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    with serve_folder(str(images)) as base_url:
        sample = make_sample(str(root / "data"), base_url, 12, photo_size=(400, 300))
        output = str(root / "output")
        run(PipelineOptions(["--export", sample.export, "--model", tiny_model, "--output", output,
                             "--allow_private_networks", "127.0.0.1/32", "--quiet"]))
    yield output, sample


@pytest.fixture(scope="module")
def demo_server(demo_run):
    output, _ = demo_run
    with serving(output) as base:
        yield base


def test_api_searches_by_id_name_and_photo_with_export_fields(demo_run, demo_server):
    output, sample = demo_run
    base = demo_server
    status, info = get_json(f"{base}/api/info")
    assert status == 200 and info["rows"] > 10 and info["model"]["status"] == "ready"
    assert info["countries"] == ["DK"] and "genus" in info["ranks"] and info["missing"] == []
    occurrence = sample.occurrences[0]
    status, found = get_json(f"{base}/api/search?q={occurrence.gbifID}&k=5")
    assert status == 200 and found["query"]["gbifID"] == int(occurrence.gbifID)
    assert len(found["results"]) == 5
    assert all(r["gbifID"] != found["query"]["gbifID"] for r in found["results"])
    first = found["results"][0]
    assert first["country"] == "DK" and first["year"] and first["eventDate"]
    assert first["link"] == f"https://www.gbif.org/occurrence/{first['gbifID']}"
    assert first["creator"] and first["license"] and first["thumb"]
    scores = [r["similarity"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True)

    genus = occurrence.scientificName.split()[0]
    status, named = get_json(f"{base}/api/search?q={genus.lower()}&k=3")
    assert status == 200 and named["query"]["scientificName"].startswith(genus)

    photo = jpeg_bytes(synthetic_photo(7, species=1, size=(300, 200)))
    status, by_photo = get_json(f"{base}/api/photo?k=4", photo)
    assert status == 200 and len(by_photo["results"]) == 4

    status, filtered = get_json(f"{base}/api/search?q={occurrence.gbifID}&k=50"
                                f"&rank=genus&taxon={genus}&year_from=2018&year_to=2022")
    assert status == 200 and filtered["results"]
    assert all(r["genus"] == genus and 2018 <= r["year"] <= 2022 for r in filtered["results"])
    status, none = get_json(f"{base}/api/search?q={occurrence.gbifID}&country=SE")
    assert status == 200 and none["results"] == []


def test_bad_uploads_get_a_clear_message_and_change_nothing(demo_server):
    base = demo_server
    status, body = get_json(f"{base}/api/photo", b"this is not a picture")
    assert status == 400 and "not a picture" in body["error"]
    # Too large: refused from its declared length, before the body is read.
    connection = http.client.HTTPConnection(base.split("//")[1], timeout=60)
    connection.putrequest("POST", "/api/photo")
    connection.putheader("Content-Length", str(21 * 1024 * 1024))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 400 and "too large" in json.loads(response.read())["error"]
    connection.close()
    bomb = io.BytesIO()
    Image.new("1", (12_000, 10_000)).save(bomb, "PNG")  # 120 Mpx in ~20 kB
    status, body = get_json(f"{base}/api/photo", bomb.getvalue())
    assert status == 400 and "decompression bomb" in body["error"]
    status, info = get_json(f"{base}/api/info")
    assert status == 200 and info["model"]["status"] == "ready"


def test_thumbnails_only_by_content_hash(demo_server):
    base = demo_server
    _, found = get_json(f"{base}/api/search?q=a&k=1")
    sha = found["results"][0]["image_sha256"]
    status, body, headers = fetch(f"{base}/thumb/{sha}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size[0] <= 240
    for bad in ("..%2F..%2Fetc%2Fpasswd", "0" * 64, sha.upper(), sha[:-1], "%2Fetc%2Fpasswd"):
        assert fetch(f"{base}/thumb/{bad}")[0] == 404
    for bad in ("../manifest.json", "index.html", "..%2Fserver.py"):
        assert fetch(f"{base}/static/{bad}")[0] == 404


def test_suspects_csv_from_the_command_and_the_page(demo_run, demo_server, capsys):
    output, _ = demo_run
    path = os.path.join(os.path.dirname(output), "suspects.csv")
    assert main(["suspects", "--output", output, "--csv", path]) == 0
    assert "suspect records" in capsys.readouterr().out
    with open(path) as handle:
        listed = list(csv.DictReader(handle))
    assert listed and list(listed[0])[:4] == ["rank", "score", "scientificName", "suggested_name"]
    assert all(r["scientificName"] != r["suggested_name"] for r in listed)
    assert all(r["link"].startswith("https://www.gbif.org/occurrence/") for r in listed)
    status, body, headers = fetch(f"{demo_server}/suspects.csv")
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert len(list(csv.DictReader(io.StringIO(body.decode())))) == len(listed)


def test_a_snapshot_without_store_thumbnails_or_model_still_searches(tmp_path):
    output = str(tmp_path / "out")
    write_snapshot(output, clustered_rows(3, 4))  # model /nowhere/model, no store, no export
    with serving(output) as base:
        status, info = get_json(f"{base}/api/info")
        missing = " ".join(info["missing"])
        assert "no image store" in missing and "kept no thumbnails" in missing
        assert "/nowhere/model is gone" in missing and "export.zip" in missing
        status, found = get_json(f"{base}/api/search?q=1000&k=3")
        assert status == 200 and len(found["results"]) == 3
        assert not any(r["thumb"] for r in found["results"])
        status, body = get_json(f"{base}/api/photo", jpeg_bytes(synthetic_photo(1)))
        assert status == 400 and "search by photo is off" in body["error"]


def test_the_explore_command_serves_on_loopback(demo_run):
    output, _ = demo_run
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "explore", "--output", output, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        line = process.stdout.readline()
        assert " at http://127.0.0.1:" in line, line
        url = line.split(" at ", 1)[1].split()[0]
        status, info = get_json(f"{url}api/info")
        assert status == 200 and info["rows"] > 10
    finally:
        process.terminate()
        process.wait(30)


# ---------------------------------------------------------------- the page in Chromium

def _driver(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver to drive the explorer page "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them); "
                    "absent here")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1500", "--no-first-run", "--disable-background-networking",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _wait(driver, condition, timeout: float = 120):
    """Wait for `condition`; an element the page re-rendered meanwhile only means "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def _hit_texts(driver) -> list[str]:
    """The results' texts read in one script, so a re-render cannot come between them."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results figure.hit')].map(h => h.innerText)")


def _results_for(driver, description: str):
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import TimeoutException
    try:
        _wait(driver, lambda d: description in d.find_element(By.ID, "desc").text)
    except TimeoutException:
        raise AssertionError(f"no results for {description!r}: the page says "
                             f"{driver.find_element(By.ID, 'desc').text!r}, error "
                             f"{driver.find_element(By.ID, 'error').text!r}") from None
    return _hit_texts(driver)


def _shot(driver, tmp_path, name: str) -> Image.Image:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    keep = os.environ.get("GBIF_EMBED_SCREENSHOTS")
    if keep:  # the README's screenshot: GBIF_EMBED_SCREENSHOTS=docs pytest ...
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, f"explore-{name}.png"))
    return Image.open(path).convert("RGB")


def test_the_page_in_headless_chromium(demo_run, demo_server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    output, sample = demo_run
    driver = _driver(tmp_path)
    try:
        driver.get(demo_server + "/")
        _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert driver.find_element(By.ID, "snapshot").text == open_snapshot(output).name

        # By occurrence id.
        occurrence = sample.occurrences[0]
        box = driver.find_element(By.ID, "q")
        box.send_keys(str(occurrence.gbifID))
        driver.find_element(By.ID, "search").click()
        hits = _results_for(driver, f"occurrence {occurrence.gbifID}")
        assert len(hits) == 10
        query = driver.find_element(By.CSS_SELECTOR, "#query figure.query")
        assert occurrence.scientificName.split()[0] in query.text
        _wait(driver, lambda d: all(d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && "
            "i.naturalWidth > 0)") for _ in [0]))
        assert driver.find_elements(By.CSS_SELECTOR, "#results img")
        assert all("DK" in h and "gbifID" in h for h in hits)
        image = _shot(driver, tmp_path, "search")
        assert np.asarray(image, np.float32).std() > 20  # pictures and a map, not blank

        # By name.
        genus = occurrence.scientificName.split()[0]
        box.clear()
        box.send_keys(genus.lower())
        driver.find_element(By.ID, "search").click()
        hits = _results_for(driver, f"{genus}")
        assert hits and genus in hits[0]

        # A filter, applied inside the search: every result passes it.
        Select(driver.find_element(By.ID, "rank")).select_by_value("genus")
        taxon = driver.find_element(By.ID, "taxon")
        other = next(o.scientificName.split()[0] for o in sample.occurrences
                     if not o.scientificName.startswith(genus))
        taxon.send_keys(other)
        driver.find_element(By.ID, "apply").click()
        _wait(driver, lambda d: (texts := _hit_texts(d)) and all(other in t for t in texts))
        driver.find_element(By.ID, "clear").click()
        _wait(driver, lambda d: not d.find_element(By.ID, "taxon").get_attribute("value"))

        # A photo from the file input, then a dropped file that is not a picture.
        photo = tmp_path / "my-photo.jpg"
        photo.write_bytes(jpeg_bytes(synthetic_photo(3, species=2, size=(500, 400))))
        driver.find_element(By.ID, "photo").send_keys(str(photo))
        assert len(_results_for(driver, "your photo")) == 10
        driver.execute_script("""
            const data = new DataTransfer();
            data.items.add(new File(["not a picture"], "notes.txt", {type: "text/plain"}));
            document.getElementById('drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));""")
        error = driver.find_element(By.ID, "error")
        _wait(driver, lambda d: error.is_displayed() and "not a picture" in error.text)
        _shot(driver, tmp_path, "bad-upload")

        # A point of the map: its picture and neighbours.
        canvas = driver.find_element(By.ID, "map")
        row, x, y = driver.execute_script("""
            const r = document.getElementById('map').getBoundingClientRect();
            let best = 0, bestD = 9;
            for (let i = 0; i < state.xy.length / 2; i++) {  // the point nearest the centre
              const d = (state.xy[2 * i] - 0.5) ** 2 + (state.xy[2 * i + 1] - 0.5) ** 2;
              if (d < bestD) { bestD = d; best = i; }
            }
            return [best, (state.xy[2 * best] - 0.5) * r.width, (state.xy[2 * best + 1] - 0.5) * r.height];""")
        ActionChains(driver).move_to_element_with_offset(canvas, round(x), round(y)).click().perform()
        _results_for(driver, "map point")
        assert driver.find_element(By.CSS_SELECTOR, "#query figure.query").get_attribute(
            "data-row") is not None
        assert driver.find_element(By.CSS_SELECTOR, "#query figure.query")
        Select(driver.find_element(By.ID, "colour")).select_by_value("genus")
        _wait(driver, lambda d: genus in d.find_element(By.ID, "legend").text)
        _shot(driver, tmp_path, "map")

        # The suspects view.
        driver.find_element(By.ID, "tab-suspects").click()
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#suspects tr.suspect"))
        first = driver.find_element(By.CSS_SELECTOR, "#suspects tr.suspect")
        own = first.find_element(By.CSS_SELECTOR, "td.own").text
        suggested = first.find_element(By.CSS_SELECTOR, "td.suggested").text
        assert own and suggested and own != suggested
        assert driver.find_element(By.ID, "suspects-csv").get_attribute("href").endswith(
            "/suspects.csv")
        _shot(driver, tmp_path, "suspects")
    finally:
        driver.quit()
