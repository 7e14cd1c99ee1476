"""Tests of pipeline.demo.sample_data: the synthetic downloads must look like GBIF's real ones."""
from __future__ import annotations

import csv
import io
import itertools
import os
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.demo import sample_data as sd
from pipeline.demo.sample_data import Media, Occurrence

REAL = "/work/shared/data/gbif-samples/amblyomma_dl_4gbcs6_2020"
DWC_TEXT = "{http://rs.tdwg.org/dwc/text/}"
KEY, DOI = "0012345-260101120000000", "10.15468/dl.test42"
MULTIMEDIA_HEADER = ("gbifID type format identifier references title description source "
                     "audience created creator contributor publisher license rightsHolder").split()
BASE = "http://127.0.0.1:8123/"


# ----------------------------------------------------------------- pictures

def test_photo_is_deterministic_and_sized():
    a = sd.synthetic_photo(7, species=2, size=(200, 150))
    b = sd.synthetic_photo(7, species=2, size=(200, 150))
    assert a.mode == "RGB" and a.size == (200, 150)
    assert a.tobytes() == b.tobytes()
    assert sd.jpeg_bytes(a) == sd.jpeg_bytes(b)
    assert a.tobytes() != sd.synthetic_photo(8, species=2, size=(200, 150)).tobytes()


def test_pictures_of_one_species_look_alike():
    size, seeds, species = (96, 72), range(5), range(5)
    pics = {(sp, s): np.asarray(sd.synthetic_photo(s, sp, size), dtype=np.float32)
            for sp in species for s in seeds}
    within, across = [], []
    for (k1, p1), (k2, p2) in itertools.combinations(pics.items(), 2):
        (within if k1[0] == k2[0] else across).append(np.abs(p1 - p2).mean())
    assert np.mean(within) < 0.85 * np.mean(across)


def test_species_past_the_table_still_stable():
    assert sd.fungus(42) == sd.fungus(42)
    img = sd.synthetic_photo(1, species=42, size=(64, 48))
    assert img.tobytes() == sd.synthetic_photo(1, species=42, size=(64, 48)).tobytes()


def test_jpeg_bytes_exif_orientation_and_modes():
    img = sd.synthetic_photo(1, 0, (120, 80))
    plain = Image.open(io.BytesIO(sd.jpeg_bytes(img)))
    assert plain.format == "JPEG" and plain.getexif().get(0x0112) is None
    rotated = Image.open(io.BytesIO(sd.jpeg_bytes(img, exif_orientation=6)))
    assert rotated.getexif().get(0x0112) == 6
    assert ImageOps.exif_transpose(rotated).size == (80, 120)
    gray = Image.open(io.BytesIO(sd.jpeg_bytes(img.convert("L"))))
    assert gray.mode == "L"
    with pytest.raises(ValueError):
        sd.jpeg_bytes(img, exif_orientation=9)


# ----------------------------------------------------------------- the archive

def _occurrences(n: int = 3, dataset: str = sd.DMS_DATASET_KEY) -> list[Occurrence]:
    return [Occurrence(4_000_000_000 + i, f"obs-{i}", dataset, 2_500_000 + i,
                       "Boletus edulis Bull.", locality="tab\there\nnewline") for i in range(n)]


def _media(occs: list[Occurrence]) -> list[Media]:
    return [Media(o.gbifID, f"{BASE}{o.gbifID}.JPG", creator="A B", rightsHolder="A B")
            for o in occs]


def _read(dest: str, as_zip: bool) -> dict[str, str]:
    if as_zip:
        with zipfile.ZipFile(dest) as zf:
            return {n: zf.read(n).decode("utf-8") for n in zf.namelist()}
    out = {}
    for root, _, names in os.walk(dest):
        for name in names:
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", newline="") as f:
                out[os.path.relpath(path, dest).replace(os.sep, "/")] = f.read()
    return out


def _rows(text: str) -> list[list[str]]:
    """Read like a GBIF-aware reader must: tab-separated, quoting off."""
    return list(csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                           quoting=csv.QUOTE_NONE))


MEMBERS = {"meta.xml", "metadata.xml", "occurrence.txt", "verbatim.txt", "multimedia.txt",
           "citations.txt", "rights.txt", f"dataset/{sd.DMS_DATASET_KEY}.xml"}


