"""The image store's copy of a fetched picture: upright RGB, bounded, re-encoded.

Camera originals are megabytes; what any embedder needs is a few hundred
pixels on the shorter side. The store keeps one copy per distinct content
that every model can read: EXIF orientation applied, RGB, the shorter side
at most `STORE_PX`, as a JPEG. It is made once, on the fetching worker, from
a reduced-size decode (libjpeg's DCT scaling), so it costs about what the
model's own decode cost before, and every later model (and every later run)
decodes a small JPEG instead of the original. A picture already small enough,
upright and RGB JPEG is kept as it was fetched, bit for bit.

`STORE_PX` and `QUALITY` were chosen with a trained model on real photos
(`bench/store_fidelity.py`): the embeddings of the stored copy match those
of the original bytes at cosine >= 0.999 for both resize modes.
"""
from __future__ import annotations

import dataclasses
import io

from PIL import Image

from transforms.common.pictures import DecodeError, decode_rgb

STORE_PX = 320      # shorter side kept: covers inputs up to 320 px (fungi_V2's 299, 224)
QUALITY = 90        # JPEG quality of the copy
SUBSAMPLING = 0     # 4:4:4 chroma: no colour bleeding at the small size
FORMAT = "jpeg"
# Bytes of one re-encoded copy of a camera photo (1600x1200 and larger), the
# mean over the real photos of ../shared (bench/store_fidelity.py); what
# `gbif-embed plan` multiplies by to size a store.
BYTES_PER_STORED_PICTURE = 52_000


@dataclasses.dataclass(frozen=True)
class StoredCopy:
    data: bytes            # the copy's JPEG bytes
    width: int             # the copy's size
    height: int
    source_width: int      # the fetched picture's size, before EXIF rotation
    source_height: int
    kept_as_fetched: bool  # the fetched bytes were already a copy


def make_copy(content: bytes, max_pixels: int = 100_000_000,
              short_side: int = STORE_PX) -> StoredCopy:
    """Fetched bytes → the store's copy; DecodeError for what is not a picture."""
    if _already_a_copy(content, short_side):
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
        return StoredCopy(content, width, height, width, height, True)
    rgb, source_width, source_height = decode_rgb(content, "center_crop", short_side,
                                                  max_pixels)
    width, height = rgb.size
    shorter = min(width, height)
    if shorter > short_side:
        scale = short_side / shorter
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.BILINEAR, reducing_gap=None)
    buffer = io.BytesIO()
    try:
        rgb.save(buffer, "JPEG", quality=QUALITY, subsampling=SUBSAMPLING, optimize=False)
    except (OSError, ValueError) as err:
        raise DecodeError("corrupt", f"cannot re-encode the image: {err}") from err
    return StoredCopy(buffer.getvalue(), rgb.size[0], rgb.size[1], source_width,
                      source_height, False)


def _already_a_copy(content: bytes, short_side: int) -> bool:
    """An RGB JPEG no larger than the bound, without a rotation to apply."""
    try:
        image = Image.open(io.BytesIO(content))
    except Exception:
        return False
    try:
        return (image.format == "JPEG" and image.mode == "RGB"
                and min(image.size) <= short_side
                and image.getexif().get(0x0112, 1) in (None, 1)
                and _decodes(image))
    except Exception:
        return False


def _decodes(image: Image.Image) -> bool:
    """Whether the whole picture decodes (a truncated JPEG is not kept as it is)."""
    try:
        image.load()
        return True
    except Exception:
        return False
