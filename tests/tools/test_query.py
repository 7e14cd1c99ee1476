"""`gbif-embed query` on a real snapshot: the pipeline run on a few synthetic
pictures served on loopback, with the tiny stand-in model."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import main, run
from pipeline.demo.demo import serve_folder
from pipeline.models.make_model import build_model
from pipeline.tools.query import QueryError, query
from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo, write_dwca
from transforms.write.snapshot import read_latest

LOOPBACK = "127.0.0.1/32"
DMS = "84d26682-f762-11e1-a439-00145eb45e9a"
SPECIES = ("Amanita muscaria", "Cantharellus cibarius", "Boletus edulis")


@dataclass
class Built:
    output: str
    images: str      # the served folder
    base_url: str
    model: str
    manifest: dict


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Six occurrences of three species; occurrence 100 has two pictures."""
    root = tmp_path_factory.mktemp("query")
    model = build_model(str(root / "tiny"), "tiny")
    images = root / "images"
    images.mkdir()
    names = []
    for i in range(7):
        name = f"photo-{i}.jpg"
        (images / name).write_bytes(jpeg_bytes(synthetic_photo(i, species=i % 3,
                                                               size=(320, 240))))
        names.append(name)
    with serve_folder(str(images)) as base_url:
        occurrences = [Occurrence(gbifID=100 + i, occurrenceID=f"urn:occ:{i}", datasetKey=DMS,
                                  taxonKey=5000 + i % 3, scientificName=SPECIES[i % 3])
                       for i in range(6)]
        media = [Media(gbifID=100 + i, identifier=base_url + names[i]) for i in range(6)]
        media.append(Media(gbifID=100, identifier=base_url + names[6]))
        export = write_dwca(str(root / "export.zip"), occurrences, media)
        output = str(root / "out")
        manifest = run(PipelineOptions(["--export", export, "--model", model,
                                        "--output", output, "--allow_private_networks",
                                        LOOPBACK, "--quiet"]))
        yield Built(output, str(images), base_url, model, manifest)


def test_the_run_wrote_a_report(built):
    assert built.manifest["counts"]["embedded"] == 7
    report = os.path.join(built.output, read_latest(built.output), "report.html")
    text = open(report).read()
    assert "Nearest neighbours" in text and text.count("data:image/jpeg;base64,") >= 6


def test_a_stored_picture_finds_itself_first(built):
    """Same bytes → same fetch-free decode, resize and model → similarity 1."""
    result = query(built.output, image=os.path.join(built.images, "photo-3.jpg"), k=4)
    first = result.neighbours[0]
    assert first["identifier"] == built.base_url + "photo-3.jpg"
    assert first["gbifID"] == 103 and first["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert first["link"] == "https://www.gbif.org/occurrence/103"
    assert len(result.neighbours) == 4
    similarities = [n["similarity"] for n in result.neighbours]
    assert similarities == sorted(similarities, reverse=True) and similarities[1] < 0.9999


def test_a_url_goes_through_the_fetcher_and_its_address_guard(built, capsys):
    url = built.base_url + "photo-4.jpg"
    result = query(built.output, image=url, k=3, allow_private_networks=LOOPBACK)
    assert result.neighbours[0]["gbifID"] == 104
    assert result.neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-4)

    with pytest.raises(QueryError, match="blocked_address"):
        query(built.output, image=url, k=3)
    assert main(["query", "--output", built.output, "--image", url]) == 2
    assert "--allow_private_networks" in capsys.readouterr().err


def test_cli_prints_names_similarities_and_gbif_links(built, capsys):
    code = main(["query", "--output", built.output, "--image",
                 os.path.join(built.images, "photo-1.jpg"), "--k", "3"])
    assert code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d\.\d{4}", line)]
    assert len(lines) == 3
    assert "101" in lines[0] and "Cantharellus cibarius" in lines[0]
    assert "https://www.gbif.org/occurrence/101" in lines[0]


def test_gbif_id_uses_the_first_stored_picture_and_leaves_its_occurrence_out(built):
    result = query(built.output, gbif_id=100, k=10)
    assert result.query_row["identifier"] == built.base_url + "photo-0.jpg"  # smallest
    ids = [n["gbifID"] for n in result.neighbours]
    assert 100 not in ids and sorted(ids) == [101, 102, 103, 104, 105]
    by_picture = query(built.output, image=os.path.join(built.images, "photo-0.jpg"), k=10)
    # The stored row's vector and the picture's, embedded now, agree within the
    # arithmetic of the CPU's kernels (oneDNN's or not), never to the last digit.
    expected = {n["gbifID"]: n["similarity"] for n in by_picture.neighbours
                if n["gbifID"] != 100}
    found = {n["gbifID"]: n["similarity"] for n in result.neighbours}
    assert found.keys() == expected.keys()
    for gbif_id, similarity in found.items():
        assert similarity == pytest.approx(expected[gbif_id], abs=5e-3), gbif_id
    similarities = [n["similarity"] for n in result.neighbours]
    assert similarities == sorted(similarities, reverse=True)

    with pytest.raises(QueryError, match="no embedding"):
        query(built.output, gbif_id=999)


def test_html_contact_sheet_is_self_contained_with_placeholders(built, tmp_path, capsys):
    """A neighbour whose picture is gone is shown as a placeholder with the reason."""
    missing = os.path.join(built.images, "photo-2.jpg")
    shutil.move(missing, str(tmp_path / "kept.jpg"))
    try:
        sheet = tmp_path / "sheet.html"
        assert main(["query", "--output", built.output, "--gbif_id", "103", "--k", "5",
                     "--html", str(sheet), "--allow_private_networks", LOOPBACK]) == 0
    finally:
        shutil.move(str(tmp_path / "kept.jpg"), missing)
    assert f"contact sheet: {sheet}" in capsys.readouterr().out
    page = sheet.read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "http_404" in page and "image unavailable" in page  # photo-2 (gbifID 102)
    assert page.count("https://www.gbif.org/occurrence/") == 6
    assert "Cantharellus cibarius" in page and not re.search(r'(src|href)="//', page)


def test_contact_sheet_of_a_picture_blocked_without_allowed_networks(built, tmp_path):
    sheet = tmp_path / "sheet.html"
    assert main(["query", "--output", built.output, "--image",
                 os.path.join(built.images, "photo-5.jpg"), "--k", "2",
                 "--html", str(sheet)]) == 0
    page = sheet.read_text()
    assert page.count("blocked_address") == 2  # the neighbours' loopback URLs
    assert page.count("data:image/jpeg;base64,") == 1  # the query's own bytes


def test_a_different_model_is_refused(built, tmp_path):
    other = build_model(str(tmp_path / "other"), "tiny", seed=1)
    with pytest.raises(QueryError, match="fingerprint"):
        query(built.output, image=os.path.join(built.images, "photo-0.jpg"), model=other)
    with pytest.raises(QueryError, match="does not exist"):
        query(built.output, image=os.path.join(built.images, "photo-0.jpg"),
              model=str(tmp_path / "nowhere"))


def test_a_file_that_is_no_picture_is_refused(built, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("<html>not a picture</html>")
    with pytest.raises(QueryError, match="not_an_image"):
        query(built.output, image=str(text))
    with pytest.raises(QueryError, match="cannot read"):
        query(built.output, image=str(tmp_path / "missing.jpg"))
