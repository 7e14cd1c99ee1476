"""Decoding fetched bytes into the model's 299×299 RGB uint8 input.

Decoding is the second most expensive step after inference, so JPEGs are
decoded at a reduced size (libjpeg's DCT scaling through Pillow's `draft`)
whenever the result still covers the target; that is 3-4× faster on camera
photos. Pixels stay uint8 until the model call: a quarter of float32's size
on the wire between stages.
"""
from __future__ import annotations

import io
import threading
import warnings
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from transforms.common.concurrency import ThreadedDoFn
from transforms.common.records import FAILURES, failures_of
from apache_beam.pvalue import TaggedOutput

SIZE = 299
RESIZE_MODES = ("squash", "center_crop")
THUMBNAILS = "thumbnails"  # tag of the thumbnails kept for report.html
THUMB_PX = 240
# A report needs pictures of a sample of images, and asking hosts again after
# the run (a refresh: for unchanged images) is what politeness rules out. So
# decoding keeps a thumbnail of every image up to THUMBS_FIRST per process,
# then of one in THUMB_EVERY (by content hash): about 10,000 thumbnails (~120 MB)
# for the 565,000 images of Svampeatlas.
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

# Pillow warns and then raises for large images; the cap is ours to set.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(Exception):
    """An image that cannot become model input; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
        rgb = _center_square(rgb)
    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def thumbnail_jpeg(rgb: Image.Image, px: int = THUMB_PX) -> bytes:
    """A small JPEG of the picture as decoded (aspect kept), for report.html."""
    thumb = rgb.copy()
    thumb.thumbnail((px, px), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def decode_rgb(content: bytes, resize: str = "squash", size: int = SIZE,
               max_pixels: int = 100_000_000) -> tuple[Image.Image, int, int]:
    """Bytes → (RGB picture, decoded at the least size that still covers
    `size` after `resize`, original width, original height)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
    try:
        image = Image.open(io.BytesIO(content))
    except Exception as err:  # Pillow raises many types for unknown data
        raise DecodeError("not_an_image", f"not a decodable image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("decompression_bomb",
                          f"{width}x{height} = {width * height} pixels is over the "
                          f"{max_pixels}-pixel cap")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF oddities, palette transparency notes
            if image.format == "JPEG":
                image.draft("RGB", _draft_size(width, height, resize, size))
            else:
                image.seek(0)  # GIF/WebP/TIFF: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except DecodeError:
        raise
    except OSError as err:
        message = str(err)
        reason = "truncated" if "truncated" in message or "broken data" in message else "corrupt"
        raise DecodeError(reason, f"cannot decode the image: {message}") from err
    except Exception as err:
        raise DecodeError("corrupt", f"cannot decode the image: {err}") from err
    return rgb, width, height


def _draft_size(width: int, height: int, resize: str, size: int) -> tuple[int, int]:
    """The smallest decode size that still covers the target after cropping."""
    if resize == "squash":
        return (size, size)
    # center_crop keeps the shorter side, so only that side must cover `size`.
    scale = size / min(width, height)
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is flattened onto white, like a viewer shows it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        peak = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), "L")
    return image.convert("RGB")


def _center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


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
                 threads: int = 2, lookahead: int = DECODE_LOOKAHEAD, run: str = ""):
        super().__init__(threads=threads, lookahead=lookahead)
        self._resize = resize
        self._max_pixels = max_pixels
        self._run = run  # the run the thumbnails are counted for

    def work(self, fetched: dict) -> Iterable:
        image = {k: v for k, v in fetched.items() if k != "content"}
        try:
            rgb, width, height = decode_rgb(fetched["content"], self._resize,
                                            max_pixels=self._max_pixels)
            pixels = model_input(rgb, self._resize)
        except DecodeError as err:
            self.tally.add(f"decode.reason.{err.reason}")
            return [TaggedOutput(FAILURES, row) for row in failures_of(
                image, "decode", err.reason, err.detail)]
        self.tally.add("decode.ok")
        outputs: list = [dict(image, pixels=pixels, width=width, height=height)]
        sha = image.get("image_sha256") or ""
        if sha and keep_thumbnail(sha, self._run):
            first = image["tasks"][0]
            outputs.append(TaggedOutput(THUMBNAILS, {
                "gbifID": first.get("gbifID"), "identifier": first.get("identifier"),
                "image_sha256": sha, "thumbnail": thumbnail_jpeg(rgb)}))
        return outputs
