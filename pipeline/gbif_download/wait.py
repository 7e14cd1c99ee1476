"""Waiting for GBIF to prepare a download: polite polling of its status.

Most downloads are ready within 15 minutes, some take hours. The status is
asked for every `poll_s` seconds at first, then 1.5 times less often after
each answer, up to `POLL_CAP` × `poll_s` (60 s growing to 5 minutes by
default); a 420/429/5xx or an unreachable API is retried by `Api.call`
(honouring Retry-After). GBIF's statuses: PREPARING, RUNNING and SUSPENDED
are "not yet"; SUCCEEDED is done; FAILED, KILLED and CANCELLED (and
FILE_ERASED, an old download whose zip is gone) end the wait with one line.
"""
from __future__ import annotations

from typing import Callable, Optional

from pipeline.gbif_download.client import Api
from pipeline.gbif_download.errors import GbifError

WAITING = frozenset({"PREPARING", "RUNNING", "SUSPENDED"})
DONE = "SUCCEEDED"
ENDED = {"FAILED": "GBIF could not prepare it",
         "KILLED": "GBIF's workflow engine killed it",
         "CANCELLED": "it was cancelled (on gbif.org or through the API)",
         "FILE_ERASED": "its zip has been erased (GBIF keeps downloads for about six months)"}
BACKOFF = 1.5
POLL_CAP = 5.0


def status(api: Api, key: str) -> dict:
    answer = api.get_json(f"occurrence/download/{key}", f"asking for download {key}",
                          f"download {key}: check the key (gbif.org lists yours under "
                          "https://www.gbif.org/user/download)")
    if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
        raise GbifError(f"GBIF's API answered for download {key} without a \"status\"; "
                        f"expected a download object (key, doi, status, downloadLink, size, ...)")
    return answer


def wait_for(api: Api, key: str, poll_s: float,
             say: Callable[[str], None] = lambda line: None,
             first: Optional[dict] = None) -> dict:
    """The download's status object once SUCCEEDED; `GbifError` once it cannot be."""
    interval = poll_s
    current = first or status(api, key)
    last_seen = None
    while True:
        state = current["status"]
        if state == DONE:
            return current
        if state in ENDED:
            hint = ("request a new one with --gbif_dataset or --gbif_predicate"
                    if state != "CANCELLED" else "request a new one if that was not meant")
            raise GbifError(f"GBIF download {key} is {state}: {ENDED[state]}; {hint} "
                            f"(details: https://www.gbif.org/occurrence/download/{key})")
        if state not in WAITING:
            raise GbifError(f"GBIF download {key} has status {state!r}; expected one of "
                            f"PREPARING, RUNNING, SUSPENDED, SUCCEEDED, FAILED, KILLED, "
                            f"CANCELLED, FILE_ERASED")
        if state != last_seen:
            say(f"gbif: download {key} is {state}; asking again in {interval:.3g} s, then "
                f"less often, up to every {poll_s * POLL_CAP:.3g} s (Ctrl-C stops waiting; "
                "the wait can be resumed)")
            last_seen = state
        api.sleep(interval)
        interval = min(interval * BACKOFF, poll_s * POLL_CAP)
        current = status(api, key)
