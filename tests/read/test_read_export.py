"""Reading DwC-A exports: real GBIF downloads from ../shared, and edge cases."""
from __future__ import annotations

import collections
import io
import types

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.conftest import shared_path
from transforms.read.export import (
    Archive,
    ExportError,
    ReadArchive,
    ReadExport,
    TableSpec,
    iter_rows,
    parse_meta,
    read_identity,
    read_spec,
)
from transforms.common.tally import TALLY

AMBLYOMMA = ("gbif-samples", "amblyomma_dl_4gbcs6_2020")
AMBLYOMMA_ZIP = ("gbif-samples",
                 "amblyomma_dl_4gbcs6_2020_RECONSTRUCTED_0022697-200613084148143.zip")


def _read_all(path: str):
    """ReadArchive's outputs: media and occurrence rows keyed by the core id
    (a string), the tally (failure rows, if any, are left out)."""
    media, occurrences, tally = [], [], collections.Counter()
    for out in ReadArchive().process(path):
        if isinstance(out, beam.pvalue.TaggedOutput):
            if out.tag == TALLY:
                tally.update(out.value.value)
            elif out.tag == "occurrences":
                occurrences.append(out.value)
        else:
            media.append(out)
    return media, occurrences, tally


@pytest.mark.parametrize("parts", [AMBLYOMMA, AMBLYOMMA_ZIP], ids=["folder", "zip"])
def test_real_gbif_download_folder_and_zip(parts):
    path = str(shared_path(*parts))
    media, occurrences, tally = _read_all(path)
    assert len(media) == 1362 == tally["export.image_rows"] == tally["export.rows"]
    # 199 occurrences have several images; every occurrence with images is found in the core.
    assert len({k for k, _ in media}) == len(occurrences) == 1074
    # The row with a trailing space in its gbifID (line 3 of multimedia.txt) is read.
    assert any(k == "2803144270" and m["gbifID"] == 2803144270 for k, m in media)
    by_id = dict(occurrences)
    assert by_id["2803151307"]["gbifID"] == 2803151307
    assert by_id["2803151307"]["scientificName"] == "Amblyomma americanum Linnaeus, 1758"
    assert by_id["2803151307"]["taxonKey"] == "2184301"
    assert by_id["2803151307"]["datasetKey"] == "50c9509d-22c7-4a22-a47d-8c48425ef4a7"
    first = dict(media)["2803151307"]
    assert first["identifier"].startswith("https://static.inaturalist.org/photos/80747453/")
    assert first["license"] == "http://creativecommons.org/licenses/by-nc/4.0/"
    assert first["creator"] == first["rightsHolder"] == "fred201"


def test_identity_from_metadata_xml():
    with Archive(str(shared_path(*AMBLYOMMA_ZIP))) as archive:
        identity = read_identity(archive, read_spec(archive))
    assert identity["doi"] == "10.15468/dl.4gbcs6"
    assert identity["download_key"] == "0022697-200613084148143"


def test_extension_order_differs_between_downloads():
    """2021's meta.xml lists multimedia before verbatim; 2020's the other way round."""
    for parts, order in [(AMBLYOMMA, ["verbatim.txt", "multimedia.txt"]),
                         (("gbif-samples", "lyrurus_norway_dl_tsyjt4_2021"),
                          ["multimedia.txt", "verbatim.txt"])]:
        spec = parse_meta((shared_path(*parts) / "meta.xml").read_bytes())
        assert [t.location for t in spec.extensions] == order
        assert spec.multimedia.location == "multimedia.txt"
        assert spec.multimedia.index("identifier") == 3


