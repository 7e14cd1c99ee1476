"""Hostile archives the tests make themselves, as zips and as folders.

Archive-level problems fail at launch (`read_spec`) with one line that names
the file, what was expected and what was found; row-level problems never
fail: each row ends as a task, a counted skip or a failure row.
"""
from __future__ import annotations

import logging
import os

import pytest

from tests.read.archives import (
    CORE_TERMS,
    GBIF_ATTRIBUTES,
    MEDIA_TERMS,
    MULTIMEDIA,
    OCCURRENCE,
    Decl,
    read_tasks,
    refused,
    standard_files,
    table,
    write_form,
)
from transforms.read.export import Archive, read_identity, read_spec
from transforms.read.rows import LINE_CAP

FORMS = ["zip", "folder"]


def _media_decl(**attributes) -> Decl:
    return Decl("multimedia.txt", MULTIMEDIA, MEDIA_TERMS,
                attributes=dict(GBIF_ATTRIBUTES, **attributes))


# --- launch-time refusals: meta.xml attributes ------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("encoding", ["EVIL-8", "base64", "rot13"])
def test_unknown_or_non_text_encoding(tmp_path, form, encoding):
    path = write_form(tmp_path, standard_files(multimedia=_media_decl(encoding=encoding)), form)
    refused(path, "multimedia.txt declares encoding=", encoding, "expected a text encoding")


@pytest.mark.parametrize("attribute, value, expected", [
    ("fieldsTerminatedBy", "\\t\\t", "expected one character"),
    ("fieldsTerminatedBy", "::", "expected one character"),
    ("fieldsTerminatedBy", "\\n", "other than a line break"),
    ("fieldsEnclosedBy", "''", "expected nothing or one character"),
    ("fieldsEnclosedBy", "\\t", "other than the field delimiter"),
    ("linesTerminatedBy", ";", "expected \\n, \\r\\n or \\r"),
    ("linesTerminatedBy", "\\n\\r", "expected \\n, \\r\\n or \\r"),
    ("ignoreHeaderLines", "-1", "expected a whole number"),
    ("ignoreHeaderLines", "9" * 5000, "expected a whole number"),
])
def test_unreadable_format_attributes(tmp_path, attribute, value, expected):
    path = write_form(tmp_path, standard_files(multimedia=_media_decl(**{attribute: value})))
    refused(path, "multimedia.txt", attribute, expected)


@pytest.mark.parametrize("index", ["abc", "-3", "99999999999"])
def test_malformed_column_index(tmp_path, index):
    files = standard_files()
    identifier = b'index="3" term="http://purl.org/dc/terms/identifier"'
    files["meta.xml"] = files["meta.xml"].replace(identifier, identifier.replace(
        b'"3"', f'"{index}"'.encode()))
    refused(write_form(tmp_path, files), "multimedia.txt <field term='identifier'>",
             "expected a whole number")


@pytest.mark.parametrize("form", FORMS)
def test_core_without_id_column(tmp_path, form):
    files = standard_files(core=Decl("occurrence.txt", OCCURRENCE, CORE_TERMS, id_index=None))
    refused(write_form(tmp_path, files, form), "core occurrence.txt declares no <id")


def test_image_extension_without_coreid(tmp_path):
    files = standard_files(multimedia=Decl("multimedia.txt", MULTIMEDIA, MEDIA_TERMS, id_index=None))
    refused(write_form(tmp_path, files), "multimedia.txt declares no <coreid")


@pytest.mark.parametrize("form", FORMS)
def test_image_column_beyond_the_header(tmp_path, form):
    files = standard_files()
    files["multimedia.txt"] = table(["gbifID", "type", "format"], [["1", "StillImage", "x"]])
    refused(write_form(tmp_path, files, form),
             "multimedia.txt: meta.xml puts identifier at column 3", "found 3 column(s)")


def test_id_column_beyond_the_header(tmp_path):
    files = standard_files(core=Decl("occurrence.txt", OCCURRENCE, CORE_TERMS, id_index=12))
    refused(write_form(tmp_path, files), "occurrence.txt: meta.xml puts <id> at column 12",
             "found 7 column(s)")


def test_no_image_source(tmp_path):
    no_url = tuple(t for t in MEDIA_TERMS if not t.endswith("/identifier"))
    files = standard_files(multimedia=Decl("multimedia.txt", MULTIMEDIA, no_url))
    refused(write_form(tmp_path, files), "expected image URLs")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("location, expected", [
    ("../occurrence.txt", "leaves the archive"), ("/etc/hostname", "leaves the archive"),
    ("http://example.org/occurrence.txt", "is a URL"), ("missing.txt", "has no such file")])
def test_locations_outside_the_archive_are_refused(tmp_path, form, location, expected):
    files = standard_files(core=Decl(location, OCCURRENCE, CORE_TERMS))
    files["occurrence.txt"] = table(["x"], [])
    (tmp_path / "occurrence.txt").write_bytes(files["occurrence.txt"])  # beside the export
    refused(write_form(tmp_path, files, form), expected)


