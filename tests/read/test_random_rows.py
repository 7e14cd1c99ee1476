"""Property test: archives whose every field holds random bytes.

For each of many seeded archives (random ids, huge numbers, NULs, invalid
UTF-8, CRs, ragged rows, four encodings, quoted and unquoted, LF and CRLF):
the reader raises nothing, accounts for every image row it counted (tasks +
skips + failure rows == export.rows), emits only values that the output
schemas take as they are, and the writers' `to_table` takes every row.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.read.archives import (
    CORE_TERMS,
    GBIF_ATTRIBUTES,
    MEDIA_TERMS,
    MULTIMEDIA,
    OCCURRENCE,
    Decl,
    accounted,
    gbif_files,
    header_of,
    read_tasks,
    table,
    write,
)
from transforms.common.records import failure
from transforms.embed.dedup import rows_of
from transforms.write.parts import FAILURE_SCHEMA, embedding_schema, to_table

ARCHIVES = 150
ENCODINGS = ("UTF-8", "ISO-8859-1", "unicode_escape", "cp1252")
FORMATS = [("\\t", "", b"\t"), (",", '"', b",")]
NOT_ALLOWED = {ord("\n")}  # a line feed would only start a new row


def _random_bytes(rng: np.random.Generator, separator: bytes) -> bytes:
    size = int(rng.integers(0, 40))
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return bytes(b for b in data if b not in NOT_ALLOWED and b != separator[0])


def _cell(rng: np.random.Generator, ids: list[bytes], separator: bytes) -> bytes:
    kind = int(rng.integers(0, 9))
    if kind == 0:
        return ids[int(rng.integers(0, len(ids)))]
    if kind == 1:
        return str(int(rng.integers(0, 10 ** 6))).encode()
    if kind == 2:
        return b"9" * int(rng.integers(19, 40))                  # beyond int64
    if kind == 3:
        return b"-" + str(int(rng.integers(0, 10 ** 6))).encode()
    if kind == 4:
        return "²١٢".encode() + b"\x00\r"                    # digits int() refuses
    if kind == 5:
        return b"http://h/" + _random_bytes(rng, separator)
    if kind == 6:
        return b"\\ud800\\udfff" + _random_bytes(rng, separator)  # surrogates by unicode_escape
    return _random_bytes(rng, separator)


def _row(rng, width: int, ids: list[bytes], separator: bytes) -> list[bytes]:
    width = max(1, width + int(rng.integers(-2, 3)) if rng.random() < 0.2 else width)
    row = [_cell(rng, ids, separator) for _ in range(width)]
    if rng.random() < 0.7 and width > 3:
        row[0] = ids[int(rng.integers(0, len(ids)))]
    if rng.random() < 0.6 and width > 3:
        row[1:4] = [b"StillImage", b"image/jpeg", b"http://h/" + _random_bytes(rng, separator)]
    return row


def _archive(rng: np.random.Generator, dest: str) -> str:
    delimiter, quote, separator = FORMATS[int(rng.integers(0, len(FORMATS)))]
    attributes = dict(GBIF_ATTRIBUTES, encoding=ENCODINGS[int(rng.integers(0, len(ENCODINGS)))],
                      fieldsTerminatedBy=delimiter, fieldsEnclosedBy=quote,
                      linesTerminatedBy="\\r\\n" if rng.random() < 0.3 else "\\n")
    end = b"\r\n" if attributes["linesTerminatedBy"] == "\\r\\n" else b"\n"
    ids = [_cell(rng, [b"1"], separator) for _ in range(6)] + [b"1", b"2"]
    core = Decl("occurrence.txt", OCCURRENCE, CORE_TERMS, attributes=attributes)
    media = Decl("multimedia.txt", MULTIMEDIA, MEDIA_TERMS, attributes=attributes)
    files = gbif_files([], [], core=core, multimedia=media)
    files["occurrence.txt"] = table(header_of(CORE_TERMS), [
        _row(rng, len(CORE_TERMS), ids, separator) for _ in range(int(rng.integers(1, 8)))],
        separator, end)
    files["multimedia.txt"] = table(header_of(MEDIA_TERMS), [
        _row(rng, len(MEDIA_TERMS), ids, separator) for _ in range(int(rng.integers(1, 14)))],
        separator, end)
    return write(dest, files, as_zip=rng.random() < 0.5)


def _embedding_rows(tasks: list[dict]) -> list[dict]:
    image = {"tasks": tasks, "image_sha256": "0" * 64, "width": 3, "height": 2,
             "etag": '"e"', "last_modified": None}
    return rows_of(image, np.zeros(4, np.float32), "fingerprint")


def _check_typed(rows: list[dict], schema: pa.Schema) -> None:
    """Every value fits its column as it is (no writer-side nulling needed)."""
    for column in schema:
        if not pa.types.is_fixed_size_list(column.type):
            pa.array([r.get(column.name) for r in rows], column.type)


@pytest.mark.parametrize("seed", range(3))
def test_every_row_of_random_archives_is_accounted_and_writable(tmp_path, seed):
    rng = np.random.default_rng(seed)
    totals = {"rows": 0, "tasks": 0}
    for i in range(ARCHIVES // 3):
        path = _archive(rng, str(tmp_path / f"a{i}{'.zip' if i % 2 else ''}"))
        result = read_tasks(path, line_cap=int(rng.choice([250, 4096])))
        assert accounted(result) == result.tally["export.rows"], (path, dict(result.tally))
        failures = result.failures + [failure(t, "fetch", "http_404") for t in result.tasks]
        _check_typed(failures, FAILURE_SCHEMA)
        to_table(failures, FAILURE_SCHEMA)
        if result.tasks:
            rows = _embedding_rows(result.tasks)
            _check_typed(rows, embedding_schema(4))
            assert to_table(rows, embedding_schema(4)).num_rows == len(result.tasks)
        totals["rows"] += result.tally["export.rows"]
        totals["tasks"] += len(result.tasks)
    assert totals["rows"] > 100 and totals["tasks"] > 10  # the generator reaches the join
