"""Rows of one data file, read within a bounded buffer whatever the file holds.

A line is read up to `LINE_CAP` characters; the rest of a longer line is
read in small chunks and dropped up to the next line end, and the line comes
out as one `BadLine` (its kept prefix's complete fields, for naming the row),
so a 2 GB line costs `LINE_CAP` of memory, not 2 GB. Decoding never fails:
undecodable bytes become U+FFFD, and so do lone surrogates (which pyarrow
cannot write) that an exotic declared encoding such as unicode_escape makes.

GBIF writes no quoting but leaves bare `"` inside values, so quoting is only
used when meta.xml declares an enclosure character.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import io
from typing import IO, Iterator, Union

from transforms.read.meta import TableSpec
from transforms.read.values import without_surrogates

# The longest lines of the real GBIF downloads in ../shared are 3,527
# characters (occurrence.txt's header, 241 columns) and 2,304 (a data row);
# GBIF rows with long remarks or many media run to tens of kB. 4 Mi characters
# is a thousand times that, and bounds the reader's memory per line.
LINE_CAP = 4 * 1024 * 1024
_DISCARD_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A row that cannot be read: `row_too_long` or `malformed_row`."""
    line: int                      # physical line number in its file, from 1
    reason: str
    detail: str
    fields: tuple[str, ...] = ()   # the complete fields of what was kept


Row = Union[list[str], BadLine]


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def text_encoding(encoding: str) -> str:
    """UTF-8 files with a byte-order mark are read without it (Excel writes one)."""
    return "utf-8-sig" if is_utf8(encoding) else encoding


def line_end(table: TableSpec) -> str:
    return "\r" if table.lines_terminated_by == "\r" else "\n"


def open_text(stream: IO[bytes], table: TableSpec) -> io.TextIOWrapper:
    """Lines split at the declared end only (\\r\\n files split at \\n, then
    lose the \\r), so a bare \\r inside a value stays in the value."""
    return io.TextIOWrapper(stream, encoding=text_encoding(table.encoding), errors="replace",
                            newline=line_end(table))


def read_line(text: IO[str], cap: int, end: str) -> tuple[str, bool]:
    """(line, too_long): at most cap + 1 characters are held; of a longer line
    the first `cap` come back and the rest is read and dropped in chunks."""
    line = text.readline(cap + 1)
    if len(line) <= cap or line.endswith(end):
        return line, False
    while True:
        rest = text.readline(_DISCARD_CHUNK)
        if not rest or rest.endswith(end):
            return line[:cap], True


def complete_fields(prefix: str, delimiter: str, width: int) -> tuple[str, ...]:
    """The fields of a cut line that end before the cut (at most `width`)."""
    pieces = prefix.split(delimiter, width)
    return tuple(pieces[:min(len(pieces) - 1, width)])


def too_long(cap: int) -> str:
    return f"longer than {cap:,} characters; the rest of the line was skipped"


def iter_rows(stream: IO[bytes], table: TableSpec, cap: int = LINE_CAP) -> Iterator[Row]:
    """Rows of one data file as lists of strings (or `BadLine`s), honouring the
    table's format. A row is split into at most width + 1 pieces: columns past
    those meta.xml declares are never used, and 200,000 of them cost nothing."""
    text = open_text(stream, table)
    if table.fields_enclosed_by:
        yield from _quoted_rows(text, table, cap)
    else:
        yield from _plain_rows(text, table, cap)


def _plain_rows(text: IO[str], table: TableSpec, cap: int) -> Iterator[Row]:
    delimiter, width, end = table.fields_terminated_by, table.width, line_end(table)
    number = 0
    while True:
        line, cut = read_line(text, cap, end)
        if not line:
            return
        number += 1
        if number <= table.ignore_header_lines:
            continue
        line = without_surrogates(line)
        if cut:
            yield BadLine(number, "row_too_long", too_long(cap),
                          complete_fields(line, delimiter, width))
            continue
        line = line.rstrip("\r\n")
        if line:
            yield line.split(delimiter, width)


class _RecordTooLong(Exception):
    pass


class _Lines:
    """Physical lines for csv.reader, which joins quoted lines into one record:
    a record that grows past the cap stops with `_RecordTooLong`."""

    def __init__(self, text: IO[str], cap: int, end: str):
        self._text, self._cap, self._end = text, cap, end
        self.number = 0
        self.record_chars = 0

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        line, cut = read_line(self._text, self._cap, self._end)
        if not line:
            raise StopIteration
        self.number += 1
        self.record_chars += len(line)
        if cut or self.record_chars > self._cap:
            raise _RecordTooLong
        return without_surrogates(line)


def _quoted_rows(text: IO[str], table: TableSpec, cap: int) -> Iterator[Row]:
    """After a bad record csv.reader starts afresh at the next line, so one
    unbalanced quote costs the lines up to the cap, not the rest of the file."""
    if csv.field_size_limit() < cap:  # its default, 128 KiB, would fail long fields
        csv.field_size_limit(cap)
    lines = _Lines(text, cap, line_end(table))
    reader = csv.reader(lines, delimiter=table.fields_terminated_by,
                        quotechar=table.fields_enclosed_by, strict=False)
    records = 0
    while True:
        lines.record_chars = 0
        first = lines.number + 1
        bad = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except _RecordTooLong:
            bad = BadLine(first, "row_too_long", too_long(cap))
        except csv.Error as err:
            bad = BadLine(first, "malformed_row", f"not a readable row: {err}")
        records += 1
        if records <= table.ignore_header_lines:
            continue
        if bad is not None:
            yield bad
        elif row:
            yield row
