"""Fetching a finished download's zip: resumable, and checked against the API.

The zip is written to `DIR/<key>.zip.part` and renamed to `DIR/<key>.zip`
only once it has exactly the size GBIF's API reported. A transfer cut short
is continued with an HTTP Range request from the bytes already on disk (in
this run, after a pause, and in the next run after a crash or Ctrl-C); a
server that ignores Range (200 instead of 206) is read from the start again.
A zip already complete on disk is not fetched again.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable, Optional

from urllib3 import exceptions as u3e

from pipeline.gbif_download.client import Api, Unusable
from pipeline.gbif_download.errors import GbifError
from transforms.fetch.outcome import short

CHUNK = 1 << 20
# Where a zip bound for a remote --download_dir arrives (and resumes) first.
STAGING = os.path.join(tempfile.gettempdir(), "gbif-embed-downloads")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def zip_url(api: Api, key: str, meta: dict) -> str:
    link = meta.get("downloadLink")
    if isinstance(link, str) and link.startswith(("http://", "https://")):
        return link
    return api.url(f"occurrence/download/request/{key}.zip")


def expected_size(key: str, meta: dict) -> int:
    size = meta.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise GbifError(f"GBIF's API gave no size for download {key} (found {size!r}); "
                        "without it the zip cannot be checked")
    return size


def fetch_zip(api: Api, key: str, meta: dict, folder: str,
              say: Callable[[str], None] = lambda line: None) -> str:
    """The complete zip's path in `folder`; `GbifError` when it cannot be had whole.

    A remote folder (gs://, for workers on other machines) gets the zip once it
    is whole here, from a local staging folder that keeps the resumable part."""
    if "://" not in folder:
        return _fetch_local(api, key, meta, folder, say)
    import fsspec
    size = expected_size(key, meta)
    target = f"{folder.rstrip('/')}/{key}.zip"
    fs, _, (remote,) = fsspec.get_fs_token_paths(target)
    if fs.exists(remote) and fs.size(remote) == size:
        say(f"gbif: {target} is already complete ({size:,} bytes); not fetched again")
        return target
    local = _fetch_local(api, key, meta, STAGING, say)
    say(f"gbif: copying {local} to {target}")
    fs.put_file(local, remote)
    os.remove(local)
    return target


def _fetch_local(api: Api, key: str, meta: dict, folder: str,
                 say: Callable[[str], None]) -> str:
    size = expected_size(key, meta)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"{key}.zip")
    if os.path.isfile(final) and os.path.getsize(final) == size:
        say(f"gbif: {final} is already complete ({size:,} bytes); not fetched again")
        return final
    part = final + ".part"
    url = zip_url(api, key, meta)
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have > size:
        os.remove(part)
        have = 0
    say(f"gbif: fetching {url} ({size:,} bytes" + (f", resuming at {have:,}" if have else "")
        + f") to {part}")

    def send():
        return _transfer(api, url, part, size)

    try:
        api.call(f"fetching the zip of download {key}", send)
    except GbifError as err:
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        if 0 < have < size:
            raise GbifError(f"the zip of download {key} was cut short: {have:,} of {size:,} "
                            f"bytes arrived and are kept in {part}; run the command again (or "
                            f"with --gbif_download {key}) to resume from there ({err})",
                            err.exit_code) from None
        raise
    have = os.path.getsize(part)
    if have != size:
        os.remove(part)  # a whole transfer that ended at the wrong size: not resumable
        raise GbifError(f"the zip of download {key} has {have:,} bytes but GBIF's API says "
                        f"{size:,}; it was deleted: run the command again to fetch it anew")
    os.replace(part, final)
    return final


def _transfer(api: Api, url: str, part: str, size: int):
    """One GET of what is missing, appended to `part`. A stream that ends early
    raises `Unusable` (so `Api.call` pauses and this runs again from the new
    length); an answer that cannot be used raises `GbifError`."""
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have == size:
        return None
    headers = {"Range": f"bytes={have}-"} if have else {}
    response = api.request("GET", url, headers=headers, stream=True)
    try:
        mode = _mode(response, have, size, url)
        if mode is None:  # 416: nothing left to send (the part is whole, or too long)
            return None
        with open(part, mode) as handle:
            try:
                while handle.tell() <= size:
                    chunk = response.read1(CHUNK)  # what arrived: kept even if the rest never does
                    if not chunk:
                        break
                    handle.write(chunk)
            except (u3e.HTTPError, OSError) as err:
                handle.flush()
                raise Unusable(f"the transfer stopped at {handle.tell():,} of {size:,} bytes "
                               f"({short(err)})", progressed=handle.tell() > have) from None
            got = handle.tell()
        if got < size:
            raise Unusable(f"the transfer ended at {got:,} of {size:,} bytes",
                           progressed=got > have)
        return None
    finally:
        response.release_conn()


def _mode(response, have: int, size: int, url: str) -> Optional[str]:
    status = response.status
    if status == 206 and have:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != have:
            raise GbifError(f"{url} answered a Range request for bytes {have}- with "
                            f"Content-Range {response.headers.get('Content-Range')!r}; "
                            "expected the bytes asked for")
        return "ab"
    if status == 200:
        return "wb"  # the whole zip (a server that ignores Range sends it all again)
    if status == 416 and have:
        return None
    if status in (401, 403, 404, 410):
        raise GbifError(f"the zip at {url} is not available (HTTP {status}); GBIF may have "
                        "erased it: request a new download with --gbif_dataset")
    raise GbifError(f"the zip at {url} answered HTTP {status}; expected 200 or 206")
