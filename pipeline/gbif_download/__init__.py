"""Refreshing straight from GBIF: request a DwC-A download, wait, fetch the zip.

`client` (HTTP on urllib3, polite retries), `request` (account and
predicate), `wait` (status polling), `download` (resumable zip), `export`
(what the launcher calls). See the README's "Refreshing straight from GBIF".
"""
from pipeline.gbif_download.errors import GbifError
from pipeline.gbif_download.export import export_from_gbif, wants_gbif

__all__ = ["GbifError", "export_from_gbif", "wants_gbif"]