@pytest.mark.parametrize("as_zip", [True, False])
def test_write_dwca_members(tmp_path, as_zip):
    occs = _occurrences(2) + _occurrences(1, dataset="0b1c2d3e-0000-4000-8000-000000000001")
    occs[2].gbifID += 10
    dest = str(tmp_path / ("dl.zip" if as_zip else "dl"))
    assert sd.write_dwca(dest, occs, _media(occs), as_zip=as_zip) == dest
    files = _read(dest, as_zip)
    assert set(files) == MEMBERS | {"dataset/0b1c2d3e-0000-4000-8000-000000000001.xml"}
    if as_zip:   # flat root plus dataset/, no folder above it, as GBIF's zips
        assert all(n.count("/") == 0 or n.startswith("dataset/") for n in files)
    assert files["rights.txt"].startswith("\nDataset: ")
    assert files["citations.txt"].startswith("When using this dataset please use")
    assert len(files["citations.txt"].splitlines()) == 3


def test_write_dwca_zip_is_reproducible(tmp_path):
    occs = _occurrences()
    a = sd.write_dwca(str(tmp_path / "a.zip"), occs, _media(occs))
    b = sd.write_dwca(str(tmp_path / "b.zip"), occs, _media(occs))
    assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize("order", [("verbatim", "multimedia"), ("multimedia", "verbatim")])
def test_meta_xml_declares_files_in_order(tmp_path, order):
    occs = _occurrences()
    files = _read(sd.write_dwca(str(tmp_path / "d"), occs, _media(occs), as_zip=False,
                                extension_order=order), False)
    root = ET.fromstring(files["meta.xml"])
    assert root.tag == DWC_TEXT + "archive" and root.get("metadata") == "metadata.xml"
    core = root.find(DWC_TEXT + "core")
    extensions = root.findall(DWC_TEXT + "extension")
    assert [e.find(f"{DWC_TEXT}files/{DWC_TEXT}location").text for e in extensions] == \
        [f"{name}.txt" for name in order]
    assert core.find(f"{DWC_TEXT}files/{DWC_TEXT}location").text == "occurrence.txt"
    assert core.get("rowType") == "http://rs.tdwg.org/dwc/terms/Occurrence"
    assert core.find(DWC_TEXT + "id").get("index") == "0"
    for block in [core] + extensions:
        assert block.get("encoding") == "UTF-8"
        assert block.get("fieldsTerminatedBy") == "\\t"
        assert block.get("linesTerminatedBy") == "\\n"
        assert block.get("fieldsEnclosedBy") == ""
        assert block.get("ignoreHeaderLines") == "1"
        location = block.find(f"{DWC_TEXT}files/{DWC_TEXT}location").text
        header = files[location].split("\n", 1)[0].split("\t")
        terms = [f.get("term") for f in block.findall(DWC_TEXT + "field")]
        assert [int(f.get("index")) for f in block.findall(DWC_TEXT + "field")] == \
            list(range(len(header)))
        assert [t.rsplit("/", 1)[1] for t in terms] == header   # full URIs, same columns
        assert all(t.startswith("http://") for t in terms)
        assert header[0] == "gbifID"
        if block is not core:
            assert block.find(DWC_TEXT + "coreid").get("index") == "0"
    media = next(e for e in extensions
                 if e.get("rowType") == "http://rs.gbif.org/terms/1.0/Multimedia")
    assert [f.get("term").rsplit("/", 1)[1] for f in media.findall(DWC_TEXT + "field")] == \
        MULTIMEDIA_HEADER


