"""Benchmark: every precision this CPU can run, speed and fidelity, and what `auto` would pick.

Precisions: float32 and bfloat16 (TensorFlow; bfloat16 only with AVX512-BF16
or AMX), float32-ort (the TF1 Hub module converted by tf2onnx, in ONNX
Runtime), int8 (its ONNX Runtime static quantisation, calibrated on 32 of
the pictures: `bench/int8.py`), int8-mixed (the first 40% of the
compute nodes kept float) and, without VNNI, int8-saturating (the fast
uint8 x int8 kernel, whose 16-bit sums saturate there: speed without fidelity).

Fidelity only on the trained EfficientNet-Lite0 (random weights are chaotic),
on 48 pictures (the 12 real photos of ../shared as the store's copy decodes
them, mirrored, cropped and rotated), by `transforms.embed.fidelity.self_check` against
float32. Speed on Lite0 and on the Inception-v4 stand-in (the fungi model's
compute cost). Each precision runs in its own process; they take turns,
`--calls` batches per round in alternating order; figures are medians over
rounds of the ratio to float32 within a round. The pick is what the
pipeline's `--precision auto` picks on this CPU (bfloat16 where the CPU runs
it and it passes the self-check on Lite0, else float32); the benchmark also
says which of everything it evaluated would be fastest at the fidelity bound
(int8 only at INT8_MIN_GAIN x the fastest float one). The last line is
`precision_speedup=<pick / float32>` on Inception-v4.

    .venv/bin/python bench/precision.py [--rounds 5] [--calls 2] [--batch_size 16]
        [--threads 2] [--int8_from tf1hub|onnx] [--skip_inception]
"""
from __future__ import annotations

import argparse
import io
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

ARCHS = {"efficientnet_lite0": (224, 1280), "inception_v4": (299, 256)}
MIXED_HEAD = 0.4  # share of compute nodes kept float in int8-mixed (passes on Lite0)
INT8_MIN_GAIN = 1.5  # int8 must beat the fastest float precision that passes by this much


def pictures(size: int) -> np.ndarray:
    """48 uint8 pictures: each real photo's store copy, then mirrored, cropped
    (central 80%) and rotated 8 degrees, decoded as the pipeline does."""
    from PIL import Image

    from transforms.embed.decode import decode_image
    from transforms.store.copies import make_copy
    copies = [make_copy(open(p, "rb").read()).data for p in common.real_photos()]
    variants = []
    for turn in range(4):
        for data in copies:
            if turn:
                image = Image.open(io.BytesIO(data)).convert("RGB")
                w, h = image.size
                image = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                         image.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
                         image.rotate(8, resample=Image.Resampling.BILINEAR)][turn - 1]
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                data = buffer.getvalue()
            variants.append(decode_image(data, resize="squash", size=size)[0])
    return np.stack(variants)


# ------------------------------------------------------------------ child side

def child(args: argparse.Namespace) -> None:
    """Load one precision, then obey `run N` / `embed IN OUT` / `quit` on stdin."""
    from transforms.embed.precision import configure_tensorflow
    if args.child in ("float32", "bfloat16"):
        configure_tensorflow(args.threads, args.child)
    from transforms.embed.models import load
    if args.model.endswith(".onnx"):  # a converted or quantised graph
        from bench.int8 import load_quantized
        from transforms.embed.spec import ModelSpec
        spec = ModelSpec(format="onnx", image_size=args.size, layout=args.layout, width=0,
                         normalize=args.normalize)
        model = load_quantized(args.model, spec, args.threads,
                               precise=False if args.child == "int8-saturating" else None)
    else:
        model = load(args.model, normalize="unit" if args.child in ("float32", "bfloat16")
                     else "imagenet", threads=args.threads)
    batch = np.load(args.batch)
    model.embed(batch)  # first call: tracing, kernels, prepacking
    _reply({"ready": args.child, "amx": amx_requested()})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            start = time.perf_counter()
            for _ in range(int(command[1])):
                model.embed(batch)
            _reply({"seconds": time.perf_counter() - start})
        elif command[0] == "embed":
            pixels = np.load(command[1])
            n = args.batch_size
            np.save(command[2], np.concatenate([model.embed(pixels[i:i + n])
                                                for i in range(0, len(pixels), n)]))
            _reply({"saved": command[2]})
        else:
            return


