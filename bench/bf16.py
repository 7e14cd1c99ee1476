"""Benchmark: bfloat16 against float32 inference, speed and agreement.

`--precision bfloat16` makes `transforms.embed.precision.configure_tensorflow` switch
on oneDNN's auto mixed precision (`auto_mixed_precision_onednn_bfloat16`), a
Grappler option of the whole process. So each precision runs in its own
subprocess that configures TensorFlow first and then loads the
`inception_v4` stand-in with `transforms.embed.models.load`, exactly as a worker
does. The two subprocesses take turns (only one computes at a time): in each
round each runs the same number of batches of the same uint8 input, so noise
from other processes hits both alike; the figure is the median over rounds of
the ratio within a round; the stand-in has the real model's cost, so speed is
measured on it. Fidelity is not: its random weights amplify any change (its
own cosine under ±1 pixel noise is 0.86), so both precisions then embed the
real photos of ../shared/data/fungi-images (the image store's copies, decoded
as the pipeline does) with a TRAINED model, ImageNet EfficientNet-Lite0
(`make-model --arch efficientnet_lite0`), and the cosine of each photo's two
embeddings is printed (min and mean), with how many photos keep their
nearest neighbour among the others.

A third and fourth short subprocess check that the option really changes
what runs: with ONEDNN_VERBOSE=1 they count the convolutions oneDNN executes
and the kernels it picks (bfloat16 ones, e.g. `avx512_core_bf16` or
`avx512_core_amx`, versus float32 ones).

    .venv/bin/python bench/bf16.py [--rounds 8] [--calls 2] [--batch_size 16]

The last line is `bf16_speedup=<ratio> cosine_min=<value>`.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


# ------------------------------------------------------------------ child side

def child(precision: str, model_dir: str, batch_size: int) -> None:
    """Configure, load, then obey `run N` / `embed IN OUT` / `quit` lines on stdin."""
    from transforms.embed.models import load
    from transforms.embed.precision import configure_tensorflow
    configure_tensorflow(0, precision)  # before anything runs, as a worker does
    import tensorflow as tf
    option = tf.config.optimizer.get_experimental_options().get(
        "auto_mixed_precision_onednn_bfloat16", False)
    model = load(model_dir)
    size = model.spec.image_size
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8)
    model.embed(batch)  # trace, optimize, create the kernels
    _reply({"ready": precision, "option": bool(option)})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            start = time.perf_counter()
            for _ in range(int(command[1])):
                model.embed(batch)
            _reply({"seconds": time.perf_counter() - start})
        elif command[0] == "embed":  # embed FILE.npy (uint8 pictures) into OUT.npy
            pixels = np.load(command[1])
            np.save(command[2], np.concatenate([model.embed(pixels[i:i + batch_size])
                                                for i in range(0, len(pixels), batch_size)]))
            _reply({"saved": command[2]})
        else:
            return


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def kernels(precision: str, model_dir: str) -> None:
    """One call of one image with ONEDNN_VERBOSE=1 set by the parent."""
    from transforms.embed.models import load
    from transforms.embed.precision import configure_tensorflow
    configure_tensorflow(0, precision)
    model = load(model_dir)
    print("-- first call --", flush=True)
    model.embed(np.zeros((1, 299, 299, 3), np.uint8))


# ------------------------------------------------------------------ parent side

class Child:
    def __init__(self, precision: str, model_dir: str, batch_size: int):
        self.precision = precision
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--child", precision, "--model", model_dir,
             "--batch_size", str(batch_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self.read()

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.precision} subprocess died")
            if line.startswith("{"):
                return json.loads(line)

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


def count_kernels(precision: str, model_dir: str) -> collections.Counter:
    """Which convolution kernels oneDNN runs in a fresh process of `precision`."""
    done = subprocess.run(
        [sys.executable, __file__, "--kernels", precision, "--model", model_dir],
        capture_output=True, text=True, env=dict(os.environ, ONEDNN_VERBOSE="1"),
        check=True)
    text = done.stdout + done.stderr
    after = text.split("-- first call --", 1)[-1]
    found = collections.Counter()
    for line in after.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields and "convolution" in fields:
            found[fields[fields.index("convolution") + 1]] += 1
    return found


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2, help="batches per turn")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--arch", default="inception_v4")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument("--kernels", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    if args.child:
        return child(args.child, args.model, args.batch_size)
    if args.kernels:
        return kernels(args.kernels, args.model)

    from transforms.embed.decode import decode_image
    from transforms.embed.precision import cpu_supports_bfloat16
    from transforms.store.copies import make_copy
    if not cpu_supports_bfloat16():
        sys.exit("this CPU has neither AVX512-BF16 nor AMX: --precision bfloat16 is refused")
    model_dir = common.model(args.arch)
    photos = common.real_photos()
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as work:
        def path(name: str) -> str:
            return os.path.join(work, name + ".npy")

        trained = common.trained_model("tf1hub")
        copies = [make_copy(open(p, "rb").read()).data for p in photos]
        np.save(path("photos"), np.stack([decode_image(c, size=224)[0] for c in copies]))
        children = {}
        try:
            for precision in PRECISIONS:
                children[precision] = Child(precision, model_dir, args.batch_size)
                log(f"{precision}: loaded; auto_mixed_precision_onednn_bfloat16 = "
                    f"{children[precision].hello['option']}")
            rates = {p: [] for p in PRECISIONS}
            images = args.calls * args.batch_size
            for round_no in range(args.rounds):
                order = PRECISIONS if round_no % 2 == 0 else PRECISIONS[::-1]
                for precision in order:
                    seconds = children[precision].ask(f"run {args.calls}")["seconds"]
                    rates[precision].append(images / seconds)
                log(f"round {round_no + 1}: " + ", ".join(
                    f"{p} {rates[p][-1]:.2f} images/s" for p in PRECISIONS))
        finally:
            for child_process in children.values():
                child_process.close()
        for precision in PRECISIONS:  # fidelity: the trained model, in a process of its own
            child_process = Child(precision, trained, args.batch_size)
            try:
                child_process.ask(f"embed {path('photos')} {path('trained-' + precision)}")
            finally:
                child_process.close()
        full, half = np.load(path("trained-float32")), np.load(path("trained-bfloat16"))
        cosine = _cosine(full, half)
        kept, total = common.nearest_unchanged(full, half)
    kernels_found = {p: count_kernels(p, model_dir) for p in PRECISIONS}

    f32, bf16 = common.median(rates["float32"]), common.median(rates["bfloat16"])
    per_round = [b / f for f, b in zip(rates["float32"], rates["bfloat16"])]
    print(f"model {args.arch}, batch {args.batch_size}, {args.rounds} alternating rounds of "
          f"{args.calls} batches per precision, each precision in its own process, "
          f"load average {os.getloadavg()[0]:.2f}")
    for p in PRECISIONS:
        print(f"{p}: median {common.median(rates[p]):.2f} images/s (rounds: "
              + ", ".join(f"{r:.1f}" for r in rates[p]) + ")")
    for p in PRECISIONS:
        found = kernels_found[p]
        print(f"{p}: oneDNN ran {sum(found.values())} convolutions in one call: "
              + ", ".join(f"{n}x {kernel}" for kernel, n in found.most_common()))
    bf16_kernels = sum(n for k, n in kernels_found["bfloat16"].items() if "bf16" in k
                       or "amx" in k)
    if not bf16_kernels:
        print("WARNING: no bfloat16 convolution ran: the option did not take effect")
    print(f"fidelity on ImageNet EfficientNet-Lite0 (trained), {len(photos)} real photos: "
          f"cosine(float32, bfloat16) min {cosine.min():.5f}, mean {cosine.mean():.5f}; "
          f"nearest neighbour among the others unchanged for {kept} of {total}")
    print(f"speedup: median of the per-round ratios {common.median(per_round):.2f} (rounds: "
          + ", ".join(f"{r:.2f}" for r in per_round) + f"); ratio of the medians {bf16 / f32:.2f}")
    print(f"bf16_speedup={common.median(per_round):.2f} cosine_min={cosine.min():.4f}")


if __name__ == "__main__":
    main()
