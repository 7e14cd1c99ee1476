"""Decoding and resizing: formats, colour modes, orientation and refusals."""
from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.conftest import shared_path
from transforms.embed.decode import DecodeError, DecodeImages, decode_image
from transforms.common.records import FAILURES
from transforms.common.tally import TALLY


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _left_red_right_blue(w=400, h=200) -> Image.Image:
    array = np.zeros((h, w, 3), np.uint8)
    array[:, : w // 2] = (255, 0, 0)
    array[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(array)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP"])
def test_formats_give_299_rgb_uint8(fmt):
    image = _left_red_right_blue()
    pixels, width, height = decode_image(_encode(image, fmt))
    assert pixels.shape == (299, 299, 3) and pixels.dtype == np.uint8
    assert (width, height) == (400, 200)
    assert pixels[150, 20, 0] > 200 and pixels[150, 20, 2] < 60    # red stays left
    assert pixels[150, 280, 2] > 200 and pixels[150, 280, 0] < 60  # blue stays right


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((0, 255, 0), (255, 0, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels, _, _ = decode_image(data)
    assert pixels[..., 1].mean() > 200 and pixels[..., 0].mean() < 30


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16"])
def test_colour_modes_become_rgb(mode):
    grey = Image.new("RGB", (50, 40), (200, 200, 200))
    image = grey.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else grey.convert(mode)
    fmt = {"CMYK": "JPEG", "I;16": "PNG"}.get(mode, "PNG")
    pixels, _, _ = decode_image(_encode(image, fmt))
    assert pixels.shape == (299, 299, 3)
    assert pixels.std(axis=2).max() < 3  # grey stays grey


def test_alpha_is_flattened_onto_white():
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    pixels, _, _ = decode_image(_encode(image, "PNG"))
    assert pixels.min() == 255


def test_exif_orientation_is_applied():
    image = _left_red_right_blue(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    pixels, width, height = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert (width, height) == (400, 200)  # the stored size
    assert pixels[20, 150, 0] > 200 and pixels[280, 150, 2] > 200  # red on top now


def test_center_crop_keeps_the_middle():
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255  # a white middle third
    data = _encode(Image.fromarray(array), "PNG")
    cropped, _, _ = decode_image(data, "center_crop")
    squashed, _, _ = decode_image(data, "squash")
    assert cropped.min() > 240
    assert squashed[:, :50].max() < 10


def test_refusals_have_reasons():
    jpeg = _encode(_left_red_right_blue(), "JPEG")
    for data, reason in [(jpeg[: len(jpeg) // 2], "truncated"),
                         (b"<!doctype html><html></html>", "not_an_image"),
                         (b"", "not_an_image")]:
        with pytest.raises(DecodeError) as err:
            decode_image(data)
        assert err.value.reason == reason
    with pytest.raises(DecodeError) as err:
        decode_image(jpeg, max_pixels=400 * 200 - 1)
    assert err.value.reason == "decompression_bomb" and "pixel cap" in err.value.detail


def test_decompression_bomb_header_is_refused_before_decoding():
    """A 30000×30000 PNG header with almost no data: refused without allocating it."""
    bomb = _encode(Image.new("1", (30000, 30000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, max_pixels=100_000_000)
    assert err.value.reason == "decompression_bomb"


def test_reduced_size_jpeg_decode_matches_full_decode():
    """A 4288×2848 camera photo: the DCT-scaled decode is close to decoding all of it."""
    data = shared_path("fungi-images", "mo_test_perf_unlabeled_small_gilled_mushroom.jpg") \
        .read_bytes()
    fast, width, height = decode_image(data)
    full = Image.open(io.BytesIO(data))
    full = np.asarray(full.convert("RGB").resize((299, 299), Image.Resampling.BILINEAR))
    assert (width, height) == (4288, 2848)
    assert np.abs(fast.astype(float) - full.astype(float)).mean() < 4.0


def test_decode_dofn_drops_bytes_and_reports_failures():
    good = _fetched(1, _encode(_left_red_right_blue(), "PNG"))
    bad = dict(_fetched(2, b"nope"), tasks=[{"gbifID": 2, "identifier": "u2"},
                                             {"gbifID": 3, "identifier": "u2"}])
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        out = (p | beam.Create([good, bad])
               | beam.ParDo(DecodeImages(threads=2)).with_outputs(FAILURES, TALLY, main="ok"))
        assert_that(out.ok | beam.Map(lambda d: (d["tasks"][0]["gbifID"], "content" in d,
                                                 d["width"], d["pixels"].shape)),
                    equal_to([(1, False, 400, (299, 299, 3))]), label="decoded")
        # An image shared by two rows fails for both rows.
        assert_that(out[FAILURES] | beam.Map(lambda f: (f["gbifID"], f["stage"], f["reason"],
                                                        f["attempts"])),
                    equal_to([(2, "decode", "not_an_image", 1), (3, "decode", "not_an_image", 1)]),
                    label="failed")


def _fetched(i: int, data: bytes) -> dict:
    """A fetched image as the fetch stage emits it: one URL, its rows in `tasks`."""
    return {"tasks": [{"gbifID": i, "identifier": f"u{i}"}], "content": data, "attempts": 1,
            "http_status": 200}


def test_decoding_keeps_a_lookahead_submitted_and_loses_nothing():
    """Results wait until more than `lookahead` pictures are submitted (so the
    pool works while the model infers), and the bundle's end drains them all."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    data = _encode(_left_red_right_blue(), "JPEG")
    dofn = DecodeImages(threads=2, lookahead=4)
    dofn.setup()
    try:
        dofn.start_bundle()
        emitted = []
        for i in range(4):
            emitted += list(dofn.process(_fetched(i, data), GlobalWindow(), MIN_TIMESTAMP))
        assert emitted == []  # four submitted: all kept back
        for i in range(4, 10):
            emitted += list(dofn.process(_fetched(i, data), GlobalWindow(), MIN_TIMESTAMP))
            assert len(emitted) <= i + 1 - 4  # never fewer than four left pending
        emitted += [out for out in dofn.finish_bundle() if not isinstance(out, TaggedOutput)]
    finally:
        dofn.teardown()
    assert sorted(wv.value["tasks"][0]["gbifID"] for wv in emitted) == list(range(10))
    assert all(wv.value["pixels"].shape == (299, 299, 3) for wv in emitted)


def test_decode_dofn_with_lookahead_in_a_pipeline():
    data = _encode(_left_red_right_blue(), "PNG")
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        out = (p | beam.Create([_fetched(i, data if i % 7 else b"junk") for i in range(60)])
               | beam.ParDo(DecodeImages(threads=3, lookahead=16))
               .with_outputs(FAILURES, TALLY, main="ok"))
        assert_that(out.ok | beam.Map(lambda d: d["tasks"][0]["gbifID"]),
                    equal_to([i for i in range(60) if i % 7]), label="decoded")
        assert_that(out[FAILURES] | beam.Map(lambda f: f["gbifID"]),
                    equal_to([i for i in range(60) if not i % 7]), label="failed")


def test_a_thumbnail_that_cannot_be_made_leaves_the_picture_embedded(monkeypatch):
    """The report's thumbnail is a courtesy: its failure costs the thumbnail only."""
    from transforms.embed import decode as decode_module

    def broken(_rgb, px=240):
        raise OSError("encoder error -2 when writing image file")
    monkeypatch.setattr(decode_module, "thumbnail_jpeg", broken)
    dofn = DecodeImages(threads=1, run="thumbnail-test")
    dofn.setup()
    image = {"content": _encode(_left_red_right_blue(), "JPEG"), "image_sha256": "00" * 32,
             "tasks": [{"gbifID": 1, "identifier": "http://h/1.jpg"}]}
    outputs = list(dofn.work(image))
    assert len(outputs) == 1 and outputs[0]["pixels"].shape == (299, 299, 3)
    assert dofn.tally.flush().get("decode.thumbnail_failed") == 1
    dofn.teardown()


def test_any_error_on_a_pictures_path_becomes_its_failure_rows(monkeypatch):
    """Not only DecodeError: whatever raises while a picture is decoded ends as
    internal_error rows for every row of the picture, never a failed bundle."""
    from transforms.embed import decode as decode_module

    def exploding(*_args, **_kwargs):
        raise MemoryError("cannot allocate")
    monkeypatch.setattr(decode_module, "model_input", exploding)
    dofn = DecodeImages(threads=1)
    dofn.setup()
    image = {"content": _encode(_left_red_right_blue(), "PNG"), "image_sha256": "ab" * 32,
             "tasks": [{"gbifID": 1, "identifier": "http://h/1.png"},
                       {"gbifID": 2, "identifier": "http://h/1.png"}]}
    outputs = list(dofn.work(image))
    assert [(o.tag, o.value["gbifID"], o.value["reason"], o.value["detail"])
            for o in outputs] == [
        (FAILURES, 1, "internal_error", "MemoryError: cannot allocate"),
        (FAILURES, 2, "internal_error", "MemoryError: cannot allocate")]
    dofn.teardown()

