"""The run's own pictures for `--precision auto`'s check, at no extra request.

The check must see the pictures this job embeds (a precision faithful on one
collection may not be on another), and it runs in the launcher, before the
pipeline starts, so that the whole job uses one precision. The pictures come
from the image store when it holds any (a refresh, a model change, a resumed
run: no request at all). A first run fetches the export's first image URLs
instead, through the fetch stage's own fetcher (address rule, politeness,
caps) and writes them into the store as this run's copies of their host
shards: the run's planning (transforms/compare/planning.py), which reads the
store's URL index after this, finds them there like any stored picture, and
a retried fetch bundle would take them as its earlier attempt's, so no host
is asked twice for them.
"""
from __future__ import annotations

import concurrent.futures
import itertools
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow.parquet as pq

from transforms.common.pictures import DecodeError
from transforms.common.tally import Tally
from transforms.embed.decode import decode_image
from transforms.fetch.config import FetchConfig, fetch_url
from transforms.fetch.fetcher import Fetcher
from transforms.fetch.results import copy_of, store_entries
from transforms.fetch.stage import INVALID_HOST, shard_key
from transforms.read.archive import Archive
from transforms.read.images import image_records
from transforms.read.spec import read_spec
from transforms.store.copies import StoredCopy
from transforms.store.layout import IMAGES, ImageStore
from transforms.store.writing import StoreWriter


@dataclass
class Sample:
    pixels: list = field(default_factory=list)  # uint8 [size, size, 3] each
    source: str = ""          # "image store" or "fetched"
    requests: int = 0         # requests sent to image hosts for the sample
    urls: int = 0             # URLs fetched for it (their rows are not fetched again)

    def describe(self) -> dict:
        return {"pictures": len(self.pixels), "source": self.source,
                "requests": self.requests, "urls_fetched": self.urls}


def run_sample(store: str, export: str, config: FetchConfig, run: str, *, size: int,
               resize: str, wanted: int, max_images: int = 0) -> Sample:
    """Up to `wanted` pictures of this run as the model takes them: from the
    store's copies, else fetched from the export's first image URLs."""
    sample = Sample(source="image store")
    for data in _stored_copies(ImageStore(store)):
        _add(sample, data, size, resize, config.max_image_pixels)
        if len(sample.pixels) >= wanted:
            return sample
    if sample.pixels:
        return sample
    return _fetched(store, export, config, run, size=size, resize=resize, wanted=wanted,
                    max_images=max_images)


def _add(sample: Sample, data: bytes, size: int, resize: str, max_pixels: int) -> None:
    try:
        sample.pixels.append(decode_image(data, resize, size, max_pixels)[0])
    except DecodeError:
        pass  # a copy the embed stage will fail the same way: not a sample


def _stored_copies(store: ImageStore) -> Iterator[bytes]:
    """The store's copies, part by part, reading one small row group at a time."""
    for path in store.parts(store.folder(IMAGES)):
        try:
            with fsspec.open(path, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=16,
                                                                 columns=["data"]):
                    yield from batch.column("data").to_pylist()
        except FileNotFoundError:  # merged away since the listing
            continue


def _first_urls(export: str, config: FetchConfig, wanted: int,
                max_images: int) -> list[tuple[str, str, tuple[str, int]]]:
    """(identifier, URL to fetch, host shard) of the export's first distinct URLs."""
    found: dict[str, tuple[str, str, tuple[str, int]]] = {}
    with Archive(export) as archive:
        spec = read_spec(archive)
        records = image_records(archive, spec.image_source(), Tally(), max_images)
        for item in itertools.islice(records, 50 * wanted):
            if isinstance(item, dict):  # a line that could not be read
                continue
            task = item[1]
            try:
                url = fetch_url(task, config)
            except ValueError:
                continue
            key = shard_key(task, config)
            if key[0] != INVALID_HOST and url not in found:
                found[url] = (task["identifier"], url, key)
                if len(found) >= wanted:
                    break
    return list(found.values())


def _fetched(store: str, export: str, config: FetchConfig, run: str, *, size: int,
             resize: str, wanted: int, max_images: int) -> Sample:
    sample = Sample(source="fetched")
    urls = _first_urls(export, config, wanted, max_images)
    if not urls:
        return sample
    fetcher = Fetcher(config)
    writer = StoreWriter(ImageStore(store), run, len(urls), 3600.0)
    try:
        threads = max(1, min(8, config.per_host_concurrency, config.fetch_concurrency))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda one: fetcher.fetch(one[1]), urls))
        for (identifier, url, (host, shard)), result in zip(urls, results):
            sample.requests += result.requests
            copy = copy_of(result, config.max_image_pixels)
            entry, row = store_entries(identifier, url, result, copy)
            if entry is None or row is None:
                continue  # a failed fetch is left to the fetch stage, which says why
            writer.add(host, shard, entry, row)
            sample.urls += 1
            if isinstance(copy, StoredCopy):
                _add(sample, copy.data, size, resize, config.max_image_pixels)
        writer.flush()  # durable before the pipeline looks for them
    finally:
        fetcher.close()
    return sample
