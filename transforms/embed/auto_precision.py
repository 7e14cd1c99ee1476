"""`--precision auto`: the fastest precision that proves itself on the run's own pictures.

Reduced precision is faithful on some models and not on others, and nobody
should have to know which before a run. So each worker process embeds its
first `SAMPLE` pictures in float32 (those rows are float32) and, for each
precision faster than float32 that this CPU runs well and this model's format
allows (fastest first), embeds the same pictures again and accepts the first
whose embeddings stay where float32 puts them (`fidelity.self_check`: cosine
>= 0.995 for every picture, each picture's nearest neighbour in the sample
unchanged for >= 95% of them). Every later picture of the process is then
embedded at that precision; every row says which (`precision`), so a snapshot
never mixes precisions silently. The verdict is kept on this machine, keyed
by the embedder's fingerprint and the CPU, so later processes and runs skip
the check (the fixed cost is paid once per model and kind of CPU).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Callable, Optional

import numpy as np

from transforms.embed.precision import cpu_flags, cpu_model, cpu_supports_bfloat16

SAMPLE = 32
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


class PrecisionChooser:
    """Embeds batches, float32 until the check has decided, then at its choice.

    `float32(pixels)` embeds in float32; `runner(precision)` returns a function
    that embeds at that precision (switching the process to it), and
    `runner("float32")` switches back. `key` identifies the embedder (its
    fingerprint). `embed` returns (vectors, precision of these vectors, the
    check's figures when this batch decided, else None).
    """

    def __init__(self, key: str, tried: list[str], float32: Callable,
                 runner: Callable[[str], Callable], fixed: Optional[str] = None):
        self._key, self._tried = key, list(tried)
        self._float32, self._runner = float32, runner
        self._lock = threading.Lock()
        self._sample_pixels: list[np.ndarray] = []
        self._sample_vectors: list[np.ndarray] = []
        self._current: Callable = float32
        self.precision: Optional[str] = fixed or (None if self._tried else "float32")
        self.check: Optional[dict] = None
        self._unreported = False
        if self.precision is None:
            verdict = read_verdict(key, self._tried)
            if verdict is not None:
                self.precision = verdict["precision"]
                self.check, self._unreported = dict(verdict, cached=True), True
                if self.precision != "float32":
                    self._current = self._runner(self.precision)

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, str, Optional[dict]]:
        with self._lock:
            if self.precision is None:
                vectors, precision = self._float32(pixels), "float32"
                self._sample_pixels.append(pixels)
                self._sample_vectors.append(vectors)
                if sum(len(p) for p in self._sample_pixels) >= SAMPLE:
                    self._decide()
            else:
                vectors, precision = self._current(pixels), self.precision
            report, self._unreported = (self.check if self._unreported else None), False
            return vectors, precision, report

    def _decide(self) -> None:
        from transforms.embed.fidelity import self_check
        pixels = np.concatenate(self._sample_pixels)[:SAMPLE]
        reference = np.concatenate(self._sample_vectors)[:SAMPLE]
        self._sample_pixels, self._sample_vectors = [], []
        checks = {}
        chosen = "float32"
        for precision in self._tried:
            try:
                run = self._runner(precision)
                candidate = np.concatenate([run(pixels[i:i + 16])
                                            for i in range(0, len(pixels), 16)])
                checks[precision] = self_check(reference, candidate)
            except Exception as err:  # a precision that cannot run is one that failed
                checks[precision] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
            if checks[precision]["passed"]:
                chosen = precision
                break
            _LOG.warning("--precision auto: %s did not pass the self-check on this run's "
                         "pictures (%s); trying the next precision", precision,
                         checks[precision])
        self._current = self._runner(chosen)
        self.precision = chosen
        self.check = {"precision": chosen, "tried": self._tried, "checks": checks,
                      "sample": int(len(pixels))}
        self._unreported = True
        try:
            write_verdict(self._key, self._tried, self.check)
        except OSError:
            pass
