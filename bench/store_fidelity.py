"""Benchmark: does the image store's copy embed like the original bytes?

The store keeps one model-independent copy per content (upright RGB, shorter
side at most STORE_PX, JPEG at QUALITY: `transforms/store/copies.py`), and
every model embeds that copy instead of the original. This measures, with a
TRAINED model (ImageNet EfficientNet-Lite0, built offline by `gbif-embed
make-model --arch efficientnet_lite0`; random weights would amplify any
change, see FIELD_NOTES) on the real photos of ../shared/data/fungi-images,
the cosine between the embedding of the original bytes and that of the
stored copy, each decoded and resized as the pipeline does, for both resize
modes; the bytes per stored picture and the time to make a copy; and, for
scale, the model's own sensitivity to ±1 in pixel values.

    .venv/bin/python bench/store_fidelity.py [--short_side 299] [--quality 95]

The last line is `store_cosine_min=<min over photos and modes> bytes_per_image=<mean>`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402

SVAMPEATLAS_IMAGES = 565_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short_side", type=int, default=None)
    parser.add_argument("--quality", type=int, default=None)
    parser.add_argument("--subsampling", type=int, default=None)
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    from transforms.embed.decode import decode_image
    from transforms.embed.models import load
    from transforms.store import copies
    if args.quality is not None:
        copies.QUALITY = args.quality
    if args.subsampling is not None:
        copies.SUBSAMPLING = args.subsampling
    short_side = args.short_side or copies.STORE_PX
    model = load(common.trained_model("tf1hub"))
    size = model.spec.image_size
    photos = common.real_photos()
    cosines: dict[str, list[float]] = {"squash": [], "center_crop": []}
    sizes, seconds, kept = [], [], 0
    for path in photos:
        original = open(path, "rb").read()
        start = time.perf_counter()
        copy = copies.make_copy(original, short_side=short_side)
        seconds.append(time.perf_counter() - start)
        sizes.append(len(copy.data))
        kept += copy.kept_as_fetched
        for mode in cosines:
            a = model.embed(decode_image(original, mode, size)[0][None])[0]
            b = model.embed(decode_image(copy.data, mode, size)[0][None])[0]
            cosines[mode].append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        print(f"{os.path.basename(path):<52} {len(original) // 1024:>6} kB → "
              f"{copy.width}x{copy.height} {len(copy.data) // 1024:>4} kB"
              f"{' (kept as fetched)' if copy.kept_as_fetched else ''}  cosine squash "
              f"{cosines['squash'][-1]:.5f} center_crop {cosines['center_crop'][-1]:.5f}")
    mean_bytes = float(np.mean(sizes))
    print(f"model: {model.spec.describe()} (ImageNet EfficientNet-Lite0, trained weights)")
    print(f"store copy: the decoding scale whose shorter side covers {short_side} px "
          f"({short_side}-{2 * short_side - 1} px), JPEG quality {copies.QUALITY}, subsampling "
          f"{copies.SUBSAMPLING}; {kept} of {len(photos)} photos kept as fetched")
    # For scale: the model's own sensitivity, the original's model input with
    # +-1 added to each pixel value (a lossy copy cannot do better than rounding).
    rng = np.random.default_rng(0)
    floor = []
    for path in photos:
        pixels = decode_image(open(path, "rb").read(), "squash", size)[0]
        noisy = np.clip(pixels.astype(int) + rng.integers(-1, 2, pixels.shape), 0, 255)
        a, b = model.embed(pixels[None])[0], model.embed(noisy.astype(np.uint8)[None])[0]
        floor.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    print(f"for scale, the same model's cosine under +-1 pixel noise (squash): min "
          f"{min(floor):.5f}, mean {np.mean(floor):.5f}")
    for mode, values in cosines.items():
        print(f"cosine(original, stored copy), --resize {mode}: min {min(values):.5f}, "
              f"mean {np.mean(values):.5f}")
    print(f"bytes per stored picture: mean {mean_bytes / 1024:.1f} kB (these photos); "
          f"making a copy: mean {1000 * np.mean(seconds):.1f} ms, max "
          f"{1000 * max(seconds):.1f} ms")
    print(f"Svampeatlas at this mean: {SVAMPEATLAS_IMAGES:,} × {mean_bytes / 1024:.1f} kB = "
          f"{SVAMPEATLAS_IMAGES * mean_bytes / 1e9:.1f} GB")
    worst = min(min(v) for v in cosines.values())
    print(f"store_cosine_min={worst:.5f} bytes_per_image={mean_bytes:.0f}")


if __name__ == "__main__":
    main()
