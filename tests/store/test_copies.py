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


def test_a_large_photo_is_downscaled_to_the_bound_on_its_shorter_side():
    original = jpeg_bytes(synthetic_photo(1, size=(2400, 1800)))
    copy = make_copy(original)
    assert (copy.width, copy.height) == (427, STORE_PX)
    assert (copy.source_width, copy.source_height) == (2400, 1800)
    assert not copy.kept_as_fetched
    assert len(copy.data) < len(original) / 4
    with Image.open(io.BytesIO(copy.data)) as stored:
        assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", (427, STORE_PX))


def test_a_small_rgb_jpeg_is_kept_bit_for_bit():
    original = jpeg_bytes(synthetic_photo(2, size=(300, 300)))
    copy = make_copy(original)
    assert copy.kept_as_fetched and copy.data == original
    assert (copy.width, copy.height) == (300, 300)


def test_orientation_is_applied_and_other_modes_become_rgb():
    copy = make_copy(_rotated_jpeg())
    assert (copy.width, copy.height) == (STORE_PX, 480)  # upright: taller than wide
    assert (copy.source_width, copy.source_height) == (1200, 800)  # as the host serves it
    png = make_copy(_png_with_alpha())
    with Image.open(io.BytesIO(png.data)) as stored:
        assert (stored.format, stored.mode) == ("JPEG", "RGB")
        assert stored.getpixel((5, 5)) >= (250, 250, 250)  # transparency onto white


@pytest.mark.parametrize("content, reason", [
    (b"<html>not a picture</html>", "not_an_image"),
    (jpeg_bytes(synthetic_photo(4, size=(1600, 1200)))[:4000], "truncated"),
])
def test_what_is_not_a_picture_says_why(content, reason):
    with pytest.raises(DecodeError) as err:
        make_copy(content)
    assert err.value.reason == reason


def test_the_pixel_cap_holds_before_decoding():
    with pytest.raises(DecodeError) as err:
        make_copy(jpeg_bytes(synthetic_photo(5, size=(2000, 2000))), max_pixels=1_000_000)
    assert err.value.reason == "decompression_bomb"