def amx_requested() -> bool:
    """Whether this process holds Linux's AMX tile permission (arch_prctl
    ARCH_GET_XCOMP_PERM, bit 18): oneDNN and ONNX Runtime's MLAS request it
    before they dispatch to AMX kernels, so `no` on an AMX CPU means no AMX."""
    import ctypes
    mask = ctypes.c_uint64(0)
    try:
        if ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(mask)) != 0:  # x86-64 only
            return False
    except (OSError, AttributeError):
        return False
    return bool(mask.value & (1 << 18))


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ parent side

class Child:
    def __init__(self, precision: str, model: str, args: argparse.Namespace, size: int,
                 batch: str, layout: str = "NHWC", normalize: str = "unit"):
        self.precision = precision
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--child", precision, "--model", model, "--batch", batch,
             "--size", str(size), "--layout", layout, "--normalize", normalize,
             "--batch_size", str(args.batch_size), "--threads", str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self.read()

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the {self.precision} subprocess died")

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


def int8_models(arch: str, source: str, calibration: np.ndarray, work: str
                ) -> tuple[dict, dict]:
    """{precision: (path, layout, normalize)} and the fixed costs, in seconds."""
    from bench.int8 import quantize_onnx, timed
    from transforms.embed.spec import ModelSpec
    size = ARCHS[arch][0]
    costs = {}
    if source == "tf1hub":
        from transforms.embed.models import load
        from bench.int8_convert import tf_to_onnx
        model = load(common.model(arch, "tf1hub"))
        src, costs["tf2onnx"] = timed(tf_to_onnx, model, os.path.join(work, f"{arch}.onnx"))
        spec = model.spec
    else:
        src = os.path.join(common.model(arch, "onnx"), "model.onnx")
        spec = ModelSpec("onnx", size, "NCHW", 0, "imagenet")
    out = {"float32-ort": (src, spec.layout, spec.normalize)} if source == "tf1hub" else {}
    for name, head in (("int8", 0.0), ("int8-mixed", MIXED_HEAD)):
        path = os.path.join(work, f"{arch}-{name}.onnx")
        _, costs[f"calibrate+quantize {name}"] = timed(quantize_onnx, src, calibration, spec,
                                                       path, float_head=head)
        out[name] = (path, spec.layout, spec.normalize)
    return out, costs


def measure(arch: str, args: argparse.Namespace, precisions: list, pixels: np.ndarray,
            work: str, fidelity: bool) -> dict:
    """Rates per round for each precision, and (if `fidelity`) self-check results."""
    from bench.int8 import CALIBRATION_PICTURES
    from transforms.embed.fidelity import self_check
    size = ARCHS[arch][0]
    int8, costs = int8_models(arch, args.int8_from, pixels[:CALIBRATION_PICTURES], work)
    for step, seconds in costs.items():
        print(f"{arch}: fixed cost {step}: {seconds:.1f} s")
    int8["int8-saturating"] = int8["int8"]
    batch, photos = os.path.join(work, "batch.npy"), os.path.join(work, "photos.npy")
    np.save(batch, pixels[:args.batch_size])
    np.save(photos, pixels)
    children = {}
    try:
        for p in precisions:
            if p in int8:
                path, layout, normalize = int8[p]
                children[p] = Child(p, path, args, size, batch, layout, normalize)
            else:
                fmt = "onnx" if p == "float32-ort" else "tf1hub"
                children[p] = Child(p, common.model(arch, fmt), args, size, batch)
            print(f"{arch} {p}: loaded; AMX tile permission requested: "
                  f"{'yes' if children[p].hello['amx'] else 'no'}")
        rates = {p: [] for p in precisions}
        for round_no in range(args.rounds):
            for p in precisions if round_no % 2 == 0 else precisions[::-1]:
                seconds = children[p].ask(f"run {args.calls}")["seconds"]
                rates[p].append(args.calls * args.batch_size / seconds)
            log(f"{arch} round {round_no + 1}: " + ", ".join(
                f"{p} {rates[p][-1]:.1f}" for p in precisions))
        checks = {}
        if fidelity:
            embedded = {}
            for p in precisions:
                children[p].ask(f"embed {photos} {os.path.join(work, p + '.npy')}")
                embedded[p] = np.load(os.path.join(work, p + ".npy"))
            originals = len(common.real_photos())
            checks = {p: (self_check(embedded["float32"], e),
                          self_check(embedded["float32"][:originals], e[:originals]))
                      for p, e in embedded.items()}
    finally:
        for c in children.values():
            c.close()
    return {"rates": rates, "checks": checks}


