"""The end-of-run summary on the terminal: outcomes, failure reasons, what was
reused, resumed or shared, throughput, where the time went, where the files are.
Everything in it comes from the manifest, so it says what the files say.
"""
from __future__ import annotations

from typing import Optional

from transforms.common.files import join


def format_summary(manifest: dict, output: str, report: Optional[str] = None) -> str:
    """The end-of-run table: outcomes, failure reasons, throughput, where the files are."""
    counts = manifest["counts"]
    folder = join(output, manifest["snapshot"])
    total = counts["export_rows"] or counts["accounted"]
    lines = ["", f"snapshot   {folder} (LATEST)", "",
             f"{'outcome':<28}{'images':>10}{'share':>9}"]
    for kind in ("embedded", "failed", "skipped"):
        share = f"{counts[kind] / total:.1%}" if total else "–"
        lines.append(f"{kind:<28}{counts[kind]:>10,}{share:>9}")
    lines.append(f"{'export rows':<28}{counts['export_rows']:>10,}")
    if counts["failed_by_reason"]:
        lines += ["", f"{'failure reason':<20}{'stage':<8}{'images':>10}"]
        for key, n in sorted(counts["failed_by_reason"].items(), key=lambda kv: -kv[1]):
            stage, _, reason = key.partition(".") if "." in key else ("", "", key)
            lines.append(f"{reason:<20}{stage:<8}{n:>10,}")
    if counts["skipped_by_reason"]:
        lines += ["", f"{'skipped reason':<28}{'rows':>10}"]
        for reason, n in sorted(counts["skipped_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"{reason:<28}{n:>10,}")
    lines.append("")
    if manifest.get("previous_snapshot"):
        lines.append(f"refresh    {manifest['refresh_mode']} from {manifest['previous_snapshot']}: "
                     f"{counts['reused']} reused, {counts['new']} new, "
                     f"{counts['reembedded']} re-embedded, {counts['removed']} removed, "
                     f"{counts['retried_failures']} earlier failures retried")
    if manifest.get("resumed_from"):
        lines.append(f"resumed    {counts.get('resumed', 0):,} rows finished by runs that died: "
                     f"{', '.join(manifest['resumed_from'])}")
    if counts.get("rows_sharing_a_fetch") or counts.get("contents_reused"):
        lines.append(f"shared     {counts['distinct_urls_fetched']:,} distinct URLs fetched for "
                     f"{counts['rows_sharing_a_fetch'] + counts['distinct_urls_fetched']:,} "
                     f"rows; {counts['contents_reused']:,} images took the embedding of the "
                     f"same content; {counts['inferences']:,} inferences")
    if counts.get("from_store") or counts.get("from_embedding_cache") or \
            counts.get("stored_bytes"):
        lines.append(f"store      {manifest.get('image_store', '')}: "
                     f"{counts.get('from_store', 0):,} rows embedded from stored pictures, "
                     f"{counts.get('from_embedding_cache', 0):,} from the embedding cache "
                     f"(no request to any host for either); "
                     f"{counts.get('stored_bytes', 0) / 1e6:,.1f} MB of new pictures stored")
    lines.append(_throughput(manifest))
    phases = (manifest.get("timings") or {}).get("phases")
    if phases:
        lines.append(f"time       start {phases['start_s']:.1f} s, pipeline "
                     f"{phases['pipeline_s']:.1f} s (publishing {phases['publish_s'] or 0:.1f} s), "
                     f"report {phases['report_s']:.1f} s; busy: reading "
                     f"{phases['busy_reading_s']:.1f} s, fetching "
                     f"{phases['busy_fetching_s']:.1f} s, embedding "
                     f"{phases['busy_embedding_s']:.1f} s, writing "
                     f"{phases['busy_writing_s']:.1f} s (summed over processes, overlapping)")
    lines += ["", "files"]
    for prefix in ("embeddings", "failures"):
        listed = (manifest.get("files") or {}).get(prefix) or []
        rows = sum(f["rows"] for f in listed)
        lines.append(f"  {prefix:<11} {folder}/{prefix}-*.parquet "
                     f"({len(listed)} file{'s' if len(listed) != 1 else ''}, {rows:,} rows)")
    lines.append(f"  {'manifest':<11} {folder}/manifest.json")
    if report:
        lines.append(f"  {'report':<11} {report}")
    return "\n".join(lines)


def _throughput(manifest: dict) -> str:
    timings, fetch = manifest["timings"], manifest.get("fetch") or {}
    counts = manifest["counts"]
    seconds = timings["seconds"] or 0
    megabytes = fetch.get("fetch.bytes", 0) / 1e6
    taken = counts.get("reused", 0) + counts.get("resumed", 0)
    if not timings["images_per_second"] and taken:
        line = (f"throughput {seconds:.1f} s: nothing to fetch or embed; {taken:,} rows "
                f"taken as they were ({taken / seconds if seconds else 0:,.0f} rows/s)")
    else:
        line = (f"throughput {seconds:.1f} s, {timings['images_per_second'] or 0:.2f} "
                f"images/s")
    if fetch.get("fetch.requests"):
        line += (f"; {fetch.get('fetch.ok', 0):,} fetched, {megabytes:,.1f} MB"
                 f"{f' ({megabytes / seconds:,.2f} MB/s)' if seconds else ''}, "
                 f"{fetch.get('fetch.retries', 0):,} retries")
    return line