def test_sound_rows_are_skipped_with_a_reason():
    """Black grouse: 1,107 StillImage and 33 Sound rows (xeno-canto)."""
    folder = shared_path("gbif-samples", "lyrurus_norway_dl_tsyjt4_2021")
    spec = parse_meta((folder / "meta.xml").read_bytes())
    reader = ReadArchive()
    from transforms.common.tally import Tally
    tally = Tally()
    with Archive(str(folder)) as archive:
        rows = list(reader._image_rows(archive, spec.multimedia, tally))
    counts = tally.flush()
    assert len(rows) == 1107
    assert counts["skipped.not_still_image"] == 33
    assert counts["export.rows"] == 1140
    licences = collections.Counter(m["license"] for _, m in rows)
    assert licences["© All rights reserved"] > 1000 and licences["??"] == 1


def test_multimedia_edge_cases_of_a_fungi_download():
    """Psilocybe semilanceata: text/html 'images', an IIIF manifest, 'jpeg' formats."""
    path = shared_path("gbif-samples", "psilocybe_semilanceata_dl_pafy54_2023", "multimedia.txt")
    spec = parse_meta((shared_path(*AMBLYOMMA) / "meta.xml").read_bytes()).multimedia
    from transforms.common.tally import Tally
    tally = Tally()

    just_multimedia = types.SimpleNamespace(open=lambda name: open(path, "rb"))
    rows = list(ReadArchive()._image_rows(just_multimedia, spec, tally))
    counts = tally.flush()
    assert counts["export.rows"] == 1619
    assert counts["skipped.declared_format_not_image"] == 4
    assert counts["skipped.not_still_image"] == 1
    assert len(rows) == 1619 - 5
    svampeatlas = [m for _, m in rows if "svampe.databasen.org/uploads/" in m["identifier"]]
    assert len(svampeatlas) == 165
    assert all(m["license"] is None and m["creator"] == m["rightsHolder"] for m in svampeatlas)


def test_missing_declared_file_fails_with_what_was_expected_and_found():
    with pytest.raises(ExportError, match="declares occurrence.txt but the archive has no"):
        with Archive(str(shared_path("gbif-samples", "lyrurus_norway_dl_tsyjt4_2021"))) as a:
            read_spec(a)


def test_export_without_image_urls_fails_at_once():
    """The 2013 portal format: no header, no multimedia, no associatedMedia."""
    path = shared_path("gbif-samples", "legacy_gbif_results_2013", "gbif-results.zip")
    with pytest.raises(ExportError, match="expected image URLs"):
        with Archive(str(path)) as archive:
            read_spec(archive)
    spec = parse_meta(zipfile_read(path, "meta.xml"))
    assert spec.core.ignore_header_lines == 0


def zipfile_read(path, name) -> bytes:
    import zipfile
    with zipfile.ZipFile(path) as z:
        return z.read(name)


def test_not_a_dwca(tmp_path):
    (tmp_path / "0001234-261126.csv").write_text("gbifID\tmediaType\n1\tStillImage\n")
    with pytest.raises(ExportError, match="SIMPLE_CSV"):
        with Archive(str(tmp_path)) as archive:
            read_spec(archive)
    with pytest.raises(ExportError, match="found nothing there"):
        Archive(str(tmp_path / "missing.zip"))
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="not a zip"):
        Archive(str(tmp_path / "x.zip"))


def _table(**kw) -> TableSpec:
    base = dict(location="t.txt", row_type="", is_core=False, fields_terminated_by="\t",
                fields_enclosed_by="", ignore_header_lines=1)
    base.update(kw)
    return TableSpec(**base)


def test_bare_quotes_are_kept_when_no_enclosure_is_declared():
    data = 'id\tname\n1\tthe "big" one\n2\t"unbalanced\n'.encode()
    rows = list(iter_rows(io.BytesIO(data), _table()))
    assert rows == [["1", 'the "big" one'], ["2", '"unbalanced']]


def test_declared_enclosure_and_encoding_are_honoured():
    data = 'id,name\r\n1,"a, b"\r\n2,"Sæl"\r\n'.encode("latin-1")
    rows = list(iter_rows(io.BytesIO(data), _table(
        fields_terminated_by=",", fields_enclosed_by='"', encoding="latin-1",
        lines_terminated_by="\r\n")))
    assert rows == [["1", "a, b"], ["2", "Sæl"]]


