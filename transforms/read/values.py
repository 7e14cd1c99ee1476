"""Typed values of a row: each one valid for the output schemas, or None.

Rows come from anyone's archive, so no value may raise later in a writer:
ids and keys are int64 or None, strings hold no lone surrogates (pyarrow
cannot encode them; an exotic declared encoding such as unicode_escape can
produce them), and the key that joins a media row to its occurrence is a
bounded string.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

INT64_MAX = 2 ** 63 - 1
# Core ids join media rows to occurrences: gbifIDs have at most 19 digits,
# occurrenceIDs (URNs, URLs, UUIDs) a few hundred characters.
CORE_ID_CAP = 4096
_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_int64(value: Optional[str]) -> Optional[int]:
    """A non-negative int64 written in ASCII digits, else None (`str.isdigit`
    accepts '²', which int() refuses, and has no upper bound)."""
    if value is None:
        return None
    value = value.strip()
    if not _ASCII_DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if number <= INT64_MAX else None


def parse_gbif_id(value: Optional[str]) -> Optional[int]:
    return parse_int64(value)


def without_surrogates(text: str) -> str:
    """Lone surrogates replaced by U+FFFD; checked once per line, not per field."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def clean_text(value: Optional[str]) -> Optional[str]:
    """Stripped, None when empty (rows.py has removed lone surrogates)."""
    if value is None:
        return None
    return value.strip() or None


def clean_core_id(value: Optional[str]) -> Optional[str]:
    """The row's core id as the join key, or None when empty or absurdly long."""
    value = clean_text(value)
    return value if value is not None and len(value) <= CORE_ID_CAP else None


def field(row: Sequence[str], index: Optional[int]) -> Optional[str]:
    if index is None or index >= len(row):
        return None
    return clean_text(row[index])


def has_row_key(task: dict) -> bool:
    """Whether the rest of the pipeline can key this row: rows are keyed by
    (coreID, identifier), so any archive's rows can, a publisher's own
    (string ids, no gbifID) included; only a row without a core id cannot."""
    return bool(task.get("coreID"))
