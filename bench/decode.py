"""Benchmark: reduced-size JPEG decoding against a full decode.

`transforms.embed.decode.decode_image` decodes JPEGs at a reduced size (libjpeg's
DCT scaling through Pillow's `draft`) when the result still covers 299×299.
The baseline decodes every pixel of the picture and then does the same
steps: EXIF orientation, RGB, the same bilinear resize to 299×299.

The picture is the 4288×2848 camera photo of ../shared/data/fungi-images
(read in place). The two ways alternate within each round, so machine noise
hits both alike; the figure is the ratio of their median times. Also printed:
the mean absolute difference between the two 299×299 results (0-255 scale).

    .venv/bin/python bench/decode.py [--rounds 30] [--photo NAME]

The last line is `decode_speedup=<ratio>`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from bench import common  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402
from transforms.common.pictures import to_rgb as _to_rgb  # noqa: E402
from transforms.embed.decode import SIZE, decode_image  # noqa: E402


def full_decode(content: bytes, size: int = SIZE) -> np.ndarray:
    """decode_image's steps without the reduced-size decode."""
    image = Image.open(io.BytesIO(content))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--photo", default=common.BIG_PHOTO)
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    path = os.path.join(common.FUNGI_IMAGES, args.photo)
    if not os.path.exists(path):
        sys.exit(f"needs {path} (real photos read in place from ../shared)")
    with open(path, "rb") as handle:
        content = handle.read()

    reduced, width, height = decode_image(content)
    full = full_decode(content)
    times = {"reduced": [], "full": []}
    ways = {"reduced": lambda: decode_image(content)[0], "full": lambda: full_decode(content)}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
    reduced_s, full_s = common.median(times["reduced"]), common.median(times["full"])
    mad = float(np.abs(reduced.astype(np.float32) - full.astype(np.float32)).mean())
    print(f"photo {args.photo} {width}x{height}, {len(content) / 1e6:.1f} MB, "
          f"{args.rounds} alternating rounds, one thread, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"reduced-size decode + resize (decode_image): median {reduced_s * 1000:.1f} ms "
          f"({1 / reduced_s:.1f} images/s)")
    print(f"full decode + same resize: median {full_s * 1000:.1f} ms ({1 / full_s:.1f} images/s)")
    print(f"mean absolute difference of the 299x299 results: {mad:.2f} (0-255), "
          f"max {int(np.abs(reduced.astype(int) - full.astype(int)).max())}")
    print(f"decode_speedup={full_s / reduced_s:.2f}")


if __name__ == "__main__":
    main()
