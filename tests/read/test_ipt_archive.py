"""A dataset's own archive, as an IPT publishes it: keyed by its occurrenceID.

Its rows join by the core id string and are keyed by it; gbifID is None
where the archive has none.
"""
from __future__ import annotations

import pytest

from tests.read.archives import (
    DC,
    DWC,
    GBIF,
    MULTIMEDIA,
    OCCURRENCE,
    Decl,
    accounted,
    eml,
    header_of,
    ipt_files,
    ipt_occurrences,
    meta_xml,
    read_tasks,
    table,
    write,
    write_ipt_archive,
)
from transforms.read.export import Archive, read_identity, read_spec

FORMS = ["zip", "folder"]
CC_BY = "http://creativecommons.org/licenses/by/4.0/legalcode"


@pytest.mark.parametrize("form", FORMS)
def test_ipt_archive_is_read_with_its_identity(tmp_path, form):
    path = write_ipt_archive(str(tmp_path / ("ipt.zip" if form == "zip" else "ipt")),
                             ipt_occurrences(6, "http://h/"), form == "zip")
    with Archive(path) as archive:
        spec = read_spec(archive)
        identity = read_identity(archive, spec)
    assert spec.core.index("gbifID") is None and spec.image_source().location == "multimedia.txt"
    assert (identity["doi"], identity["download_key"]) == ("10.15468/ipt123", "ipt-dataset")
    result = read_tasks(path)
    assert result.tally["export.rows"] == len(result.tasks) == 9
    assert result.tally["skipped.bad_gbif_id"] == 0
    assert accounted(result) == 9 and not result.failures


@pytest.mark.parametrize("form", FORMS)
def test_ipt_rows_join_by_the_core_id_string(tmp_path, form):
    occurrences = ipt_occurrences(6, "http://h/")
    path = write_ipt_archive(str(tmp_path / ("ipt.zip" if form == "zip" else "ipt")),
                             occurrences, form == "zip")
    result = read_tasks(path)
    assert len(result.tasks) == 9 == accounted(result)
    by_url = {t["identifier"]: t for t in result.tasks}
    first = by_url["http://h/1-1.jpg"]
    assert first == {
        "gbifID": None, "coreID": "urn:catalog:XYZ:101", "identifier": "http://h/1-1.jpg",
        "occurrenceID": "urn:catalog:XYZ:101", "datasetKey": None, "taxonKey": None,
        "scientificName": "Species 1", "license": CC_BY,  # meta.xml's default
        "rightsHolder": "A. Photographer", "creator": "A. Photographer"}
    assert {t["coreID"] for t in result.tasks} == {o.occurrence_id for o in occurrences}


def test_gbif_id_from_a_core_column_that_is_not_the_id(tmp_path):
    """A dataset archive with gbifIDs beside its own ids: the join brings them."""
    core_terms = (DWC + "occurrenceID", DWC + "scientificName", GBIF + "gbifID")
    core = Decl("occurrence.txt", OCCURRENCE, core_terms)
    media = Decl("multimedia.txt", MULTIMEDIA, (DC + "identifier",), first_term_index=1)
    files = {"meta.xml": meta_xml(core, media), "metadata.xml": eml(),
             "occurrence.txt": table(header_of(core_terms), [
                 ["urn:x:1", "A a", "4001"], ["urn:x:2", "B b", "not-an-id"]]),
             "multimedia.txt": table(["id", "identifier"], [
                 ["urn:x:1", "http://h/1.jpg"], ["urn:x:2", "http://h/2.jpg"],
                 ["urn:x:3", "http://h/3.jpg"]])}
    result = read_tasks(write(str(tmp_path / "g.zip"), files))
    # Keyed by the core id; the gbifID is kept where the occurrence gives a valid
    # one, null where it is malformed or the occurrence row is missing.
    assert sorted((t["coreID"], t["gbifID"]) for t in result.tasks) == [
        ("urn:x:1", 4001), ("urn:x:2", None), ("urn:x:3", None)]
    assert accounted(result) == 3


AC = "http://rs.tdwg.org/ac/terms/"


def test_audubon_core_multimedia(tmp_path):
    """accessURI is the picture (dc:identifier may be an id); types as DCMI URIs."""
    files = ipt_files(ipt_occurrences(2, "http://h/"))
    terms = (DC + "identifier", AC + "accessURI", DC + "type",
             "http://ns.adobe.com/xap/1.0/rights/UsageTerms")
    media = Decl("multimedia.txt", AC + "Multimedia", terms, first_term_index=1)
    core = Decl("occurrence.txt", OCCURRENCE, (DWC + "occurrenceID", DWC + "scientificName"))
    files["meta.xml"] = meta_xml(core, media)
    files["occurrence.txt"] = table(["occurrenceID", "scientificName"], [["o1", "A a"]])
    files["multimedia.txt"] = table(["id"] + header_of(terms), [
        ["o1", "img-1", "http://h/1.jpg", "http://purl.org/dc/dcmitype/StillImage", "CC0"],
        ["o1", "snd-1", "http://h/1.mp3", "http://purl.org/dc/dcmitype/Sound", "CC0"]])
    result = read_tasks(write(str(tmp_path / "ac.zip"), files))
    assert [(t["identifier"], t["license"]) for t in result.tasks] == [("http://h/1.jpg", "CC0")]
    assert result.tally["skipped.not_still_image"] == 1


def test_associated_media_in_an_ipt_core(tmp_path):
    terms = (DWC + "occurrenceID", DWC + "scientificName", DWC + "associatedMedia")
    core = Decl("occurrence.txt", OCCURRENCE, terms)
    files = {"meta.xml": meta_xml(core), "occurrence.txt": table(header_of(terms), [
        ["urn:a:1", "A a", "http://h/1.jpg | http://h/2.jpg"], ["urn:a:2", "B b", ""]])}
    result = read_tasks(write(str(tmp_path / "core"), files, as_zip=False))
    assert sorted((t["coreID"], t["identifier"], t["scientificName"]) for t in result.tasks) == [
        ("urn:a:1", "http://h/1.jpg", "A a"), ("urn:a:1", "http://h/2.jpg", "A a")]
