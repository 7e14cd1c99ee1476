"""Which tasks the store already answers, and which must be fetched.

Two joins, so that they scale and run the same on every runner. By URL: a
task whose identifier the URL index has fetched successfully knows its
content (the latest entry wins). By content: a known content is looked up
among the store's pictures and the model's embedding cache; one embedded
before by this model (any run) takes that embedding, one only stored goes on
to be embedded from its copy, and one the store lost (or never had) goes
back to be fetched. Grouping by content also gathers every task of one
content, so each is embedded once for the whole job. Nothing is fetched
twice: `to_fetch` holds exactly the tasks the store cannot answer.
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from transforms.common.tally import TALLY, Tally, tally_outputs
from transforms.store.layout import IMAGES, OK, ImageStore
from transforms.store.reading import read_columns, url_entries

STORED = "stored"
CACHED = "cached"
FETCH = "fetch"


def _latest(entries: list[dict]) -> dict:
    return max(entries, key=lambda e: (e.get("fetched_at") is not None, e.get("fetched_at")))


class _ByUrl(beam.DoFn):
    def start_bundle(self):
        self._tally = Tally()

    def process(self, keyed):
        identifier, grouped = keyed
        tasks = list(grouped["tasks"])
        if not tasks:
            return
        entries = list(grouped["index"])
        entry = _latest(entries) if entries else None
        if entry is None or entry.get("outcome") != OK or not entry.get("image_sha256") \
                or any(t.get("revalidate") for t in tasks):
            self._tally.add("store.not_stored" if entry is None or entry.get("outcome") != OK
                            else "store.revalidated", len(tasks))
            for task in tasks:
                yield TaggedOutput(FETCH, task)
            return
        known = [dict(t, etag=entry.get("etag"), last_modified=entry.get("last_modified"),
                      http_status=entry.get("http_status")) for t in tasks]
        yield entry["image_sha256"], known

    def finish_bundle(self):
        yield from tally_outputs(self._tally)


class _ByContent(beam.DoFn):
    def __init__(self, use_cache: bool):
        self._use_cache = use_cache

    def start_bundle(self):
        self._tally = Tally()

    def process(self, keyed):
        sha, grouped = keyed
        tasks = [task for known in grouped["wanted"] for task in known]
        if not tasks:
            return
        cached = next(iter(grouped["cached"]), None) if self._use_cache else None
        stored = next(iter(grouped["stored"]), None)
        if cached is not None:
            self._tally.add("store.cached", len(tasks))
            yield TaggedOutput(CACHED, (cached, (sha, tasks)))
        elif stored is not None:
            self._tally.add("store.stored", len(tasks))
            yield TaggedOutput(STORED, (stored, (sha, tasks)))
        else:  # indexed, but its copy is not in the store (any more): fetch again
            self._tally.add("store.missing", len(tasks))
            for task in tasks:
                yield TaggedOutput(FETCH, task)

    def finish_bundle(self):
        yield from tally_outputs(self._tally)


class _ShaColumn(beam.DoFn):
    """A part → (image_sha256, the part) for every content it holds."""

    def process(self, path: str) -> Iterable:
        table = read_columns(path, ["image_sha256"])
        if table is None:
            return
        for sha in set(table.column("image_sha256").to_pylist()):
            if sha:
                yield sha, path


class LookupStore(beam.PTransform):
    """Tasks → (tasks to fetch, (picture part, (sha, tasks)) to embed from the
    store, (cache part, (sha, tasks)) already embedded, tally).

    The store's parts are listed here, when the graph is built: parts that
    this run writes are not looked up (they are what it fetches)."""

    def __init__(self, store: str, cache_folder: str, use_cache: bool = True,
                 spread: bool = True):
        super().__init__()
        self._store = ImageStore(store)
        self._cache_folder = cache_folder
        self._use_cache = use_cache
        self._spread = spread  # distributed runners: spread the parts' reads over workers

    def has_parts(self) -> bool:
        """Whether the store holds anything yet (a first run's does not)."""
        return bool(self._store.parts(self._store.folder("urls")))

    def expand(self, tasks):
        p = tasks.pipeline
        url_parts = self._store.parts(self._store.folder("urls"))
        if not url_parts:  # a first run: nothing is stored
            empty = p | "NothingStored" >> beam.Create([])
            return tasks, empty, p | "NothingCached" >> beam.Create([]), \
                p | "NoStoreTally" >> beam.Create([])
        index = (self._listed(p, "Url", url_parts)
                 | "UrlEntries" >> beam.FlatMap(lambda path: url_entries([path]))
                 | "ByIdentifier" >> beam.Map(lambda e: (e["identifier"], e)))
        by_url = ({"tasks": tasks | "KeyByIdentifier" >> beam.Map(
                      lambda t: (t.get("identifier") or "", t)),
                   "index": index}
                  | "JoinUrlIndex" >> beam.CoGroupByKey()
                  | "ByUrl" >> beam.ParDo(_ByUrl()).with_outputs(FETCH, TALLY, main="known"))
        stored = self._contents(p, "Pictures", self._store.parts(self._store.folder(IMAGES)))
        cached = self._contents(p, "Cached", self._store.parts(self._cache_folder)
                                if self._use_cache else [])
        by_content = ({"wanted": by_url.known, "stored": stored, "cached": cached}
                      | "JoinContents" >> beam.CoGroupByKey()
                      | "ByContent" >> beam.ParDo(_ByContent(self._use_cache)).with_outputs(
                          FETCH, STORED, CACHED, TALLY))
        to_fetch = (by_url[FETCH], by_content[FETCH]) | "ToFetch" >> beam.Flatten()
        tally = (by_url[TALLY], by_content[TALLY]) | "LookupTally" >> beam.Flatten()
        return to_fetch, by_content[STORED], by_content[CACHED], tally

    def _listed(self, p, label: str, parts: list[str]):
        listed = p | f"{label}Parts" >> beam.Create(parts)
        return listed | f"Spread{label}Parts" >> beam.Reshuffle() if self._spread else listed

    def _contents(self, p, label: str, parts: list[str]):
        if not parts:
            return p | f"No{label}" >> beam.Create([])
        return self._listed(p, label, parts) | f"{label}Index" >> beam.ParDo(_ShaColumn())
