"""Bytes of a picture → an upright RGB picture, decoded no larger than needed.

Both the image store (its model-independent copy) and the embed stage (the
model's input) decode, so this is shared. Decoding is the most expensive
step after inference, so JPEGs are decoded at a reduced size (libjpeg's DCT
scaling through Pillow's `draft`) whenever the result still covers the
target; that is 3-4× faster on camera photos. Every failure has a stable
reason code (`not_an_image`, `truncated`, `corrupt`, `decompression_bomb`).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("squash", "center_crop")

# Pillow warns and then raises for large images; the cap is ours to set.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(Exception):
    """An image that cannot become a picture; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decode_rgb(content: bytes, resize: str = "squash", size: int = 299,
               max_pixels: int = 100_000_000) -> tuple[Image.Image, int, int]:
    """Bytes → (RGB picture, decoded at the least size that still covers
    `size` after `resize`, original width, original height).

    The original size is the stored picture's, before EXIF rotation, so
    that it matches what the host serves.
    """
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
                image.draft("RGB", draft_size(width, height, resize, size))
            else:
                image.seek(0)  # GIF/WebP/TIFF: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
    except DecodeError:
        raise
    except OSError as err:
        message = str(err)
        reason = "truncated" if "truncated" in message or "broken data" in message else "corrupt"
        raise DecodeError(reason, f"cannot decode the image: {message}") from err
    except Exception as err:
        raise DecodeError("corrupt", f"cannot decode the image: {err}") from err
    return rgb, width, height


def draft_size(width: int, height: int, resize: str, size: int) -> tuple[int, int]:
    """The smallest decode size that still covers the target after cropping."""
    if resize == "squash":
        return (size, size)
    # center_crop keeps the shorter side, so only that side must cover `size`.
    scale = size / max(1, min(width, height))
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
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


def center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))
