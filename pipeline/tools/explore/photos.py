"""A photo dropped on the page, embedded like the snapshot's pictures were.

The model, its preprocessing (normalization, input size, resize mode) and
precision are the run's, from the manifest, through the same code `query`
uses (pipeline/tools/query.py: `check_model`, `embed_image`), so the
uploaded photo's vector lives in the snapshot's space. The model is loaded
in the background when the server starts, so start-up does not wait for
TensorFlow; a snapshot whose model files are gone says so, and every other
search still works. An upload is checked before it is decoded: its size,
then (by the decoder) that it is a picture and not a decompression bomb.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np

from pipeline.tools.query import QueryError, Snapshot, check_model, embed_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# What the page says for the decoder's reasons (transforms/common/pictures.py).
REASONS = {
    "not_an_image": "the upload is not a picture: expected a JPEG, PNG, WebP, GIF or TIFF photo",
    "decompression_bomb": "the upload is a decompression bomb: it declares more pixels than "
                          "the run's --max_image_pixels allows; nothing was searched",
    "truncated": "the photo is truncated (its end is missing): upload the whole file",
    "corrupt": "the photo cannot be decoded (corrupt data)",
}


class Photos:
    """The snapshot's model, loaded once; embeds uploads one at a time."""

    def __init__(self, snapshot: Snapshot, model_uri: Optional[str] = None):
        self._snapshot = snapshot
        self.model_uri = model_uri or (snapshot.manifest.get("model") or {}).get("uri")
        self.status = "loading"
        self.problem: Optional[str] = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        limit = (snapshot.manifest.get("options") or {}).get("max_image_bytes")
        self.max_bytes = min(int(limit), MAX_UPLOAD_BYTES) if limit else MAX_UPLOAD_BYTES

    def start(self) -> None:
        threading.Thread(target=self._load, name="explore-model", daemon=True).start()

    def _load(self) -> None:
        try:
            if not self.model_uri:
                raise QueryError("the snapshot's manifest names no model")
            local = self.model_uri
            if "://" not in local and not os.path.exists(local):
                raise QueryError(f"the snapshot's model {self.model_uri} is gone")
            check_model(self._snapshot, self.model_uri)
            # Loads the model (cached per process) on a tiny picture.
            embed_image(_probe(), self._snapshot, self.model_uri)
            self.status = "ready"
        except Exception as err:  # any failure: the other searches go on
            self.problem = f"search by photo is off: {err}"
            self.status = "missing"
        finally:
            self._ready.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._ready.wait(timeout)

    def embed(self, content: bytes) -> np.ndarray:
        """Upload bytes → unit vector; QueryError with a message for the page."""
        if len(content) > self.max_bytes:
            raise QueryError(f"the photo is too large: {len(content):,} bytes, at most "
                             f"{self.max_bytes:,}")
        if not content:
            raise QueryError("the upload is empty: expected a JPEG, PNG or WebP photo")
        self._ready.wait()
        if self.problem:
            raise QueryError(self.problem)
        with self._lock:
            try:
                return embed_image(content, self._snapshot, self.model_uri)
            except QueryError as err:
                reason = getattr(err.__cause__, "reason", None)
                if reason in REASONS:
                    raise QueryError(REASONS[reason]) from None
                raise


def _probe() -> bytes:
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 60)).save(buffer, "JPEG")
    return buffer.getvalue()