def test_tables_are_gbif_text(tmp_path):
    occs = _occurrences()
    media = _media(occs)
    media[0].gbifID = f" {occs[0].gbifID} "
    media[1].description = '"bare quote'
    files = _read(sd.write_dwca(
        str(tmp_path / "d"), occs, media, as_zip=False,
        verbatim_associated_media={occs[0].gbifID: "http://x/1.jpg | http://x/2.jpg"},
        extra_multimedia_lines=["123\tStillImage", "garbage"]), False)
    mm = _rows(files["multimedia.txt"])
    assert mm[0] == MULTIMEDIA_HEADER
    assert all(len(r) == 15 for r in mm[1:4])
    assert mm[1][0] == f" {occs[0].gbifID} " and mm[2][6] == '"bare quote'
    assert mm[4:] == [["123", "StillImage"], ["garbage"]]
    occ = _rows(files["occurrence.txt"])
    assert occ[0][0] == "gbifID" and len(occ) == 4 and all(len(r) == len(occ[0]) for r in occ)
    assert occ[1][occ[0].index("locality")] == "tab here newline"   # GBIF's replacement
    assert occ[1][occ[0].index("taxonKey")] == str(occs[0].taxonKey)
    verbatim = _rows(files["verbatim.txt"])
    assert verbatim[1][verbatim[0].index("associatedMedia")] == "http://x/1.jpg | http://x/2.jpg"
    assert all(line for line in files["multimedia.txt"].split("\n")[:-1])
    assert files["multimedia.txt"].endswith("\n") and "\r" not in files["multimedia.txt"]


def test_without_multimedia(tmp_path):
    occs = _occurrences()
    files = _read(sd.write_dwca(str(tmp_path / "d.zip"), occs, _media(occs),
                                include_multimedia=False), True)
    assert "multimedia.txt" not in files and "verbatim.txt" in files
    assert "multimedia.txt" not in files["meta.xml"]
    assert "Multimedia" not in files["meta.xml"]


def _paths(element: ET.Element, prefix: str = "") -> set[str]:
    path = f"{prefix}/{element.tag}"
    return {path}.union(*(_paths(child, path) for child in element))


def test_metadata_xml_carries_doi_and_key(tmp_path):
    occs = _occurrences()
    files = _read(sd.write_dwca(str(tmp_path / "d.zip"), occs, _media(occs),
                                download_key=KEY, doi=DOI), True)
    eml = ET.fromstring(files["metadata.xml"].encode())
    assert eml.get("packageId") == DOI
    assert eml.findtext("dataset/alternateIdentifier") == KEY
    assert eml.findtext("dataset/title") == f"GBIF Occurrence Download {DOI}"
    assert eml.findtext("dataset/pubDate").strip() == "2026-01-01"
    assert eml.find("additionalMetadata/metadata/gbif/citation").get("identifier") == DOI
    assert eml.findtext(".//url").endswith(f"/{KEY}.zip")
    assert "3 records from Danish Mycological Society" in eml.findtext("dataset/abstract/para")
    ds = ET.fromstring(files[f"dataset/{sd.DMS_DATASET_KEY}.xml"].encode())
    assert ds.get("packageId") == sd.DMS_DATASET_KEY
    assert ds.findtext("dataset/alternateIdentifier") == "10.15468/zn159h"


@pytest.mark.skipif(not os.path.isdir(REAL), reason="real GBIF sample not available")
def test_same_structure_as_a_real_gbif_download(tmp_path):
    occs = _occurrences()
    files = _read(sd.write_dwca(str(tmp_path / "d.zip"), occs, _media(occs)), True)
    real_eml = ET.parse(os.path.join(REAL, "metadata.xml")).getroot()
    assert _paths(ET.fromstring(files["metadata.xml"].encode())) == _paths(real_eml)
    real_meta = ET.parse(os.path.join(REAL, "meta.xml")).getroot()
    ours = ET.fromstring(files["meta.xml"])
    assert ours.attrib == real_meta.attrib
    for theirs, mine in zip(real_meta, ours):
        assert (theirs.tag, theirs.attrib) == (mine.tag, mine.attrib)
        assert [c.tag for c in theirs][:2] == [c.tag for c in mine][:2]
    real_mm = [f.get("term") for f in real_meta[2].findall(DWC_TEXT + "field")]
    assert real_mm == [f.get("term") for f in ours[2].findall(DWC_TEXT + "field")]
    # Every term we write is spelt as GBIF spells it in the real core/verbatim.
    real_terms = {f.get("term") for f in real_meta.iter(DWC_TEXT + "field")}
    assert {f.get("term") for f in ours.iter(DWC_TEXT + "field")} <= real_terms
    with open(os.path.join(REAL, "multimedia.txt"), encoding="utf-8") as f:
        assert f.readline().rstrip("\n").split("\t") == MULTIMEDIA_HEADER


