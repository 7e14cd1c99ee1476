"""At most THUMBS_PER_JOB thumbnails for report.html, for the whole job.

Decoding keeps thumbnails of a sample of images in each worker process
(transforms/embed/decode.py: the first ones, then one in 64 by content hash),
so their number grows with the count of processes: 100 workers would keep
100 times the first ones. What is written is bounded here for the job: the
thumbnails of the smallest content hashes, a uniform sample that is the same
whichever worker decoded what (and on a rerun). Each input is cut down where
it is made before the cut over all of them, so what crosses a shuffle and
what a combiner holds is at most `limit` thumbnails (about 12 kB each).
"""
from __future__ import annotations

from typing import Sequence, Union

import apache_beam as beam

THUMBS_PER_JOB = 10_000  # about 120 MB of thumbnails, for Svampeatlas's 565,000 images


def _content(thumbnail: dict) -> str:
    return thumbnail["image_sha256"]


class KeepThumbnails(beam.PTransform):
    """Thumbnails (one PCollection or a tuple of them) → at most `limit` of them."""

    def __init__(self, limit: int = THUMBS_PER_JOB):
        super().__init__()
        self._limit = limit

    def _smallest(self, pcoll: beam.PCollection, label: str) -> beam.PCollection:
        return (pcoll
                | f"Smallest{label}" >> beam.combiners.Top.Of(self._limit, key=_content,
                                                              reverse=True)
                | f"Each{label}" >> beam.FlatMap(lambda kept: kept))

    def expand(self, thumbnails: Union[beam.PCollection, Sequence[beam.PCollection]]):
        if isinstance(thumbnails, beam.PCollection):
            return self._smallest(thumbnails, "")
        cut = [self._smallest(pcoll, str(i)) for i, pcoll in enumerate(thumbnails)]
        return self._smallest(cut | "All" >> beam.Flatten(), "OfAll")
