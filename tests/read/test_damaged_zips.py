"""Damaged, odd and oversized zips: refused at launch with one line that names
the member and what was found, or, for damage past what the launch reads,
stopped with one such line when the reader reaches it."""
from __future__ import annotations

import struct
import zipfile

import pytest

from tests.read.archives import (
    media_row,
    read_tasks,
    refused,
    standard_files,
    write,
    write_form,
)
from transforms.read import archive as archive_module
from transforms.read.export import Archive, ExportError, read_spec


def _patch(path: str, name: str, local_at: int, central_at: int, value: bytes) -> None:
    """Overwrite a field of `name`'s local header and central-directory entry."""
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    central = data.find(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(name)] != name.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    data[local + local_at:local + local_at + len(value)] = value
    data[central + central_at:central + central_at + len(value)] = value
    open(path, "wb").write(bytes(data))


def _member_data_offset(path: str, name: str) -> int:
    data = open(path, "rb").read()
    with zipfile.ZipFile(path) as zf:
        at = zf.getinfo(name).header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
    return at + 30 + name_len + extra_len


def test_corrupt_deflate_stream(tmp_path):
    files = standard_files(media=[media_row(str(i), f"http://h/{i}.jpg") for i in range(2000)])
    path = write_form(tmp_path, files)
    at = _member_data_offset(path, "multimedia.txt")
    data = bytearray(open(path, "rb").read())
    data[at + 2:at + 40] = b"\xff" * 38
    open(path, "wb").write(bytes(data))
    refused(path, "multimedia.txt: expected a readable data file; found")


def test_bad_crc_of_a_small_member(tmp_path):
    path = write_form(tmp_path, standard_files(), compression=zipfile.ZIP_STORED)
    at = _member_data_offset(path, "multimedia.txt") + 60
    data = bytearray(open(path, "rb").read())
    data[at] = ord("Z") if data[at] != ord("Z") else ord("Y")
    open(path, "wb").write(bytes(data))
    refused(path, "multimedia.txt: expected a readable data file", "Bad CRC-32")


def test_encrypted_member(tmp_path):
    path = write_form(tmp_path, standard_files())
    _patch(path, "occurrence.txt", 6, 8, struct.pack("<H", 0x1))
    refused(path, "occurrence.txt: expected a readable data file", "encrypted")


def test_unsupported_compression_method(tmp_path):
    path = write_form(tmp_path, standard_files())
    _patch(path, "multimedia.txt", 8, 10, struct.pack("<H", 99))
    refused(path, "multimedia.txt: expected a readable data file", "NotImplementedError")


def test_damage_past_the_probe_fails_the_read_with_one_line(tmp_path):
    """A stored member with a bad byte near its end: found when reading it."""
    media = [media_row(str(i), f"http://h/{i}.jpg") for i in range(3000)]
    path = write_form(tmp_path, standard_files(media=media), compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(path) as zf:
        size = zf.getinfo("multimedia.txt").compress_size
    at = _member_data_offset(path, "multimedia.txt") + size - 5
    data = bytearray(open(path, "rb").read())
    data[at] = ord("7") if data[at] != ord("7") else ord("8")
    open(path, "wb").write(bytes(data))
    with Archive(path) as archive:
        read_spec(archive)  # the first 64 KiB are sound
    with pytest.raises(ExportError, match=r"^multimedia.txt: expected a readable data file; "
                                          r"reading it failed \(BadZipFile: Bad CRC-32"):
        read_tasks(path)



def test_too_many_members(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 3)
    with pytest.raises(ExportError, match="at most 3 files .* declares 4"):
        Archive(write_form(tmp_path, standard_files()))


def test_truncated_zip_and_zip_in_a_zip(tmp_path):
    path = write_form(tmp_path, standard_files())
    data = open(path, "rb").read()
    (tmp_path / "cut.zip").write_bytes(data[:len(data) // 2])
    with pytest.raises(ExportError, match="found a file that is not a zip"):
        Archive(str(tmp_path / "cut.zip"))
    nested = write(str(tmp_path / "nested.zip"), {"inner.zip": data})
    refused(nested, "expected a Darwin Core Archive with meta.xml at its root")
