"""Pages people look at: the run report (`report.html`) and the query contact sheet.

Counts in a manifest say whether a run worked; pictures of a few images next
to their nearest neighbours say whether the embeddings are any good, at a
glance. Both pages are single self-contained HTML files (styles inline,
thumbnails as data: URIs), so they can be mailed, stored beside the
snapshot in a bucket, or opened offline.

The pictures of a run's report are thumbnails the run kept while decoding,
carried from snapshot to snapshot for images that did not change
(pipeline/tools/thumbnails.py): a report sends no request to any image host, and
its sample is drawn from the images that have one. Snapshots of earlier
versions kept none; for them, and for `query`'s contact sheet, thumbnails
are fetched like the pipeline fetches (same Fetcher, address guard and fetch
options, from the run's manifest), reusing those of earlier reports (keyed by
URL and the picture's SHA-256). A picture that cannot be fetched or decoded
is shown as a placeholder that says why, never as a broken page. The report
is written by the launcher after a run and again by `evaluate`, which adds
its Recall@k table.
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import hashlib
import html
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import fsspec
import numpy as np
from PIL import Image, ImageOps

from pipeline.gbif_download.citation import citation
from pipeline.tools.query import (QueryResult, Snapshot, id_columns, image_url, iter_blocks,
                                  occurrence_link, occurrence_number, open_snapshot, rows_at,
                                  run_fetch_config, search, vectors_at)
from pipeline.tools.thumbnails import data_uri, has_store, kept_thumbnails, with_thumbnail
from transforms.fetch.config import FetchConfig
from transforms.fetch.fetcher import Fetcher
from transforms.common.files import join, write_atomically

REPORT = "report.html"
THUMB_PX = 240
SAMPLE_QUERIES = 6
SAMPLE_NEIGHBOURS = 5
# A report must not hang on a dead image host: fewer tries and a shorter
# deadline than the run's, everything else as the run fetched.
THUMB_MAX_ATTEMPTS = 2
THUMB_FETCH_TIMEOUT_S = 20.0
THUMB_THREADS = 8
# How report.html stores a thumbnail, so that the next report can reuse it.
_CACHED = re.compile(r'<img src="(data:image/jpeg;base64,[A-Za-z0-9+/=]+)" '
                     r'data-key="([0-9a-f]{32})"')


# ---------------------------------------------------------------- thumbnails

@dataclass(frozen=True)
class Thumbnail:
    """A picture as a data: URI, or the reason there is none."""
    uri: Optional[str] = None
    reason: Optional[str] = None


def thumbnail(content: bytes, size: int = THUMB_PX,
              max_pixels: int = 100_000_000) -> Thumbnail:
    """Bytes → a small JPEG data: URI, upright (EXIF), on white where transparent."""
    try:
        image = Image.open(io.BytesIO(content))
        if image.width * image.height > max_pixels:
            return Thumbnail(reason="decompression_bomb")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(image)
            image.thumbnail((size, size))
            if image.mode in ("RGBA", "LA", "P", "PA"):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (255, 255, 255))
                image.paste(rgba, mask=rgba.getchannel("A"))
            image = image.convert("RGB")
    except Exception as err:  # Pillow raises many types for bad data
        return Thumbnail(reason="truncated" if "truncated" in str(err) else "not_an_image")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=82)
    return Thumbnail(uri="data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())


def thumbnail_config(config: FetchConfig) -> FetchConfig:
    """The run's fetch settings with a report-sized patience."""
    return dataclasses.replace(config, max_attempts=min(config.max_attempts, THUMB_MAX_ATTEMPTS),
                               fetch_timeout=min(config.fetch_timeout, THUMB_FETCH_TIMEOUT_S))