def test_read_export_transform_joins_occurrences():
    path = str(shared_path(*AMBLYOMMA_ZIP))
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        tasks, failures, tally = p | ReadExport(path)
        keys = tasks | beam.Map(lambda t: (t["gbifID"], t["identifier"]))
        assert_that(keys | "Count" >> beam.combiners.Count.Globally(), equal_to([1362]),
                    label="all")
        sample = (tasks | beam.Filter(lambda t: t["gbifID"] == 2803151307)
                  | beam.Map(lambda t: (t["scientificName"], t["taxonKey"], t["creator"])))
        assert_that(sample, equal_to([("Amblyomma americanum Linnaeus, 1758", 2184301,
                                       "fred201")]), label="joined")
        assert_that(tasks | beam.Filter(lambda t: t["coreID"] != str(t["gbifID"])),
                    equal_to([]), label="core ids")
        assert_that(failures, equal_to([]), label="no failures")


def _occurrences(n: int):
    from pipeline.demo.sample_data import Occurrence
    return [Occurrence(gbifID=700 + i, occurrenceID=f"urn:o:{i}",
                       datasetKey="84d26682-f762-11e1-a439-00145eb45e9a", taxonKey=90 + i,
                       scientificName=f"Species {i}") for i in range(n)]


def test_ragged_rows_are_read_when_usable_and_counted_when_not(tmp_path):
    from pipeline.demo.sample_data import Media, write_dwca
    media = [Media(gbifID=700, identifier="http://h/0.jpg")]
    extra = [
        "701\tStillImage\timage/jpeg\thttp://h/1.jpg",           # short, but the URL is there
        "702\tStillImage\timage/jpeg",                            # short, no URL
        "703\tStillImage\timage/jpeg\t" + "\t".join(["x"] * 14),  # too long, no URL in place
        " 704 \tStillImage\timage/jpeg\thttp://h/4.jpg" + "\t" * 11,  # whitespace in the ID
        "abc\tStillImage\timage/jpeg\thttp://h/5.jpg" + "\t" * 11,    # not a gbifID
    ]
    export = write_dwca(str(tmp_path / "r.zip"), _occurrences(6), media,
                        extra_multimedia_lines=extra)
    rows, _, tally = _read_all(export)
    assert sorted(m["gbifID"] for _, m in rows) == [700, 701, 704]
    assert tally["skipped.ragged_row"] == 2
    assert tally["skipped.bad_gbif_id"] == 1
    assert tally["export.ragged_rows_read"] == 1
    assert tally["export.rows"] == 6


def test_associated_media_is_used_without_a_multimedia_extension(tmp_path):
    """Split on | , ; as GBIF does; licence and rightsHolder come from the record."""
    from pipeline.demo.sample_data import write_dwca
    associated = {700: "http://h/a.jpg | http://h/b.jpg;http://h/c.jpg", 701: "http://h/d.jpg"}
    export = write_dwca(str(tmp_path / "v.zip"), _occurrences(3), [], include_multimedia=False,
                        verbatim_associated_media=associated)
    with Archive(export) as archive:
        spec = read_spec(archive)
    assert spec.multimedia is None and spec.image_source().location == "verbatim.txt"
    rows, occurrences, tally = _read_all(export)
    assert sorted((k, m["identifier"]) for k, m in rows) == [
        ("700", "http://h/a.jpg"), ("700", "http://h/b.jpg"), ("700", "http://h/c.jpg"),
        ("701", "http://h/d.jpg")]
    assert tally["export.rows"] == 4  # occurrence 702 lists no media: no image row at all
    assert "skipped.empty_identifier" not in tally
    assert {k for k, _ in occurrences} == {"700", "701"}
