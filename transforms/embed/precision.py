"""Numeric precision of inference, and what the CPU offers for it.

bfloat16 runs fast on CPUs only with AVX512-BF16 or AMX; oneDNN's auto mixed
precision is a Grappler option of the whole process (see
`configure_tensorflow`), so it is set where a process first loads its model.
"""
from __future__ import annotations

import logging

from transforms.embed.tf_quiet import import_tensorflow

PRECISIONS = ("float32", "bfloat16")  # what TensorFlow itself is set to
_LOG = logging.getLogger(__name__)


def configure_tensorflow(threads: int = 0, precision: str = "float32") -> None:
    """TensorFlow's thread pools and precision, for this whole process.

    Thread pools can be sized only before TensorFlow starts its runtime; a
    process where it already runs (the in-process runner, after the
    launcher's contract check) keeps its pools, which by default use all
    the cores. The precision is a Grappler option of the process: it applies
    to every function called after it is set, including functions that ran
    before (TensorFlow instantiates them again under the new options), and
    also to the functions `hub.load` wraps from TF1 graphs (checked: oneDNN
    then runs `avx512_core_bf16` convolutions). float32 switches it back off.
    """
    tf = import_tensorflow()
    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError:
            _LOG.warning("TensorFlow already runs in this process; its thread pools keep "
                         "their sizes (intra-op %s, inter-op %s) instead of %s threads",
                         tf.config.threading.get_intra_op_parallelism_threads() or "all cores",
                         tf.config.threading.get_inter_op_parallelism_threads() or "all cores",
                         threads)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    wanted = precision == "bfloat16"
    option = "auto_mixed_precision_onednn_bfloat16"
    if bool(tf.config.optimizer.get_experimental_options().get(option)) != wanted:
        # Only on a change: new options make TensorFlow optimize functions again.
        tf.config.optimizer.set_experimental_options({option: wanted})


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_supports_bfloat16() -> bool:
    """oneDNN runs bfloat16 fast only with AVX512-BF16 or AMX."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
