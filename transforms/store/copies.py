"""The image store's copy of a fetched picture: upright RGB, bounded, re-encoded.

Camera originals are megabytes; what any embedder needs is a few hundred
pixels on the shorter side. The store keeps one copy per distinct content
that every model can read: EXIF orientation applied, RGB, as a JPEG, at the
smallest JPEG decoding scale (libjpeg's DCT scaling: 1/2, 1/4, 1/8) whose
shorter side still covers `STORE_PX`, so between 299 and 597 px. That scale
is exactly the one the model's own decode picks for inputs up to 299 px, so
no resampling happens before the model's own resize: the model sees what it
would have seen from the original bytes, but for one JPEG round trip at
`QUALITY` with full chroma (4:4:4). A picture already small enough, upright
and RGB JPEG is kept as it was fetched, bit for bit.

`STORE_PX`, `QUALITY` and `SUBSAMPLING` were chosen with a trained model on
real photos (`bench/store_fidelity.py`, ImageNet EfficientNet-Lite0 on the
photos of ../shared): see the README for the cosines and sizes, and for why
a lossy copy cannot come closer (the model's own sensitivity to ±1 in pixel
values).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Optional

from PIL import Image

from transforms.common.pictures import DecodeError, decode_rgb

STORE_PX = 299      # the shorter side the copy covers: fungi_V2's 299, and 224
QUALITY = 95        # JPEG quality of the copy
SUBSAMPLING = 0     # 4:4:4 chroma
KEEP_BYTES = 160_000  # a picture this small, within the bound, is kept as fetched
FORMAT = "jpeg"
# How copies are made: recorded in the store (store.json, and each part of
# pictures' Parquet metadata), so that copies made otherwise are not reused.
COPY_PARAMETERS = {"format": FORMAT, "quality": QUALITY, "subsampling": SUBSAMPLING,
                   "shorter_side": STORE_PX, "kept_as_fetched_below_bytes": KEEP_BYTES}
COPY_KEY = (f"{FORMAT}-q{QUALITY}-s{SUBSAMPLING}-px{STORE_PX}-keep{KEEP_BYTES}")
# Bytes of one re-encoded copy of a camera photo (1600x1200 and larger), the
# mean over the real photos of ../shared (bench/store_fidelity.py); what
# `gbif-embed plan` multiplies by to size a store.
BYTES_PER_STORED_PICTURE = 86_000


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
    size = _size_if_already_a_copy(content, 2 * short_side - 1)
    if size is not None:
        width, height = size
        return StoredCopy(content, width, height, width, height, True)
    # The reduced-size decode the model's own decode would do: shorter side
    # >= short_side, at a power-of-two scale of the original.
    rgb, source_width, source_height = decode_rgb(content, "center_crop", short_side,
                                                  max_pixels)
    width, height = rgb.size
    shorter = min(width, height)
    if shorter >= 2 * short_side:  # beyond libjpeg's 1/8, or not a JPEG: resample
        scale = short_side / shorter
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    try:
        rgb.save(buffer, "JPEG", quality=QUALITY, subsampling=SUBSAMPLING, optimize=False)
    except (OSError, ValueError) as err:
        raise DecodeError("corrupt", f"cannot re-encode the image: {err}") from err
    return StoredCopy(buffer.getvalue(), rgb.size[0], rgb.size[1], source_width,
                      source_height, False)


def _size_if_already_a_copy(content: bytes,
                            max_short_side: int) -> Optional[tuple[int, int]]:
    """The size of a small RGB JPEG within the bound, without a rotation to
    apply (read from its header: nothing is decoded); None for anything else."""
    if len(content) > KEEP_BYTES or not _ends_whole(content):
        return None
    try:
        with Image.open(io.BytesIO(content)) as image:
            if (image.format == "JPEG" and image.mode == "RGB"
                    and min(image.size) <= max_short_side
                    and image.getexif().get(0x0112, 1) in (None, 1)):
                return image.size
    except Exception:
        pass
    return None


def _ends_whole(content: bytes) -> bool:
    """Whether the JPEG ends with its end-of-image marker: a cut transfer is
    not kept as it is (it goes the decoding way, which says what is wrong).
    Cheaper than decoding it (which is most of the fetch stage's CPU for
    small pictures); damage inside a whole file shows when it is embedded."""
    return content.rstrip(b"\0")[-2:] == b"\xff\xd9"