def thumb_key(row: dict, config: FetchConfig) -> str:
    """Which picture a thumbnail shows: the URL fetched and the stored bytes' hash,
    so a picture that changed at the same URL gets a new thumbnail."""
    identity = f"{image_url(row, config)}\0{row.get('image_sha256') or ''}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def fetch_thumbnails(wanted: dict[str, str], config: FetchConfig,
                     max_pixels: int = 100_000_000) -> dict[str, Thumbnail]:
    """{key: URL} → {key: Thumbnail}; each distinct URL fetched once, a few at a time."""
    if not wanted:
        return {}
    urls = list(dict.fromkeys(wanted.values()))
    fetcher = Fetcher(thumbnail_config(config))

    def one(url: str) -> Thumbnail:
        result = fetcher.fetch(url)
        if not result.ok:
            return Thumbnail(reason=result.reason or "fetch_failed")
        return thumbnail(result.content or b"", max_pixels=max_pixels)

    try:
        with concurrent.futures.ThreadPoolExecutor(THUMB_THREADS) as pool:
            by_url = dict(zip(urls, pool.map(one, urls)))
    finally:
        fetcher.close()
    return {key: by_url[url] for key, url in wanted.items()}


def cached_thumbnails(folders: Iterable[str]) -> dict[str, Thumbnail]:
    """Thumbnails that earlier reports in these snapshot folders already hold."""
    cache: dict[str, Thumbnail] = {}
    for folder in folders:
        fs, _, (path,) = fsspec.get_fs_token_paths(join(folder, REPORT))
        try:
            if not fs.exists(path):
                continue
            with fs.open(path, "r") as handle:
                text = handle.read()
        except OSError:
            continue  # a cache: without it, thumbnails are fetched again
        for uri, key in _CACHED.findall(text):
            cache.setdefault(key, Thumbnail(uri=uri))
    return cache


def report_thumbnails(rows: Iterable[dict], config: FetchConfig, max_pixels: int,
                      cache: dict[str, Thumbnail]) -> dict[str, Thumbnail]:
    """Thumbnails of rows by key: from the cache where possible, fetched otherwise."""
    wanted = {thumb_key(row, config): image_url(row, config) for row in rows}
    missing = {key: url for key, url in wanted.items() if key not in cache}
    found = fetch_thumbnails(missing, config, max_pixels)
    return {key: cache.get(key) or found[key] for key in wanted}


# ---------------------------------------------------------------- the neighbour sample

def sample_rows(snapshot: Snapshot, n: int, seed: int = 0,
                allowed: Optional[np.ndarray] = None) -> list[int]:
    """Row numbers of n images to show, of different species where possible,
    preferring species with other occurrences (so there is something to find);
    only rows `allowed` (those with a kept thumbnail), when given."""
    from pipeline.tools.evaluate import eligible_queries, read_labels
    gbif_ids, labels = read_labels(snapshot, "scientificName")
    if not len(labels):
        return []
    eligible = np.zeros(len(labels), bool)
    eligible[eligible_queries(gbif_ids, labels)] = True
    order = np.random.default_rng(seed).permutation(len(labels))
    if allowed is not None:
        order = order[allowed[order]]
        if not len(order):
            return []
    ranked = order[np.argsort(~eligible[order], kind="stable")]  # eligible first, random within
    first_of_each_label = np.sort(np.unique(labels[ranked], return_index=True)[1])
    chosen = [int(r) for r in ranked[first_of_each_label[:n]]]
    for row in ranked[:n + len(chosen)]:  # fewer species than n: other images too
        if len(chosen) == n:
            break
        if int(row) not in chosen:
            chosen.append(int(row))
    return sorted(chosen)


def neighbour_sample(snapshot: Snapshot, queries: int = SAMPLE_QUERIES,
                     k: int = SAMPLE_NEIGHBOURS, seed: int = 0,
                     allowed: Optional[np.ndarray] = None) -> list[tuple[dict, list[dict]]]:
    """(query row, its k nearest rows of other occurrences) for a few sampled
    images; queries and neighbours among the rows `allowed`, when given."""
    rows = sample_rows(snapshot, queries, seed, allowed)
    if not rows:
        return []
    gbif_ids = read_gbif_ids(snapshot, rows)
    found = search(vectors_at(snapshot.files, rows), iter_blocks(snapshot.files), k,
                   query_ids=gbif_ids, gallery_mask=allowed)
    wanted = sorted(set(rows) | {int(r) for r in found.rows.ravel() if r >= 0})
    stored = dict(zip(wanted, rows_at(snapshot.files, wanted)))  # one pass for all of them
    sample = []
    for i, row in enumerate(rows):
        hits = [dict(stored[int(r)], rank=rank, similarity=float(score),
                     link=occurrence_link(stored[int(r)]))
                for rank, (r, score) in enumerate(zip(found.rows[i], found.scores[i]), start=1)
                if r >= 0]
        sample.append((stored[row], hits))
    return sample


