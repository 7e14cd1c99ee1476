"""`run --gbif_dataset/--gbif_predicate/--gbif_download`: from flags to a local zip.

The launcher calls `export_from_gbif` before it reads the output folder: it
requests the download (or takes an existing key), waits for GBIF, fetches
the zip into `--download_dir` and returns its path, which the run then reads
exactly as it reads `--export`, plus the download's provenance for the
manifest (key, DOI, the predicate GBIF ran, GBIF's request and completion
times and record count, the citation GBIF asks users to give). Any failure
is a `GbifError` (one line, an exit code); Ctrl-C or SIGTERM while waiting
or fetching ends with `RunStopped`, whose message prints the
`--gbif_download KEY` command that continues without a second request.
"""
from __future__ import annotations

import shlex
import signal
from typing import Any, Callable, Optional, Sequence

from pipeline.gbif_download import SOURCES
from pipeline.gbif_download.citation import citation
from pipeline.gbif_download.client import Api
from pipeline.gbif_download.download import fetch_zip, zip_url
from pipeline.gbif_download.errors import USAGE, GbifError
from pipeline.gbif_download.request import (account_from_environment, check_download_key,
                                            dataset_or_file, request_download)
from pipeline.gbif_download.wait import wait_for
from pipeline.interrupt import EXIT_CODES, Interrupted, RunStopped, stoppable
from transforms.common.files import join

_GBIF_FLAGS = ("--gbif_dataset", "--gbif_predicate", "--gbif_download")
# How long the API may stay unusable, in poll intervals (60 s: 15 minutes).
GIVE_UP_POLLS = 15


def export_from_gbif(opts: Any, argv: Optional[Sequence[str]],
                     say: Callable[[str], None] = print) -> tuple[str, dict]:
    """(path of the downloaded zip, provenance for the manifest's `export`)."""
    given = [f"--{name}" for name in SOURCES if getattr(opts, name, None)]
    if len(given) != 1:
        raise GbifError(f"expected one source of data; found {' and '.join(given)}: use "
                        "--export for a zip you have, --gbif_download for a download GBIF "
                        "made, or --gbif_dataset/--gbif_predicate for a new one", USAGE)
    poll_s = float(opts.gbif_poll_seconds)
    if poll_s <= 0:
        raise GbifError(f"--gbif_poll_seconds: expected a positive number of seconds; "
                        f"found {opts.gbif_poll_seconds}", USAGE)
    folder = download_folder(opts.download_dir, opts.output)
    api = Api(opts.gbif_api, give_up_s=GIVE_UP_POLLS * poll_s, base_delay_s=poll_s)
    api.say = say
    predicate = account = None
    if not opts.gbif_download:
        # Everything a request needs is checked before GBIF is asked for anything.
        predicate = dataset_or_file(opts.gbif_dataset, opts.gbif_predicate)
        account = account_from_environment()
        _check_model_exists(opts.model)
    key = check_download_key(opts.gbif_download) if opts.gbif_download else None
    requested = False
    doing = "requesting"
    with stoppable(True):
        try:
            if key is None:
                key = request_download(api, predicate, account)
                requested = True
                say(f"gbif: requested download {key} (https://www.gbif.org/occurrence/"
                    f"download/{key}); resume with --gbif_download {key} if stopped")
            doing = "waiting for"
            meta = wait_for(api, key, poll_s, say)
            records = meta.get("totalRecords")
            say(f"gbif: download {key} is ready: "
                + (f"{records:,} records, " if isinstance(records, int) else "")
                + f"DOI {meta.get('doi') or '(none)'}")
            doing = "fetching the zip of"
            path = fetch_zip(api, key, meta, folder, say)
        except Interrupted as interrupted:
            raise _stopped(interrupted.args[0], doing, key, argv) from None
    return path, provenance(api, key, meta, predicate, requested, path)


def download_folder(download_dir: Optional[str], output: Optional[str]) -> str:
    """Where the zip goes: --download_dir, else OUTPUT/downloads (local or gs://)."""
    folder = download_dir or (join(output, "downloads") if output else "")
    if not folder:
        raise GbifError("--output is required", USAGE)
    return folder


def provenance(api: Api, key: str, meta: dict, predicate: Optional[dict],
               requested: bool, path: str) -> dict:
    request = meta.get("request") if isinstance(meta.get("request"), dict) else {}
    doi = meta.get("doi") or None
    return {
        "source": "GBIF occurrence download API",
        "api": api.root,
        "download_key": key,
        "doi": doi,
        "citation": citation(doi, meta.get("created")),
        "predicate": request.get("predicate") or predicate,
        "format": request.get("format") or "DWCA",
        "requested_at": meta.get("created"),     # GBIF's `created`
        "completed_at": meta.get("modified"),    # GBIF's `modified` once SUCCEEDED
        "total_records": meta.get("totalRecords"),
        "number_datasets": meta.get("numberDatasets"),
        "size": meta.get("size"),
        "license": meta.get("license"),
        "erase_after": meta.get("eraseAfter"),
        "download_link": zip_url(api, key, meta),
        "requested_by_this_run": requested,
        "zip": path,
    }


def resume_command(argv: Optional[Sequence[str]], key: str) -> str:
    """The same command with `--gbif_download KEY` in place of how it got its data."""
    kept: list[str] = []
    skip = False
    for arg in argv or []:
        if skip:
            skip = False
            continue
        if arg in _GBIF_FLAGS:
            skip = True
            continue
        if arg.startswith(tuple(f + "=" for f in _GBIF_FLAGS)):
            continue
        kept.append(arg)
    return "gbif-embed run " + " ".join(shlex.quote(a) for a in [*kept, "--gbif_download", key])


def _stopped(signum: int, doing: str, key: Optional[str],
             argv: Optional[Sequence[str]]) -> RunStopped:
    name = signal.Signals(signum).name
    if key is None:
        message = (f"stopped by {name} while requesting a GBIF download; nothing was written. "
                   "If GBIF received the request it is listed at "
                   "https://www.gbif.org/user/download: resume it with --gbif_download KEY, "
                   "or run the same command again")
    else:
        kept = " (the bytes fetched so far are kept and resumed)" \
            if doing.startswith("fetching") else ""
        message = (f"stopped by {name} while {doing} GBIF download {key}; nothing was embedded "
                   f"and LATEST is unchanged. GBIF keeps the download{kept}; to continue "
                   f"without requesting another:\n  {resume_command(argv, key)}")
    return RunStopped(message, EXIT_CODES.get(signum, 1))


def _check_model_exists(model: Optional[str]) -> None:
    """A wrong --model found now, not after hours of waiting for GBIF."""
    if not model:
        return
    import fsspec
    fs, _, (path,) = fsspec.get_fs_token_paths(model)
    if not fs.exists(path):
        raise GbifError(f"--model: no such file or folder: {model} (checked before asking "
                        "GBIF for a download)", USAGE)
