"""Hostile rows: none fails the read; each ends as a task, a counted skip or a
failure row, and every value written fits the output schemas."""
from __future__ import annotations

import pytest

from tests.read.archives import (
    GBIF_ATTRIBUTES,
    MEDIA_TERMS,
    MULTIMEDIA,
    Decl,
    accounted,
    gbif_files,
    media_row,
    occurrence_row,
    read_tasks,
    write,
)
from transforms.common.records import failure
from transforms.read.rows import LINE_CAP
from transforms.write.parts import FAILURE_SCHEMA, to_table

FORMS = ["zip", "folder"]
BEYOND_INT64 = "99999999999999999999999"


def _read(tmp_path, media, occurrences=None, form="zip", multimedia=None, **options):
    occurrences = occurrences if occurrences is not None else [occurrence_row("1")]
    files = gbif_files(media, occurrences, multimedia=multimedia)
    path = write(str(tmp_path / ("e.zip" if form == "zip" else "e")), files, form == "zip")
    result = read_tasks(path, **options)
    assert accounted(result) == result.tally["export.rows"]
    rows = result.failures + [failure(t, "fetch", "x") for t in result.tasks]
    to_table(rows, FAILURE_SCHEMA)  # a writer takes every row
    return result


@pytest.mark.parametrize("form", FORMS)
def test_ids_beyond_int64_and_odd_digits_are_skipped_not_fatal(tmp_path, form):
    media = [media_row(BEYOND_INT64, "http://h/a.jpg"), media_row("²", "http://h/b.jpg"),
             media_row("-5", "http://h/c.jpg"), media_row("١٢", "http://h/d.jpg"),
             media_row("9223372036854775807", "http://h/e.jpg"),
             media_row("1", "http://h/f.jpg")]
    occurrences = [occurrence_row("1", taxon_key=BEYOND_INT64),
                   occurrence_row("9223372036854775807", taxon_key="x")]
    result = _read(tmp_path, media, occurrences, form)
    assert result.tally["skipped.bad_gbif_id"] == 4
    assert sorted((t["gbifID"], t["taxonKey"]) for t in result.tasks) == [
        (1, None), (9223372036854775807, None)]


def test_latin1_bytes_nuls_and_cr_inside_values(tmp_path):
    media = [media_row("1", "http://h/\r.jpg", creator=b"S\xf8ren \x00 L\xe6s\xf8e"),
             media_row("1", b"http://h/\xff\xfe.jpg")]
    result = _read(tmp_path, media)
    by_url = {t["identifier"]: t for t in result.tasks}
    assert by_url["http://h/\r.jpg"]["creator"] == "S\ufffdren \x00 L\ufffds\ufffde"
    assert "http://h/\ufffd\ufffd.jpg" in by_url


def test_lone_surrogates_from_an_exotic_encoding_are_replaced(tmp_path):
    multimedia = Decl("multimedia.txt", MULTIMEDIA, MEDIA_TERMS,
                      attributes=dict(GBIF_ATTRIBUTES, encoding="unicode_escape"))
    media = [media_row("1", "http://h/a.jpg", creator=b"\\ud800 x")]
    result = _read(tmp_path, media, multimedia=multimedia)
    assert result.tasks[0]["creator"] == "\ufffd x"


def test_200000_fields_in_one_row(tmp_path):
    row = media_row("1", "http://h/wide.jpg") + ["f"] * 200_000
    result = _read(tmp_path, [row])
    assert [t["identifier"] for t in result.tasks] == ["http://h/wide.jpg"]
    assert result.tally["export.ragged_rows_read"] == 1


def test_duplicate_rows_are_counted(tmp_path):
    result = _read(tmp_path, [media_row("1", "http://h/a.jpg")] * 3)
    assert len(result.tasks) == 1 and result.tally["skipped.duplicate_image"] == 2


def test_odd_identifiers_are_passed_on_for_the_fetch_to_judge(tmp_path):
    odd = [" http://h/space d.jpg ", "file:///etc/passwd", "data:image/png;base64,AAAA",
           "javascript:alert(1)", "http://bücher.example/x.jpg", "//h/relative.jpg",
           "http://h/" + "x" * (1 << 20)]
    result = _read(tmp_path, [media_row("1", u) for u in odd])
    assert sorted(t["identifier"] for t in result.tasks) == sorted(u.strip() for u in odd)


