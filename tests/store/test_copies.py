"""The image store's copy of a picture: upright, RGB, bounded, and kept as
fetched when it already is one."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
from transforms.common.pictures import DecodeError
from transforms.store.copies import STORE_PX, make_copy


def _png_with_alpha(size=(900, 600)) -> bytes:
    image = Image.new("RGBA", size, (10, 200, 30, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    """A 1200x800 picture stored sideways, with EXIF orientation 6 (rotate 90°)."""
    image = synthetic_photo(3, size=(1200, 800))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_a_large_photo_is_kept_at_the_decoding_scale_that_covers_the_bound():
    """2400x1800: at 1/8 the shorter side (225) would not cover 299; at 1/4 it does."""
    original = jpeg_bytes(synthetic_photo(1, size=(2400, 1800)))
    copy = make_copy(original)
    assert (copy.width, copy.height) == (600, 450)
    assert STORE_PX <= min(copy.width, copy.height) < 2 * STORE_PX
    assert (copy.source_width, copy.source_height) == (2400, 1800)
    assert not copy.kept_as_fetched
    assert len(copy.data) < len(original) / 2
    with Image.open(io.BytesIO(copy.data)) as stored:
        assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", (600, 450))


def test_the_model_sees_what_the_original_would_have_given_it():
    """The copy is at the scale the model's own decode picks, so its model input
    differs from the original's by one JPEG round trip only."""
    import numpy as np

    from transforms.embed.decode import decode_image
    original = jpeg_bytes(synthetic_photo(6, size=(1600, 1200)))
    copy = make_copy(original)
    for mode in ("squash", "center_crop"):
        for size in (224, 299):
            a = decode_image(original, mode, size)[0].astype(int)
            b = decode_image(copy.data, mode, size)[0].astype(int)
            assert np.abs(a - b).mean() < 1.5, (mode, size)


def test_a_small_rgb_jpeg_is_kept_bit_for_bit():
    original = jpeg_bytes(synthetic_photo(2, size=(300, 300)))
    copy = make_copy(original)
    assert copy.kept_as_fetched and copy.data == original
    assert (copy.width, copy.height) == (300, 300)


def test_orientation_is_applied_and_other_modes_become_rgb():
    copy = make_copy(_rotated_jpeg())
    assert (copy.width, copy.height) == (400, 600)  # upright: taller than wide, at 1/2
    assert (copy.source_width, copy.source_height) == (1200, 800)  # as the host serves it
    png = make_copy(_png_with_alpha())  # not a JPEG: resampled to the bound
    assert (png.width, png.height) == (448, STORE_PX)
    with Image.open(io.BytesIO(png.data)) as stored:
        assert (stored.format, stored.mode) == ("JPEG", "RGB")
        assert stored.getpixel((5, 5)) >= (250, 250, 250)  # transparency onto white


@pytest.mark.parametrize("content, reason", [
    (b"<html>not a picture</html>", "not_an_image"),
    (jpeg_bytes(synthetic_photo(4, size=(1600, 1200)))[:4000], "truncated"),
    # Small enough to be kept as fetched, were it whole: a cut transfer never is.
    (jpeg_bytes(synthetic_photo(4, size=(320, 320)))[:3000], "truncated"),
])
def test_what_is_not_a_picture_says_why(content, reason):
    with pytest.raises(DecodeError) as err:
        make_copy(content)
    assert err.value.reason == reason


def test_the_pixel_cap_holds_before_decoding():
    with pytest.raises(DecodeError) as err:
        make_copy(jpeg_bytes(synthetic_photo(5, size=(2000, 2000))), max_pixels=1_000_000)
    assert err.value.reason == "decompression_bomb"
