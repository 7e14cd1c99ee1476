"""Refreshing straight from GBIF: request a DwC-A download, wait, fetch the zip.

`client` (HTTP on urllib3, polite retries), `request` (account and
predicate), `wait` (status polling), `download` (resumable zip), `export`
(what the launcher calls), `errors` (one line and an exit code). None of them
is imported here, so that a run pays for them only when it uses them. See
the README's "Refreshing straight from GBIF".
"""
from typing import Any

# Where a run's data can come from: exactly one of these flags.
SOURCES = ("export", "gbif_dataset", "gbif_predicate", "gbif_download")


def wants_gbif(opts: Any) -> bool:
    """Whether the run's data is to come from GBIF's API (a --gbif_* source)."""
    return any(getattr(opts, name, None) for name in SOURCES[1:])
