"""The archive: a zip or a folder, local or remote (fsspec), read member by member.

Nothing is unpacked to disk and no member is read whole unless it is small
and capped (meta.xml, EML): data files are streamed. A zip's central
directory is read into memory by `zipfile` (about 0.5 kB per member), so the
member count is checked first, from the end-of-central-directory record.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import struct
import zipfile
import zlib
from typing import IO, Optional

import fsspec

from transforms.read.meta import ExportError, shown

# GBIF downloads hold a dozen files plus one dataset/<key>.xml per constituent
# dataset; 200,000 members cost about 110 MB of central directory in memory.
MAX_MEMBERS = 200_000

# What reading a damaged, encrypted or odd member raises (zipfile, zlib, fsspec).
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
               NotImplementedError, struct.error)

_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_EOCD_SEARCH = 22 + 0xFFFF  # the record plus the longest zip comment


def zip_member_count(handle: IO[bytes]) -> Optional[int]:
    """Members a zip declares, from its end record (zip64 too); None when
    there is no readable record (zipfile then says what is wrong)."""
    try:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - _EOCD_SEARCH)
        handle.seek(start)
        tail = handle.read(size - start)
        at = tail.rfind(_EOCD)
        if at < 0 or len(tail) - at < 22:
            return None
        count = struct.unpack_from("<H", tail, at + 10)[0]
        if count != 0xFFFF or at < 20 or tail[at - 20:at - 16] != _ZIP64_LOCATOR:
            return count
        offset = struct.unpack_from("<Q", tail, at - 20 + 8)[0]
        handle.seek(offset)
        record = handle.read(56)
        return struct.unpack_from("<Q", record, 32)[0] if len(record) == 56 else None
    except (OSError, ValueError, struct.error):
        return None
    finally:
        with contextlib.suppress(OSError, ValueError):
            handle.seek(0)


class Archive:
    """A DwC-A as a zip or a folder, local or remote; members are opened as streams."""

    def __init__(self, path: str):
        self.path = path.rstrip("/")
        self._stack = contextlib.ExitStack()
        self._zip: Optional[zipfile.ZipFile] = None
        self._names: Optional[list[str]] = None
        self._name_set: frozenset[str] = frozenset()
        fs, _, (root,) = fsspec.get_fs_token_paths(self.path)
        self._fs, self._root = fs, root
        if not fs.exists(root):
            raise ExportError(f"expected a GBIF DwC-A download (.zip or folder) at "
                              f"{path}; found nothing there")
        if not fs.isdir(root):
            handle = self._stack.enter_context(fs.open(root, "rb"))
            members = zip_member_count(handle)
            if members is not None and members > MAX_MEMBERS:
                self._stack.close()
                raise ExportError(f"expected a DwC-A of at most {MAX_MEMBERS:,} files at "
                                  f"{path}; found a zip that declares {members:,}")
            try:
                self._zip = zipfile.ZipFile(handle)
            except (*READ_ERRORS, ValueError) as err:
                self._stack.close()
                raise ExportError(f"expected a GBIF DwC-A download (.zip or folder) at "
                                  f"{path}; found a file that is not a zip ({err})") from None

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def is_local(self) -> bool:
        protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (
            self._fs.protocol,)
        return "file" in protocols or "local" in protocols

    def names(self) -> list[str]:
        """Member files (not folders), as paths relative to the archive's root."""
        if self._names is None:
            if self._zip is not None:
                self._names = [n for n in self._zip.namelist() if not n.endswith("/")]
            else:
                self._names = [posixpath.relpath(p, self._root)
                               for p in self._fs.find(self._root)]
            self._name_set = frozenset(self._names)
        return self._names

    def exists(self, name: str) -> bool:
        self.names()
        return name in self._name_set

    def is_folder(self, name: str) -> bool:
        prefix = name.rstrip("/") + "/"
        return any(n.startswith(prefix) for n in self.names())

    def size(self, name: str) -> int:
        """The size the archive declares (a zip member's may lie: reads are capped too)."""
        if self._zip is not None:
            return self._zip.getinfo(name).file_size
        return int(self._fs.size(posixpath.join(self._root, name)) or 0)

    def open(self, name: str) -> IO[bytes]:
        if self._zip is not None:
            return self._zip.open(name)
        path = posixpath.join(self._root, name)
        if self.is_local:
            self._check_inside(name, path)
        return self._fs.open(path, "rb")

    def _check_inside(self, name: str, path: str) -> None:
        """A folder's member may be a link; reading what it points to outside the
        export folder would read any file of this machine as data."""
        real, root = os.path.realpath(path), os.path.realpath(self._root)
        if os.path.commonpath([real, root]) != root:
            raise ExportError(f"{name} in {self.path} is a link to {shown(real)}, outside "
                              "the export folder; expected a file inside it")

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()

    def read_capped(self, name: str, cap: int) -> Optional[bytes]:
        """The member's bytes, or None when it holds more than `cap` (at most
        cap + 1 bytes are read, whatever its header claims)."""
        if self.size(name) > cap:
            return None
        with self.open(name) as handle:
            data = handle.read(cap + 1)
        return None if len(data) > cap else data
