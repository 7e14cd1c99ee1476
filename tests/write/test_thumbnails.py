"""Thumbnails for the report are bounded for the job, not per worker process."""
from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.write.thumbnails import KeepThumbnails


def _thumbs(start: int, stop: int) -> list[dict]:
    return [{"image_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
             "thumbnail": b"jpeg%d" % i} for i in range(start, stop)]


def test_at_most_the_limit_the_smallest_hashes_over_every_input():
    first, second = _thumbs(0, 40), _thumbs(40, 70)
    expected = sorted(first + second, key=lambda t: t["image_sha256"])[:10]
    with TestPipeline() as p:
        kept = ((p | "A" >> beam.Create(first), p | "B" >> beam.Create(second))
                | KeepThumbnails(limit=10))
        assert_that(kept, equal_to(expected))


def test_fewer_than_the_limit_are_all_kept():
    few = _thumbs(0, 5)
    with TestPipeline() as p:
        assert_that(p | beam.Create(few) | KeepThumbnails(limit=10), equal_to(few))
