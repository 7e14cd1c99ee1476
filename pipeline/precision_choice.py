"""`--precision`, decided once for the whole job, by the launcher, before it starts.

Deciding in each worker process (after that process's own first pictures)
made a row's precision depend on how rows fell into processes: the same
export gave bfloat16 rows with one process and float32 rows with two. Here
the launcher decides, records the verdict and its figures in the manifest
(`precision`), and every worker embeds at that precision without checking.

`auto` on the local runner: float32 where the CPU runs no faster precision
(no AVX512-BF16 or AMX) or the model is ONNX; else the verdict kept on this
machine for this model and kind of CPU; else the check
(`transforms/embed/auto_precision.py`) on a sample of the run's own pictures
(`pipeline/precision_sample.py`: the store's copies, or the export's first
pictures fetched into the store, never asked for twice). On a distributed
runner the workers' CPUs are not known at launch, so `auto` means float32
there; `--precision bfloat16` asks for it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from transforms.embed.auto_precision import (MIN_SAMPLE, SAMPLE, candidates, decide,
                                             read_verdict)

_LOG = logging.getLogger(__name__)


def choose_precision(requested: str, model, *, distributed: bool,
                     sample: Callable[[], "object"]) -> dict:
    """The manifest's `precision`: `precision` (what every row is computed in),
    `requested`, `decided_by` (why, in words) and, where a check ran or was
    reused, its figures. `sample()` gives the run's pictures (a
    `precision_sample.Sample`), called only when a check must run."""
    entry = {"requested": requested}
    if requested != "auto":
        return dict(entry, precision=requested, decided_by=f"--precision {requested}")
    tried = candidates(model.spec.format, "auto")
    if not tried:
        why = ("ONNX models run float32 (oneDNN's bfloat16 is TensorFlow's)"
               if model.spec.format == "onnx" else
               "this CPU runs no faster precision (neither avx512_bf16 nor amx_bf16)")
        return dict(entry, precision="float32", decided_by=why)
    if distributed:
        return dict(entry, precision="float32", decided_by=(
            "auto on a distributed runner: the workers' CPUs are not known at launch "
            "(--precision bfloat16 asks for it)"))
    verdict = read_verdict(model.fingerprint, tried)
    if verdict is not None:
        return dict(entry, precision=verdict["precision"], checks=verdict.get("checks"),
                    tried=tried, decided_by="the verdict kept on this machine for this model "
                                            "and kind of CPU")
    started = time.monotonic()
    pictures = sample()
    figures = {"sample": pictures.describe()}
    if len(pictures.pixels) < MIN_SAMPLE:
        return dict(entry, **figures, precision="float32", tried=tried, decided_by=(
            f"too few of the run's pictures for the check ({len(pictures.pixels)}, "
            f"at least {MIN_SAMPLE})"))
    verdict = decide(model.fingerprint, tried, _runner(model), _stack(pictures.pixels))
    figures["check_s"] = round(time.monotonic() - started, 2)
    chosen = verdict["precision"]
    return dict(entry, **figures, precision=chosen, tried=tried, checks=verdict["checks"],
                decided_by=(f"the check on {verdict['sample']} of the run's pictures"
                            f" ({pictures.source})"))


def _stack(pixels: list):
    import numpy as np
    return np.stack(pixels[:SAMPLE])


def _runner(model) -> Callable[[str], Callable]:
    """`runner(name)`: this process switched to that precision, and the
    function that embeds in it (the model loaded once, as workers load it)."""
    from transforms.embed.models import load
    from transforms.embed.precision import configure_tensorflow
    spec = model.spec
    loaded = load(model.uri, spec.normalize, spec.image_size if spec.size_from != "model" else 0)

    def runner(name: str) -> Callable:
        configure_tensorflow(0, name)
        return loaded.embed
    return runner