def read_gbif_ids(snapshot: Snapshot, rows: Sequence[int]) -> np.ndarray:
    """The occurrences of some gallery rows (as `occurrence_ids` numbers them),
    in the order asked for."""
    columns = id_columns(snapshot.files)
    return np.array([occurrence_number(r.get("coreID") or (
        None if r.get("gbifID") is None else str(r["gbifID"])))
        for r in rows_at(snapshot.files, rows, columns)], np.int64)


# ---------------------------------------------------------------- HTML pieces

STYLE = """
:root { --ink:#1e2b22; --muted:#5d6a60; --line:#dde4db; --bg:#f5f6f1; --card:#fff;
        --accent:#2d6a3e; --accent-soft:#e3efe5; --bad:#a5432f; --bad-soft:#f7e6e1;
        --skip:#8a7a3a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
header { background:#22402b; color:#f3f7f1; padding:28px 0 24px; }
header .wrap, main { max-width:1200px; margin:0 auto; padding-left:40px; padding-right:40px; }
header .kicker { text-transform:uppercase; letter-spacing:.08em; font-size:12px; opacity:.75; }
header h1 { margin:4px 0 6px; font-size:26px; font-weight:650; word-break:break-all; }
header .meta { font-size:14px; opacity:.85; }
header a { color:#cfe6d4; }
main { padding-top:24px; padding-bottom:56px; }
section { margin-top:32px; }
h2 { font-size:18px; margin:0 0 12px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h2 small { font-weight:400; color:var(--muted); font-size:13px; margin-left:8px; }
p.note { color:var(--muted); font-size:13.5px; margin:8px 0 0; }
.cards { display:grid; grid-template-columns:repeat(5,1fr); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card .label { font-size:12.5px; color:var(--muted); text-transform:uppercase; letter-spacing:.05em; }
.card .n { font-size:28px; font-weight:650; line-height:1.2; margin-top:2px; }
.card.ok .n { color:var(--accent); } .card.bad .n { color:var(--bad); }
.cols { display:grid; grid-template-columns:1fr 1fr; gap:28px; }
table { width:100%; border-collapse:collapse; background:var(--card); border:1px solid var(--line);
        border-radius:10px; overflow:hidden; font-size:14px; }
th, td { text-align:left; padding:7px 12px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#eef1ea; font-weight:600; font-size:12.5px; text-transform:uppercase;
     letter-spacing:.04em; color:var(--muted); }
tr:last-child td { border-bottom:none; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td code, p code { font-size:12.5px; background:#eef1ea; padding:1px 5px; border-radius:4px; }
.bar { display:inline-block; height:8px; border-radius:4px; background:var(--accent);
       vertical-align:middle; margin-right:8px; }
.bar.failed { background:var(--bad); } .bar.skipped { background:var(--skip); }
.empty { color:var(--muted); font-style:italic; }
.grid { display:grid; gap:10px; }
.grid.k6 { grid-template-columns:repeat(6,1fr); } .grid.wide { grid-template-columns:repeat(5,1fr); }
.neighbours .grid { margin-bottom:14px; padding-bottom:14px; border-bottom:1px dashed var(--line); }
.neighbours .grid:last-child { border-bottom:none; }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:8px;
         overflow:hidden; display:flex; flex-direction:column; }
figure.query { border:2px solid var(--accent); box-shadow:0 0 0 3px var(--accent-soft); }
figure img, .placeholder { width:100%; aspect-ratio:1/1; object-fit:cover; display:block; }
.placeholder { display:flex; flex-direction:column; align-items:center; justify-content:center;
               gap:4px; padding:10px; text-align:center; color:var(--muted); font-size:13px;
               background:repeating-linear-gradient(45deg,#eceee8,#eceee8 10px,#f5f6f2 10px,#f5f6f2 20px); }
.placeholder b { color:var(--bad); font-family:ui-monospace,monospace; font-size:12.5px; }
figcaption { padding:7px 9px 9px; font-size:12.5px; line-height:1.35; }
figcaption .name { font-style:italic; font-weight:600; display:-webkit-box; overflow:hidden;
                   -webkit-line-clamp:2; -webkit-box-orient:vertical; min-height:2.7em; }
figcaption .sim { float:right; font-variant-numeric:tabular-nums; font-weight:600; }
figcaption .tag { display:inline-block; font-size:11px; padding:0 6px; border-radius:8px;
                  background:var(--accent-soft); color:var(--accent); font-weight:600; }
figcaption .tag.q { background:var(--accent); color:#fff; }
figcaption a { color:var(--muted); }
footer { color:var(--muted); font-size:12.5px; margin-top:40px; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else _e(value)


def page(title: str, header: str, body: str) -> str:
    """The common frame: one self-contained document."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f'<header><div class="wrap">{header}</div></header><main>{body}'
            f"<footer>Written by gbif-embed. Pictures keep the licences and credits of their "
            f"<code>license</code>, <code>rightsHolder</code> and <code>creator</code> columns "
            f"(shown when you point at a picture).</footer></main></body></html>\n")