def report(arch: str, result: dict) -> dict:
    """Prints one line per precision; returns {precision: median per-round ratio}."""
    rates, checks = result["rates"], result["checks"]
    ratios = {}
    for p, values in rates.items():
        per_round = [v / f for v, f in zip(values, rates["float32"])]
        ratios[p] = common.median(per_round)
        line = (f"{arch} {p:16s} {common.median(values):7.2f} images/s  speed-up over float32 "
                f"{ratios[p]:.2f} (rounds: {', '.join(f'{r:.2f}' for r in per_round)})")
        if p in checks:
            full, originals = checks[p]
            line += (f"  cosine min {full['cosine_min']:.4f} mean {full['cosine_mean']:.4f} "
                     f"nn {full['neighbour_agreement']:.3f} (12 originals: nn "
                     f"{originals['neighbour_agreement']:.3f}) "
                     f"self-check {'passed' if full['passed'] else 'FAILED'}")
        print(line)
    return ratios


def best_evaluated(precisions: list, checks: dict, ratios: dict) -> str:
    """Of everything evaluated, the fastest that passes the self-check; an int8
    one only if it is INT8_MIN_GAIN times the fastest float one that passes
    (float32-ort included: a gain of the runtime is not a gain of int8)."""
    passing = [p for p in precisions if checks[p][0]["passed"]]
    floats = [p for p in passing if not p.startswith("int8")]
    best_float = max(floats, key=lambda p: ratios[p])
    for p in passing:
        if p.startswith("int8"):
            print(f"{p}: {ratios[p] / ratios[best_float]:.2f}x {best_float} (needs "
                  f"{INT8_MIN_GAIN}), {ratios[p]:.2f}x float32")
    eligible = floats + [p for p in passing if p.startswith("int8")
                         and ratios[p] >= INT8_MIN_GAIN * ratios[best_float]]
    return max(eligible, key=lambda p: ratios[p])


def auto_pick(checks: dict) -> str:
    """What the pipeline's `--precision auto` picks for a TF1 Hub model on this
    CPU: its candidates in order (transforms/embed/auto_precision.py), the first
    that passes the self-check here, else float32."""
    from transforms.embed.auto_precision import candidates
    return next((p for p in candidates("tf1hub") if p in checks and checks[p][0]["passed"]),
                "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="batches per turn")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--int8_from", choices=("tf1hub", "onnx"), default="tf1hub")
    parser.add_argument("--skip_inception", action="store_true")
    for hidden in ("--child", "--model", "--batch", "--layout", "--normalize"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"cpu {describe_cpu()}")
    from transforms.embed.precision import cpu_supports_bfloat16
    from bench.int8 import cpu_has_vnni
    precisions = ["float32"] + (["bfloat16"] if cpu_supports_bfloat16() else [])
    precisions += ["float32-ort", "int8", "int8-mixed"]
    precisions += [] if cpu_has_vnni() else ["int8-saturating"]
    print(f"batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds of "
          f"{args.calls} batches per precision, int8 from the {args.int8_from} build; "
          f"VNNI {'yes' if cpu_has_vnni() else 'no'}")
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as work:
        lite0 = measure("efficientnet_lite0", args, precisions, pictures(224), work, True)
        lite0_ratios = report("efficientnet_lite0", lite0)
        pick = auto_pick(lite0["checks"])
        best = best_evaluated(precisions, lite0["checks"], lite0_ratios)
        speedup = lite0_ratios[pick]
        print(f"--precision auto picks {pick} on this CPU (its candidates: bfloat16 where the "
              f"CPU has AVX512-BF16 or AMX, kept if it passes the self-check; else float32). "
              f"The fastest of everything evaluated that passes the self-check is {best} "
              f"({lite0_ratios[best]:.2f}x float32 on Lite0; int8 counted only at >= "
              f"{INT8_MIN_GAIN}x the fastest float precision that passes)")
        basis = "efficientnet_lite0"
        if not args.skip_inception:
            inception = measure("inception_v4", args, precisions, pictures(299)[:32], work, False)
            speedup = report("inception_v4", inception)[pick]
            basis = "inception_v4 (the fungi model's compute-cost stand-in)"
    print(f"load average {os.getloadavg()[0]:.2f}; precision_speedup is {pick} / float32 "
          f"on {basis}")
    print(f"precision_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