# ----------------------------------------------------------------- make_sample

def _decode(path: str) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def test_make_sample_expectations_add_up(tmp_path):
    s = sd.make_sample(str(tmp_path), BASE, n_occurrences=8, seed=3, species=3,
                       photo_size=(160, 120))
    assert s.export.endswith(".zip") and os.path.isfile(s.export)
    ids = [m.identifier for m in s.media]
    assert len(ids) == len(set(ids))     # each identifier names one row
    skipped = [m for m in s.media if m.type != "StillImage" or not m.identifier]
    assert s.expected_skips == {"not_still_image": 1, "empty_identifier": 1}
    assert sum(s.expected_skips.values()) == len(skipped)
    fetched = [m.identifier for m in s.media if m not in skipped]
    assert set(fetched) == set(s.good_identifiers) | set(s.expected_failures)
    assert not set(s.good_identifiers) & set(s.expected_failures)
    assert s.expected_images == len(s.good_identifiers)
    assert len(s.media) == s.expected_images + len(s.expected_failures) + len(skipped)
    assert sorted(s.expected_failures.values()) == ["http_404", "not_an_image", "truncated"]

    def local(url: str) -> str:
        assert url.startswith(BASE)
        return os.path.join(s.images_dir, url[len(BASE):])

    for url in s.good_identifiers:        # every promised picture decodes
        _decode(local(url))
    bad = {reason: local(url) for url, reason in s.expected_failures.items()}
    assert not os.path.exists(bad["http_404"])
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(bad["not_an_image"])
    with pytest.raises(OSError, match="truncated"):
        _decode(bad["truncated"])
    modes = {_decode(local(u)).mode for u in s.good_identifiers}
    assert {"RGB", "L", "RGBA"} <= modes
    assert any(Image.open(local(u)).getexif().get(0x0112) == 6 for u in s.good_identifiers)

    occ_ids = {o.gbifID for o in s.occurrences}
    assert all(o.gbifID >= 4_000_000_000 and o.datasetKey == sd.DMS_DATASET_KEY
               for o in s.occurrences)
    assert {int(str(m.gbifID).strip()) for m in s.media} <= occ_ids
    assert any(isinstance(m.gbifID, str) and m.gbifID != m.gbifID.strip() for m in s.media)
    dms = [m for m in s.media if m.type == "StillImage" and m.identifier]
    assert all(m.creator == m.rightsHolder != "" for m in dms)
    assert {m.license for m in dms} == {"", sd.CC_BY_NC_URL}

    files = _read(s.export, True)
    assert set(files) == MEMBERS
    rows = _rows(files["multimedia.txt"])     # quoting off: the bare " swallows nothing
    assert len(rows) == 1 + len(s.media) and all(len(r) == 15 for r in rows)
    assert [r[3] for r in rows[1:]] == ids


def test_make_sample_without_problems_is_clean_and_reproducible(tmp_path):
    kw = dict(n_occurrences=5, seed=1, species=5, photo_size=(96, 72), as_zip=False,
              with_problems=False)
    a = sd.make_sample(str(tmp_path / "a"), BASE, **kw)
    b = sd.make_sample(str(tmp_path / "b"), BASE, **kw)
    assert os.path.isdir(a.export) and os.path.isfile(os.path.join(a.export, "meta.xml"))
    assert a.expected_failures == {} and a.expected_skips == {}
    assert a.expected_images == len(a.media)
    assert all(1 <= sum(m.gbifID == o.gbifID for m in a.media) <= 3 for o in a.occurrences)
    assert _read(a.export, False) == _read(b.export, False)
    assert sorted(os.listdir(a.images_dir)) == sorted(os.listdir(b.images_dir))
    for name in os.listdir(a.images_dir):
        with open(os.path.join(a.images_dir, name), "rb") as fa, \
                open(os.path.join(b.images_dir, name), "rb") as fb:
            assert fa.read() == fb.read()
    assert {o.scientificName for o in a.occurrences} == \
        {f.scientificName for f in sd.FUNGI[:5]}