@pytest.mark.parametrize("form", FORMS)
def test_a_line_beyond_the_cap_is_one_failure_row(tmp_path, form):
    long_row = media_row("2", "http://h/long.jpg")
    long_row[6] = "d" * 5000  # description
    media = [media_row("1", "http://h/a.jpg"), long_row, media_row("1", "http://h/b.jpg")]
    result = _read(tmp_path, media, form=form, line_cap=1000)
    assert sorted(t["identifier"] for t in result.tasks) == ["http://h/a.jpg", "http://h/b.jpg"]
    [row] = result.failures
    assert (row["stage"], row["reason"], row["gbifID"], row["identifier"]) == (
        "read", "row_too_long", 2, "http://h/long.jpg")
    assert row["detail"].startswith("multimedia.txt line 3: longer than 1,000 characters")


def test_a_line_cut_before_its_id_and_url_names_neither(tmp_path):
    result = _read(tmp_path, [["9" * 3000] + [""] * 14, media_row("1", "http://h/a.jpg")],
                   line_cap=1000)
    [row] = result.failures
    assert (row["gbifID"], row["identifier"], row["reason"]) == (None, None, "row_too_long")
    assert len(result.tasks) == 1


def test_a_line_beyond_the_real_cap(tmp_path):
    long_row = media_row("2", "http://h/long.jpg")
    long_row[7] = "s" * (LINE_CAP + 1000)
    result = _read(tmp_path, [long_row, media_row("1", "http://h/a.jpg")])
    assert [f["reason"] for f in result.failures] == ["row_too_long"]
    assert [t["identifier"] for t in result.tasks] == ["http://h/a.jpg"]


QUOTED = dict(GBIF_ATTRIBUTES, fieldsTerminatedBy=",", fieldsEnclosedBy='"')


def _quoted(tmp_path, lines: list[bytes], **options):
    multimedia = Decl("multimedia.txt", MULTIMEDIA, ("gbifID", "identifier"),
                      attributes=QUOTED)
    files = gbif_files([], [occurrence_row("1"), occurrence_row("3")], multimedia=multimedia)
    files["multimedia.txt"] = b"gbifID,identifier\n" + b"".join(lines)
    result = read_tasks(write(str(tmp_path / "q.zip"), files), **options)
    assert accounted(result) == result.tally["export.rows"]
    return result


def test_an_unbalanced_quote_costs_at_most_the_cap(tmp_path):
    lines = [b'1,"http://h/a.jpg"\n', b'2,"http://h/never closed\n']
    lines += [b"more,text\n"] * 200 + [b'3,http://h/c.jpg\n']
    result = _quoted(tmp_path, lines, line_cap=500)
    assert [f["reason"] for f in result.failures] == ["row_too_long"]
    identifiers = [t["identifier"] for t in result.tasks]
    assert identifiers[0] == "http://h/a.jpg" and identifiers[-1] == "http://h/c.jpg"


def test_a_quoted_row_csv_cannot_read_is_one_failure_row(tmp_path):
    result = _quoted(tmp_path, [b"1,http://h/a\rb.jpg\n", b'3,"http://h/c.jpg"\n'])
    assert [f["reason"] for f in result.failures] == ["malformed_row"]
    assert [t["identifier"] for t in result.tasks] == ["http://h/c.jpg"]


def test_read_export_sends_unreadable_lines_to_its_failures_output(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.read.export import ReadExport
    long_row = media_row("2", "http://h/long.jpg")
    long_row[6] = "d" * 5000
    path = write(str(tmp_path / "e.zip"), gbif_files(
        [media_row("1", "http://h/a.jpg"), long_row], [occurrence_row("1")]))
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        tasks, failures, _ = p | ReadExport(path, line_cap=1000)
        assert_that(tasks | beam.Map(lambda t: t["identifier"]), equal_to(["http://h/a.jpg"]),
                    label="tasks")
        assert_that(failures | beam.Map(lambda f: (f["gbifID"], f["reason"])),
                    equal_to([(2, "row_too_long")]), label="failures")