@pytest.mark.parametrize("form", FORMS)
def test_a_folder_declared_as_a_data_file(tmp_path, form):
    files = standard_files(multimedia=Decl("dataset", MULTIMEDIA, MEDIA_TERMS))
    files["dataset/a.xml"] = b"<eml/>"
    refused(write_form(tmp_path, files, form), "declares dataset as a data file", "found a folder")


def test_a_link_out_of_the_export_folder(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"gbifID\tidentifier\n1\thttp://h/x.jpg\n")
    folder = write_form(tmp_path, standard_files(), "folder")
    os.remove(os.path.join(folder, "multimedia.txt"))
    os.symlink(outside, os.path.join(folder, "multimedia.txt"))
    refused(folder, "multimedia.txt", "is a link to", "outside the export folder")


def test_meta_xml_above_its_cap(tmp_path):
    files = standard_files()
    files["meta.xml"] = files["meta.xml"].replace(
        b"</archive>", b"<!--" + b"x" * (1 << 20) + b"--></archive>")
    refused(write_form(tmp_path, files), "meta.xml: expected at most 1,048,576 bytes")


def test_header_line_above_the_line_cap(tmp_path):
    files = standard_files()
    files["multimedia.txt"] = b"gbifID\t" + b"x" * (LINE_CAP + 10) + b"\n1\thttp://h/1.jpg\n"
    refused(write_form(tmp_path, files), "multimedia.txt: expected a header line of at most")


def test_utf16_file_declared_utf8(tmp_path):
    files = standard_files()
    files["multimedia.txt"] = files["multimedia.txt"].decode().encode("utf-16")
    refused(write_form(tmp_path, files), "declares encoding='UTF-8'", "UTF-16 byte-order mark")


# --- already right, kept ------------------------------------------------------------------

ENTITY_BOMB = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
               + b"".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">'.encode()
                          for p, c in zip("abcdefgh", "bcdefghi")) + b"]>")
EXTERNAL_ENTITY = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'


@pytest.mark.parametrize("prolog, entity", [(ENTITY_BOMB, b"&i;"), (EXTERNAL_ENTITY, b"&x;")],
                         ids=["bomb", "external"])
def test_entities_in_meta_xml(tmp_path, prolog, entity):
    files = standard_files()
    files["meta.xml"] = prolog + files["meta.xml"].replace(b"</archive>",
                                                           entity + b"</archive>")
    refused(write_form(tmp_path, files), "meta.xml is not well-formed XML")


def test_entity_bomb_in_metadata_xml_leaves_the_identity_empty(tmp_path):
    files = standard_files()
    files["metadata.xml"] = ENTITY_BOMB.replace(b"<!DOCTYPE r", b"<!DOCTYPE eml") + b"<eml>&i;</eml>"
    path = write_form(tmp_path, files)
    with Archive(path) as archive:
        identity = read_identity(archive, read_spec(archive))
    assert identity["doi"] is None and len(read_tasks(path).tasks) == 2


def test_metadata_xml_above_its_cap_is_not_parsed(tmp_path, caplog):
    files = standard_files()
    files["metadata.xml"] = files["metadata.xml"].replace(
        b"</eml:eml>", b"<!--" + b"x" * (4 << 20) + b"--></eml:eml>")
    with caplog.at_level(logging.WARNING):
        with Archive(write_form(tmp_path, files)) as archive:
            identity = read_identity(archive, read_spec(archive))
    assert identity["doi"] is None and identity["download_key"] is None
    assert "metadata.xml is larger than 4,194,304 bytes and was not parsed" in caplog.text


@pytest.mark.parametrize("form", FORMS)
def test_a_missing_core_file(tmp_path, form):
    files = standard_files()
    del files["occurrence.txt"]
    refused(write_form(tmp_path, files, form), "declares occurrence.txt but the archive has no")


def test_a_table_of_several_files(tmp_path):
    files = standard_files()
    files["meta.xml"] = files["meta.xml"].replace(
        b"<location>multimedia.txt</location>",
        b"<location>multimedia.txt</location><location>more.txt</location>")
    refused(write_form(tmp_path, files), "multimedia.txt lists 2 files",
             "expected one <location> per table")


@pytest.mark.parametrize("form", FORMS)
def test_an_empty_image_file_is_an_archive_without_images(tmp_path, form):
    files = standard_files()
    files["multimedia.txt"] = b""
    result = read_tasks(write_form(tmp_path, files, form))
    assert result.tasks == [] and result.tally["export.rows"] == 0


def test_an_unreadable_quoted_header(tmp_path):
    quoted = Decl("multimedia.txt", MULTIMEDIA, MEDIA_TERMS, attributes=dict(
        GBIF_ATTRIBUTES, fieldsTerminatedBy=",", fieldsEnclosedBy='"'))
    files = standard_files(multimedia=quoted)
    files["multimedia.txt"] = b"gbifID,ty\rpe,format,identifier\n1,StillImage,x,http://h/1\n"
    refused(write_form(tmp_path, files), "multimedia.txt: expected a header line of column "
                                         "names; found one that cannot be read")
