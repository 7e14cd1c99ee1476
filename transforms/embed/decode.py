"""Decoding a stored picture into the model's RGB uint8 input (299×299 for fungi_V2).

What reaches this stage is the image store's copy (transforms/store/copies.py):
small JPEGs, so decoding is cheap beside the model. Pixels stay uint8 until
the model call: a quarter of float32's size on the wire between stages.
"""
from __future__ import annotations

import io
import threading
from typing import Iterable, Sequence

import numpy as np
from apache_beam.pvalue import TaggedOutput
from PIL import Image

from transforms.common.concurrency import ThreadedDoFn
from transforms.common import lease
from transforms.common.images import facts_of
from transforms.common.lease import LeaseRef
from transforms.common.pictures import DecodeError, center_square, decode_rgb
from transforms.common.records import FAILURES, failures_of

SIZE = 299
THUMBNAILS = "thumbnails"  # tag of the thumbnails kept for report.html
THUMB_PX = 240
# A report needs pictures of a sample of images, and asking hosts again after
# the run (a refresh: for unchanged images) is what politeness rules out. So
# decoding keeps a thumbnail of every image up to THUMBS_FIRST per process,
# then of one in THUMB_EVERY (by content hash): about 10,000 thumbnails (~120 MB)
# for the 565,000 images of Svampeatlas. That is per process; what the job
# writes is bounded for the whole job (transforms/write/thumbnails.py).
THUMBS_FIRST = 500
THUMB_EVERY = 64
_KEPT: dict[str, int] = {}  # run → thumbnails this process kept for it
_KEPT_LOCK = threading.Lock()


def keep_thumbnail(image_sha256: str, run: str = "") -> bool:
    """Whether this process keeps a thumbnail of this image in this run."""
    with _KEPT_LOCK:
        kept = _KEPT.get(run, 0)
        if kept < THUMBS_FIRST or int(image_sha256[:8] or "1", 16) % THUMB_EVERY == 0:
            _KEPT[run] = kept + 1
            return True
    return False

def decode_image(content: bytes, resize: str = "squash", size: int = SIZE,
                 max_pixels: int = 100_000_000) -> tuple[np.ndarray, int, int]:
    """Bytes → (size×size×3 uint8 array, original width, original height).

    The original size is the stored picture's, before EXIF rotation, so
    that it matches what the host serves.
    """
    rgb, width, height = decode_rgb(content, resize, size, max_pixels)
    return model_input(rgb, resize, size), width, height


def model_input(rgb: Image.Image, resize: str = "squash", size: int = SIZE) -> np.ndarray:
    if resize == "center_crop":
        rgb = center_square(rgb)
    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def thumbnail_jpeg(rgb: Image.Image, px: int = THUMB_PX) -> bytes:
    """A small JPEG of the picture as decoded (aspect kept), for report.html."""
    thumb = rgb.copy()
    thumb.thumbnail((px, px), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


# Decoded pictures kept submitted ahead of the model: at least a batch
# (--batch_size 16 by default), so that the next batch is decoded while the
# current one is inferred. 32 pictures are 8.6 MB of pixels.
DECODE_LOOKAHEAD = 32


class DecodeImages(ThreadedDoFn):
    """Fetched image → model input; the fetched bytes are dropped here.

    Runs on threads: Pillow releases the GIL while decoding, so pictures are
    decoded while the model works on the previous batch. For that, results
    are emitted only while more than `lookahead` pictures are submitted: the
    runner feeds this step from the thread that also runs inference, so an
    eager stage would have nothing left to decode while the model runs.
    """

    def __init__(self, resize: str = "squash", max_pixels: int = 100_000_000,
                 threads: int = 2, lookahead: int = DECODE_LOOKAHEAD, run: str = "",
                 size: int = SIZE, leases: Sequence[LeaseRef] = ()):
        super().__init__(threads=threads, lookahead=lookahead)
        self._leases = tuple(leases)  # a distributed job's: renewed while this is set up
        self._resize = resize
        self._size = size
        self._max_pixels = max_pixels
        self._run = run  # the run the thumbnails are counted for

    def setup(self):
        super().setup()
        lease.keep_alive(self._leases)  # this process renews the job's leases meanwhile

    def teardown(self):
        lease.let_go(self._leases)
        super().teardown()

    def work(self, fetched: dict) -> Iterable:
        """Never raises: any error on a picture's path ends as its rows' failure
        rows (a bundle that failed instead would be retried and fail again)."""
        image = facts_of(fetched)
        try:
            return self._decoded(fetched, image)
        except Exception as err:  # a bug or a picture no one foresaw: the rows still end
            self.tally.add("decode.reason.internal_error")
            try:
                return [TaggedOutput(FAILURES, row) for row in failures_of(
                    image, "decode", "internal_error", f"{type(err).__name__}: {err}")]
            except Exception:  # not even the rows can be named: nothing to write
                return []

    def _decoded(self, fetched: dict, image: dict) -> list:
        try:
            rgb, width, height = decode_rgb(fetched["content"], self._resize, self._size,
                                            max_pixels=self._max_pixels)
            pixels = model_input(rgb, self._resize, self._size)
        except DecodeError as err:
            self.tally.add(f"decode.reason.{err.reason}")
            return [TaggedOutput(FAILURES, row) for row in failures_of(
                image, "decode", err.reason, err.detail)]
        self.tally.add("decode.ok")
        # Rows carry the fetched picture's size (the image says it; what was
        # decoded here is the store's smaller copy).
        outputs: list = [dict(image, pixels=pixels, width=image.get("width") or width,
                              height=image.get("height") or height)]
        sha = image.get("image_sha256") or ""
        if sha and keep_thumbnail(sha, self._run):
            thumbnail = self._thumbnail(image, sha, rgb)
            if thumbnail is not None:
                outputs.append(TaggedOutput(THUMBNAILS, thumbnail))
        return outputs

    def _thumbnail(self, image: dict, sha: str, rgb: Image.Image):
        """The report's thumbnail: a courtesy, so a picture whose thumbnail
        cannot be made is still embedded (and counted), just not shown."""
        try:
            first = image["tasks"][0]
            return {"coreID": first.get("coreID"), "gbifID": first.get("gbifID"),
                    "identifier": first.get("identifier"), "image_sha256": sha,
                    "thumbnail": thumbnail_jpeg(rgb)}
        except Exception:
            self.tally.add("decode.thumbnail_failed")
            return None
