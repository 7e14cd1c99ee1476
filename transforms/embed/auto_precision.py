"""`--precision auto`: the fastest precision that proves itself on the run's own pictures.

Reduced precision is faithful on some models and not on others, and nobody
should have to know which before a run. So, for each precision faster than
float32 that this CPU runs well and this model's format allows (fastest
first), a sample of the run's pictures is embedded in float32 and in that
precision, and the first whose embeddings stay where float32 puts them is
taken (`fidelity.self_check`: cosine >= 0.995 for every picture, each
picture's nearest neighbour in the sample unchanged for >= 95% of them).

The decision is made once for the whole job, by the launcher, before the
pipeline starts (`pipeline/precision_choice.py`); every worker then embeds at
that precision and checks nothing. (Deciding in each worker process made a
row's precision depend on how rows fell into processes.) The verdict is kept
on this machine, keyed by the embedder's fingerprint and the CPU, so later
runs skip the check: its fixed cost is paid once per model and kind of CPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Callable, Optional

import numpy as np

from transforms.embed.precision import cpu_flags, cpu_model, cpu_supports_bfloat16

SAMPLE = 32      # pictures embedded twice by the check
MIN_SAMPLE = 8   # fewer than this and the check cannot say much: float32
CHECK_BATCH = 16
PRECISIONS = ("auto", "float32", "bfloat16", "int8")
_LOG = logging.getLogger(__name__)
_VERDICTS = os.path.join(tempfile.gettempdir(), "gbif-embed-precision")


def candidates(model_format: str, requested: str = "auto") -> list[str]:
    """Precisions to try before float32, fastest first. bfloat16 runs fast only
    with AVX512-BF16 or AMX, and only TensorFlow models run it (oneDNN's auto
    mixed precision). int8 is never among auto's candidates: on this project's
    measurements it does not pay (README, Performance); it stays available by
    name where the quantiser is installed."""
    if requested != "auto":
        return [] if requested == "float32" else [requested]
    found = []
    if model_format != "onnx" and cpu_supports_bfloat16():
        found.append("bfloat16")
    return found


def _verdict_path(key: str, tried: list[str]) -> str:
    cpu = json.dumps([cpu_model(), sorted(cpu_flags() & {"avx512_bf16", "amx_bf16",
                                                          "amx_int8", "avx512_vnni",
                                                          "avx_vnni", "avx512f"}), tried])
    digest = hashlib.sha256((key + cpu).encode()).hexdigest()[:24]
    return os.path.join(_VERDICTS, f"{digest}.json")


def read_verdict(key: str, tried: list[str]) -> Optional[dict]:
    try:
        with open(_verdict_path(key, tried)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_verdict(key: str, tried: list[str], verdict: dict) -> None:
    path = _verdict_path(key, tried)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scratch = f"{path}.{os.getpid()}.tmp"
    with open(scratch, "w") as handle:
        json.dump(verdict, handle)
    os.replace(scratch, path)


def _embed(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(run(pixels[i:i + CHECK_BATCH]), np.float32)
                           for i in range(0, len(pixels), CHECK_BATCH)])


def decide(key: str, tried: list[str], runner: Callable[[str], Callable],
           pixels: np.ndarray) -> dict:
    """The check on a sample: `runner(name)` switches the process to that
    precision and returns the function that embeds in it. Returns the verdict
    (`precision`, `tried`, `checks`: each candidate's figures, `sample`), kept
    on this machine for `key`; the process is left in float32."""
    from transforms.embed.fidelity import self_check
    pixels = np.asarray(pixels)[:SAMPLE]
    reference = _embed(runner("float32"), pixels)
    checks: dict = {}
    chosen = "float32"
    for precision in tried:
        try:
            checks[precision] = self_check(reference, _embed(runner(precision), pixels))
        except Exception as err:  # a precision that cannot run is one that failed
            checks[precision] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        if checks[precision]["passed"]:
            chosen = precision
            break
        _LOG.warning("--precision auto: %s did not pass the self-check on this run's "
                     "pictures (%s); trying the next precision", precision, checks[precision])
    runner("float32")
    verdict = {"precision": chosen, "tried": list(tried), "checks": checks,
               "sample": int(len(pixels))}
    try:
        write_verdict(key, tried, verdict)
    except OSError:
        pass
    return verdict
