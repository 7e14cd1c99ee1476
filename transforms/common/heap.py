"""Keeping the garbage collector's full passes off the hot path.

A worker process holds Beam, PIL and, once its model is loaded, TensorFlow:
hundreds of thousands of objects that live as long as the process. CPython's
full collection walks every one of them while it holds the GIL, so meanwhile
no fetch thread reads its answer and nothing feeds the model. On CPU F (the
README's) the first full pass of the fetch stage walked 165,000 objects in
85–110 ms, about one round of 64 fetches of 100 ms: `bench/fetch.py` went
from 0.82–0.86 to 0.89–0.91 without it.

Once a stage is set up (or its model loaded), what exists will stay: collect
once, then move it to the permanent generation, which later passes skip
(`gc.freeze`). Objects frozen are still freed when their last reference
goes; only a cycle among them that becomes garbage later is kept, and set-up
objects are not made and dropped per element.
"""
from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect what is garbage now, then exempt the rest from later passes."""
    gc.collect()
    gc.freeze()
