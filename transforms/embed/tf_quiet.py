"""Importing TensorFlow without its start-up lines on every process's terminal.

TensorFlow's import writes a few lines straight to file descriptor 2 from
C++ (`All log messages before absl::InitializeLog() ...`, `Could not find
cuda drivers on your machine ...`, `oneDNN custom operations are on ...`),
once in the launcher and once in each worker process, before the first
progress line. `TF_CPP_MIN_LOG_LEVEL` hides only some of them (absl's own
lines ignore it). So the import runs with descriptor 2 redirected to a file,
and afterwards every line that is not one of those known notices is written
back: a real warning stays visible. `GBIF_EMBED_VERBOSE=1` (what `--verbose`
sets), or `TF_CPP_MIN_LOG_LEVEL` set by the user, leaves TensorFlow alone.

The import also keeps scikit-learn out: TensorFlow's import loads Keras,
whose scikit-learn wrappers import scikit-learn (and SciPy's parts it needs)
when it is installed, as the explore extra installs it. Nothing here uses
those wrappers, and that import is 0.5 s of CPU in every process that
embeds (CPU F): Keras takes scikit-learn's absence as it is meant to.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from typing import Any

from transforms.common.imports import without_modules

VERBOSE_ENV = "GBIF_EMBED_VERBOSE"
# Lines TensorFlow prints at import on a CPU machine, that say nothing about a run.
NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|"
    r"Could not find cuda drivers|"
    r"oneDNN custom operations are on|"
    r"TF_ENABLE_ONEDNN_OPTS|"
    r"This TensorFlow binary is optimized to use available CPU instructions|"
    r"To enable the following instructions|"
    r"rebuild TensorFlow with the appropriate compiler flags|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|"
    r"failed call to cuInit|"
    r"TensorFlow binary was not compiled to use")

_OURS = "GBIF_EMBED_SET_TF_LOG_LEVEL"  # marks a level we set, which worker processes inherit
_LOCK = threading.Lock()


def verbose() -> bool:
    """Asked for TensorFlow's own lines: --verbose, or a log level the user set."""
    user_level = "TF_CPP_MIN_LOG_LEVEL" in os.environ and _OURS not in os.environ
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or user_level


def quiet_environment() -> None:
    """TensorFlow's C++ log level for this process and the workers it starts."""
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ[_OURS] = "1"


def import_tensorflow() -> Any:
    """`import tensorflow`, with its start-up notices filtered out of stderr."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _LOCK:
        if "tensorflow" in sys.modules:
            return sys.modules["tensorflow"]
        with without_modules("sklearn"):
            if verbose():
                import tensorflow
                return tensorflow
            quiet_environment()
            return _import_with_stderr_filtered()


def _import_with_stderr_filtered() -> Any:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (embedded interpreters)
        import tensorflow
        return tensorflow
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
            import tensorflow_hub  # noqa: F401  (imports more of TensorFlow's C++)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
            if not NOTICES.search(line):
                sys.stderr.write(line)
        sys.stderr.flush()
    import logging
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return tensorflow