def figure(row: dict, thumb: Optional[Thumbnail], *, key: str = "", query: bool = False,
           query_label: Optional[str] = None) -> str:
    """One picture with its name, similarity and GBIF link; a placeholder if missing."""
    credit = " · ".join(str(v) for v in (row.get("creator") or row.get("rightsHolder"),
                                         row.get("license")) if v)
    if thumb is not None and thumb.uri:
        picture = (f'<img src="{thumb.uri}" data-key="{_e(key)}" '
                   f'alt="{_e(row.get("scientificName"))}" '
                   f'title="{_e(credit or row.get("identifier"))}">')
    else:
        reason = thumb.reason if thumb is not None else "not fetched"
        picture = (f'<div class="placeholder" title="{_e(row.get("identifier"))}">'
                   f"<span>image unavailable</span><b>{_e(reason)}</b></div>")
    if query:
        top = '<span class="tag q">query</span>'
    else:
        same = query_label is not None and row.get("scientificName") == query_label
        top = (f'<span class="sim">{row["similarity"]:.3f}</span>'
               + ('<span class="tag">same name</span>' if same else "&nbsp;"))
    link = occurrence_link(row) if row.get("gbifID") is not None or row.get("coreID") else ""
    named = (f"gbifID {row['gbifID']}" if row.get("gbifID") is not None
             else f"{row.get('coreID')}" if row.get("coreID") else "uploaded picture")
    gbif = f'<a href="{_e(link)}">{_e(named)}</a>' if link else _e(named)
    return (f'<figure class="{"query" if query else "hit"}">{picture}<figcaption>{top}'
            f'<span class="name">{_e(row.get("scientificName") or "no name")}</span>'
            f"{gbif}</figcaption></figure>")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (),
          empty: str = "none") -> str:
    """A simple table; cells are already HTML. `numeric` columns align right."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _bar(kind: str, share: float) -> str:
    return f'<span class="bar {kind}" style="width:{max(2, round(share * 120))}px"></span>'


def _share(n: int, total: int) -> float:
    return n / total if total else 0.0


# ---------------------------------------------------------------- the report's sections

def _header(manifest: dict) -> str:
    export = manifest.get("export") or {}
    doi = export.get("doi")
    source = (f'GBIF download <a href="https://doi.org/{_e(doi)}">{_e(doi)}</a>' if doi
              else _e(export.get("path")))
    finished = (manifest.get("finished_at") or "")[:19].replace("T", " ")
    return (f'<div class="kicker">gbif-embed · run report</div><h1>{_e(manifest["snapshot"])}</h1>'
            f'<div class="meta">{source} · finished {_e(finished)} UTC · '
            f"{_e(manifest.get('refresh_mode') or 'run')}</div>{_citation(export)}")


def _citation(export: dict) -> str:
    """The citation GBIF asks users of a download to give: its DOI."""
    doi = export.get("doi")
    if not doi:
        return ""
    text = (export.get("gbif_download") or {}).get("citation") or \
        citation(doi, export.get("published"))
    link = f'<a href="https://doi.org/{_e(doi)}">https://doi.org/{_e(doi)}</a>'
    return (f'<div class="meta citation">Cite the data as: '
            f"{_e(text).replace(_e(f'https://doi.org/{doi}'), link)}</div>")


def _cards(manifest: dict) -> str:
    counts, timings = manifest["counts"], manifest.get("timings") or {}
    rate = timings.get("images_per_second")
    cards = [("ok", "embedded", _n(counts["embedded"])), ("bad", "failed", _n(counts["failed"])),
             ("", "skipped", _n(counts["skipped"])), ("", "export rows", _n(counts["export_rows"])),
             ("", "images / s", f"{rate:.2f}" if rate else "–")]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}"><div class="label">{label}</div>'
        f'<div class="n">{value}</div></div>' for cls, label, value in cards) + "</div>"


def _outcomes(manifest: dict) -> str:
    counts = manifest["counts"]
    total = counts["export_rows"] or counts["accounted"]
    rows = [[f'{_bar(kind, _share(counts[kind], total))}{kind}', _n(counts[kind]),
             f"{_share(counts[kind], total):.1%}"] for kind in ("embedded", "failed", "skipped")]
    rows.append(["<b>export rows</b>", f"<b>{_n(counts['export_rows'])}</b>", ""])
    if manifest.get("previous_snapshot"):
        rows.append([f"reused from {_e(manifest['previous_snapshot'])}",
                     _n(counts.get("reused", 0)), ""])
    failed = [[_e(key.split(".", 1)[0]), f"<code>{_e(key.split('.', 1)[-1])}</code>", _n(n)]
              for key, n in sorted(counts["failed_by_reason"].items(), key=lambda kv: -kv[1])]
    skipped = [[f"<code>{_e(reason)}</code>", _n(n)]
               for reason, n in sorted(counts["skipped_by_reason"].items(), key=lambda kv: -kv[1])]
    return (f'<section class="cols"><div><h2>Outcomes</h2>'
            f'{table(["outcome", "images", "share"], rows, numeric=(1, 2))}'
            f"<h2 style='margin-top:24px'>Skipped rows by reason</h2>"
            f'{table(["reason", "rows"], skipped, numeric=(1,), empty="nothing skipped")}</div>'
            f"<div><h2>Failures by reason</h2>"
            f'{table(["stage", "reason", "images"], failed, numeric=(2,), empty="no failures")}'
            f"{_fetch_stats(manifest)}</div></section>")


def _fetch_stats(manifest: dict) -> str:
    fetch, timings = manifest.get("fetch") or {}, manifest.get("timings") or {}
    seconds = timings.get("seconds") or 0
    megabytes = fetch.get("fetch.bytes", 0) / 1e6
    rows = [["run time", f"{seconds:,.1f} s"],
            ["throughput", f"{timings.get('images_per_second') or 0:,.2f} images/s"],
            ["HTTP requests", _n(fetch.get("fetch.requests", 0))],
            ["retries", _n(fetch.get("fetch.retries", 0))],
            ["downloaded", f"{megabytes:,.1f} MB"
             + (f" ({megabytes / seconds:,.2f} MB/s)" if seconds else "")]]
    return (f"<h2 style='margin-top:24px'>Throughput</h2>"
            f"{table(['', ''], rows, numeric=(1,))}")


def _evaluation(evaluation: Optional[dict], output: str) -> str:
    if evaluation is None:
        return ('<section><h2>Retrieval quality</h2><p class="note">Not measured yet: '
                f"<code>gbif-embed evaluate --output {_e(output)}</code> adds Recall@1/5/10 "
                "here.</p></section>")
    rows = [[f"Recall@{_e(k)}", f"<b>{v:.3f}</b>",
             "–" if evaluation["published"].get(k) is None
             else f'{evaluation["published"][k]:.3f}']
            for k, v in evaluation["recall"].items()]
    sample = (f"{evaluation['queries']:,} queries sampled from "
              f"{evaluation['eligible_queries']:,} eligible (seed {evaluation['seed']})"
              if evaluation["sampled"]
              else f"{evaluation['queries']:,} queries (every eligible image)")
    recall_table = table(["metric", "this snapshot", "model card"], rows, numeric=(1, 2))
    return (f'<section><h2>Retrieval quality <small>label {_e(evaluation["label"])}, '
            f"evaluated {_e(evaluation['evaluated_at'][:19].replace('T', ' '))} UTC</small></h2>"
            f'<div class="cols"><div>{recall_table}</div><div>'
            f'<p class="note" style="margin-top:0">{_e(evaluation["metric"])}.</p>'
            f'<p class="note">{sample}; gallery {evaluation["gallery_images"]:,} images of '
            f'{evaluation["labels"]:,} labels; left out: {evaluation["rows_without_label"]:,} rows '
            f'without a label, {evaluation["singleton_label_images"]:,} images of labels with a '
            f"single occurrence (not queries). The model card's figures are for the real "
            f"fungi_V2 weights; a stand-in model's vectors mean nothing.</p></div></div></section>")


def _neighbours(sample: list[tuple[dict, list[dict]]], thumbs: dict[str, Thumbnail],
                config: FetchConfig) -> str:
    if not sample:
        return '<section><h2>Nearest neighbours</h2><p class="empty">none sampled (no embeddings, or --report_samples 0)</p></section>'
    blocks = []
    for query_row, hits in sample:
        key = thumb_key(query_row, config)
        cells = [figure(query_row, thumbs.get(key), key=key, query=True)]
        for hit in hits:
            key = thumb_key(hit, config)
            cells.append(figure(hit, thumbs.get(key), key=key,
                                query_label=query_row.get("scientificName")))
        blocks.append(f'<div class="grid k6">{"".join(cells)}</div>')
    k = max(len(hits) for _, hits in sample)
    return (f'<section class="neighbours"><h2>Nearest neighbours <small>{len(sample)} sampled '
            f"images and their {k} most similar images of other occurrences (cosine)</small>"
            f"</h2>{''.join(blocks)}</section>")


def _run_details(manifest: dict, folder: str) -> str:
    export, model = manifest.get("export") or {}, manifest.get("model") or {}
    files = manifest.get("files") or {}
    rows = [["export", _e(export.get("path"))],
            ["download key", _e(export.get("download_key") or "–")],
            *_gbif_download_rows(export.get("gbif_download") or {}),
            ["model", _e(model.get("uri"))],
            ["model fingerprint", f"<code>{_e(model.get('fingerprint'))}</code>"],
            ["folder", _e(folder)]]
    for prefix in ("embeddings", "failures"):
        listed = files.get(prefix) or []
        rows.append([f"{prefix} files", "<br>".join(
            f"{_e(f['path'])} ({_n(f['rows'])} rows)" for f in listed) or "–"])
    options = manifest.get("options") or {}
    rows.append(["options", " ".join(f"<code>--{_e(k)} {_e(v)}</code>"
                                     for k, v in sorted(options.items())
                                     if k not in ("export", "model", "output")) or "defaults"])
    return f"<section><h2>Run</h2>{table(['', ''], rows)}</section>"


def _gbif_download_rows(download: dict) -> list[list[str]]:
    """Where the run's data came from, when it fetched it from GBIF's API."""
    if not download:
        return []
    records = download.get("total_records")
    return [["GBIF download", f"requested {_e(download.get('requested_at') or '–')}, completed "
             f"{_e(download.get('completed_at') or '–')}, "
             f"{_n(records) if isinstance(records, int) else '?'} records (GBIF's count), "
             f"from {_e(download.get('api'))}"],
            ["GBIF predicate", f"<code>{_e(json.dumps(download.get('predicate')))}</code>"]]


def render_report(manifest: dict, evaluation: Optional[dict], folder: str, output: str,
                  sample: list[tuple[dict, list[dict]]], thumbs: dict[str, Thumbnail],
                  config: FetchConfig) -> str:
    """The whole report page from what the run and evaluate wrote."""
    body = (_cards(manifest) + _outcomes(manifest) + _evaluation(evaluation, output)
            + _neighbours(sample, thumbs, config) + _run_details(manifest, folder))
    return page(f"gbif-embed report · {manifest['snapshot']}", _header(manifest), body)


def build_report(output: str, snapshot_name: Optional[str] = None) -> str:
    """Reads the snapshot, samples neighbours, fetches thumbnails; returns the page."""
    from pipeline.tools.evaluate import read_evaluation
    snapshot = open_snapshot(output, snapshot_name)
    config = run_fetch_config(snapshot.manifest)
    queries = (snapshot.manifest.get("options") or {}).get("report_samples", SAMPLE_QUERIES)
    if has_store(snapshot.manifest):  # pictures the runs kept: no host is asked again
        kept = kept_thumbnails(snapshot) if queries > 0 else {}
        allowed = with_thumbnail(snapshot.files, kept) if kept else None
        sample = neighbour_sample(snapshot, queries=queries, allowed=allowed) if kept else []
        rows = [row for query_row, hits in sample for row in (query_row, *hits)]
        thumbs = {thumb_key(row, config): Thumbnail(uri=data_uri(kept[row["image_sha256"]]))
                  for row in rows}
    else:  # a snapshot of an earlier version: thumbnails fetched, reusing earlier reports'
        sample = neighbour_sample(snapshot, queries=queries) if queries > 0 else []
        rows = [row for query_row, hits in sample for row in (query_row, *hits)]
        max_pixels = (snapshot.manifest.get("options") or {}).get("max_image_pixels") \
            or 100_000_000
        previous = snapshot.manifest.get("previous_snapshot")
        cache = cached_thumbnails([snapshot.folder] +
                                  ([join(output, previous)] if previous else []))
        thumbs = report_thumbnails(rows, config, max_pixels, cache)
    return render_report(snapshot.manifest, read_evaluation(snapshot.folder), snapshot.folder,
                         output, sample, thumbs, config)


def write_report(output: str, snapshot_name: Optional[str] = None) -> str:
    """report.html in the snapshot folder (local or gs://); returns its path."""
    snapshot_name = snapshot_name or open_snapshot(output).name
    path = join(output, snapshot_name, REPORT)
    write_atomically(path, build_report(output, snapshot_name))
    return path


# ---------------------------------------------------------------- the query contact sheet

def render_contact_sheet(result: QueryResult, thumbs: dict[str, Thumbnail],
                         query_thumb: Thumbnail, config: FetchConfig) -> str:
    """The query picture and its neighbours with names and similarities."""
    source = (result.source or "").rstrip("/")
    query_row = result.query_row or {"scientificName": source.rsplit("/", 1)[-1] or source,
                                     "identifier": source, "gbifID": None}
    cells = [figure(query_row, query_thumb, query=True)]
    label = result.query_row.get("scientificName") if result.query_row else None
    cells += [figure(hit, thumbs.get(thumb_key(hit, config)), key=thumb_key(hit, config),
                     query_label=label) for hit in result.neighbours]
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    header = (f'<div class="kicker">gbif-embed · query</div><h1>{_e(result.description)}</h1>'
              f'<div class="meta">{len(result.neighbours)} nearest images in '
              f"{_e(result.snapshot.name)} by cosine similarity · {created} UTC</div>")
    note = ('<p class="note">Other images of the same occurrence are left out.</p>'
            if result.excluded_gbif_id is not None else "")
    body = (f'<section class="neighbours"><div class="grid wide">{"".join(cells)}</div>'
            f"{note}</section>")
    return page(f"gbif-embed query · {result.description}", header, body)


def write_contact_sheet(result: QueryResult, path: str, config: FetchConfig) -> str:
    """Fetches the thumbnails and writes the contact sheet to `path` (local or gs://)."""
    max_pixels = (result.snapshot.manifest.get("options") or {}).get("max_image_pixels") \
        or 100_000_000
    rows = list(result.neighbours) + ([result.query_row] if result.query_row else [])
    # No cache here: the sheet's own --allow_private_networks decides what may be shown.
    thumbs = report_thumbnails(rows, config, max_pixels, cache={})
    if result.query_content is not None:
        query_thumb = thumbnail(result.query_content, max_pixels=max_pixels)
    else:
        query_thumb = thumbs[thumb_key(result.query_row, config)]
    write_atomically(path, render_contact_sheet(result, thumbs, query_thumb, config))
    return path
