"""The embed stage: stored copies in; embedding rows, cache rows and failures out.

Decoding and inference form one composite so that resource hints
(`--inference_min_ram`, `--accelerator`), which give a step its own worker
environment and so a fusion break before it, put the break before decoding:
what crosses to the hinted workers is the store's copy (tens of kB), never
the model's raw pixels (268 kB at 299×299).
"""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.pvalue import PCollection

from transforms.common.lease import LeaseRef
from transforms.common.records import FAILURES
from transforms.common.tally import TALLY
from transforms.embed.decode import THUMBNAILS, DecodeImages
from transforms.embed.inference import Embed, ImageEmbedder


class Embedded(NamedTuple):
    """What `EmbedImages` makes, by name (Beam tags each output with its field)."""

    rows: PCollection        # embedding rows
    cache: PCollection       # embedding-cache rows (the store's, per model)
    failures: PCollection    # failure rows of decoding and inference
    thumbnails: PCollection  # small JPEGs for report.html
    tally: PCollection       # counts


class EmbedImages(beam.PTransform):
    """Images (each the store's copy of one content, with its rows) → `Embedded`."""

    def __init__(self, handler: ImageEmbedder, fingerprint: str, run: str, *, resize: str,
                 size: int, max_pixels: int, decode_threads: int, batch_size: int,
                 leases: tuple[LeaseRef, ...] = ()):  # a distributed job's, kept alive
        super().__init__()
        self._handler = handler
        self._fingerprint = fingerprint
        self._run = run
        self._decode = DecodeImages(resize, max_pixels, decode_threads,
                                    lookahead=2 * batch_size, run=run, size=size,
                                    leases=leases)

    def expand(self, images) -> Embedded:
        decoded = (images | "Decode" >> beam.ParDo(self._decode)
                   .with_outputs(FAILURES, TALLY, THUMBNAILS, main="pixels"))
        rows, embed_failures, embed_tally, cache = decoded.pixels | "Embed" >> Embed(
            self._handler, self._fingerprint, self._run)
        failures = (decoded[FAILURES], embed_failures) | "Failures" >> beam.Flatten()
        tally = (decoded[TALLY], embed_tally) | "Tally" >> beam.Flatten()
        return Embedded(rows, cache, failures, decoded[THUMBNAILS], tally)


class ByContent(beam.PTransform):
    """Fetched images → one image per content, with the rows of all its URLs:
    the fusion break that lets embedding spread over every worker of a
    distributed runner, whatever hosts the pictures came from; what it
    shuffles is the store's copy, not pixels."""

    def expand(self, images):
        return (images
                | "KeyByContent" >> beam.Map(lambda image: (image["image_sha256"], image))
                | "GroupByContent" >> beam.GroupByKey()
                | "OnePerContent" >> beam.Map(_merged))


def _merged(keyed) -> dict:
    _, images = keyed
    images = list(images)
    first = images[0]
    if len(images) == 1:
        return first
    # Twins came from different URLs: each row keeps its own URL's validators.
    tasks = [dict(task, etag=image.get("etag"), last_modified=image.get("last_modified"))
             for image in images for task in image["tasks"]]
    merged = {k: v for k, v in first.items() if k not in ("etag", "last_modified")}
    return dict(merged, tasks=tasks)
