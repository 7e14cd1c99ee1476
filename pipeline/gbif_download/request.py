"""Asking GBIF for a fresh DwC-A download: the account, the predicate, the POST.

The account comes from GBIF_USER, GBIF_PWD and GBIF_EMAIL only: never from
the command line (where `ps` and shell history would show it), never printed
or written. Both `--gbif_dataset` and `--gbif_predicate` ask for `DWCA`, the
only format whose `multimedia.txt` carries image URLs, and add
`mediaType = StillImage`, so GBIF leaves out occurrences without pictures.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional

from pipeline.gbif_download.client import Account, Api
from pipeline.gbif_download.errors import GBIF, USAGE, GbifError

ACCOUNT_VARIABLES = ("GBIF_USER", "GBIF_PWD", "GBIF_EMAIL")
STILL_IMAGE = {"type": "equals", "key": "MEDIA_TYPE", "value": "StillImage"}
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
# GBIF's download keys look like 0022697-200613084148143; they also name the
# zip on disk, so nothing but digits, letters and dashes is accepted.
_DOWNLOAD_KEY = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]{0,63}$")


def account_from_environment(environ: Mapping[str, str] = os.environ) -> Account:
    missing = [name for name in ACCOUNT_VARIABLES if not environ.get(name)]
    if missing:
        raise GbifError("requesting a GBIF download needs a GBIF account in the environment: "
                        f"{', '.join(ACCOUNT_VARIABLES)} (not set: {', '.join(missing)}); "
                        "they are read from there only, never from the command line", USAGE)
    return Account(environ["GBIF_USER"], environ["GBIF_PWD"], environ["GBIF_EMAIL"])


def check_download_key(key: str) -> str:
    key = key.strip()
    if not _DOWNLOAD_KEY.match(key):
        raise GbifError(f"--gbif_download: expected a GBIF download key such as "
                        f"0022697-200613084148143; found {key!r}", USAGE)
    return key


def dataset_predicate(dataset_key: str) -> dict:
    key = dataset_key.strip()
    if not _UUID.match(key):
        raise GbifError(f"--gbif_dataset: expected a GBIF dataset key (a UUID such as "
                        f"84d26682-f762-11e1-a439-00145eb45e9a); found {dataset_key!r}", USAGE)
    return with_still_images({"type": "equals", "key": "DATASET_KEY", "value": key})


def predicate_from_file(path: str) -> dict:
    """A predicate in GBIF's JSON form, or a whole download request holding one."""
    import fsspec
    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise GbifError(f"--gbif_predicate: no such file: {path}", USAGE) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise GbifError(f"--gbif_predicate {path}: expected a GBIF download predicate in JSON "
                        f"(e.g. {{\"type\": \"equals\", \"key\": \"DATASET_KEY\", \"value\": "
                        f"\"...\"}}); found {type(err).__name__}: {err}", USAGE) from None
    if isinstance(document, dict) and isinstance(document.get("predicate"), dict):
        document = document["predicate"]  # a whole request, as gbif.org shows it
    if not isinstance(document, dict) or not isinstance(document.get("type"), str):
        found = type(document).__name__ if not isinstance(document, dict) else \
            f"an object with keys {sorted(document)[:6]}"
        raise GbifError(f"--gbif_predicate {path}: expected a JSON object with a \"type\" "
                        f"(a GBIF download predicate); found {found}", USAGE)
    return with_still_images(document)


def with_still_images(predicate: dict) -> dict:
    if predicate == STILL_IMAGE:
        return predicate
    parts = predicate["predicates"] if predicate.get("type") == "and" and \
        isinstance(predicate.get("predicates"), list) else [predicate]
    if STILL_IMAGE in parts:
        return predicate
    return {"type": "and", "predicates": [*parts, dict(STILL_IMAGE)]}


def request_body(predicate: dict, account: Account) -> dict:
    """The body GBIF documents for POST /occurrence/download/request."""
    return {"creator": account.user, "notificationAddresses": [account.email],
            "sendNotification": False, "format": "DWCA", "predicate": predicate}


def request_download(api: Api, predicate: dict, account: Account) -> str:
    """POSTs the request; returns the new download's key."""
    answer = api.post_json("occurrence/download/request", request_body(predicate, account),
                           account, "requesting a download")
    if answer.status in (401, 403):
        raise GbifError(f"GBIF refused the account (HTTP {answer.status}): check GBIF_USER "
                        "(the user name, not the e-mail) and GBIF_PWD; an account made by "
                        "signing in with Google, GitHub or ORCID needs a GBIF password first")
    if answer.status not in (200, 201):
        raise GbifError(f"GBIF refused the download request (HTTP {answer.status}): "
                        f"{api.snippet(answer.body)}")
    key = answer.body.decode("utf-8", "replace").strip()
    if not _DOWNLOAD_KEY.match(key):
        raise GbifError(f"GBIF accepted the request but answered {api.snippet(answer.body)!r} "
                        "instead of a download key", GBIF)
    return key


def dataset_or_file(dataset: Optional[str], path: Optional[str]) -> dict:
    return dataset_predicate(dataset) if dataset else predicate_from_file(path or "")
