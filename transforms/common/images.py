"""An *image*: one content on its way to being embedded, with every row it answers.

From the fetch on, an element is one distinct content and what the stages
learn of it, with `tasks`, the export's rows that share it; each row gets its
own output (an embedding row or a failure row) only at the end. The fetch
stage, the image store and the embedding cache all make and read these, so
their shape is defined here once.
"""
from __future__ import annotations

import datetime
from typing import Optional

import numpy as np

# Keys of a task that describe one fetch, not one row.
_TRANSIENT_TASK_KEYS = ("revalidate", "previous")
# Keys of an image that carry the picture itself, not facts about it: the
# store's copy (`content`) and the model's input (`pixels`). Neither reaches
# a row.
PICTURE_KEYS = ("content", "pixels")


def facts_of(image: dict) -> dict:
    """The image without its picture (what rows and failures are made of)."""
    return {k: v for k, v in image.items() if k not in PICTURE_KEYS}


def image_element(tasks: list[dict], *, content: Optional[bytes], sha: str,
                  width: Optional[int], height: Optional[int],
                  image_format: Optional[str] = None, http_status: Optional[int] = None,
                  attempts: int = 0, etag: Optional[str] = None,
                  last_modified: Optional[str] = None, fetch_seconds: float = 0.0,
                  nbytes: int = 0, validators_per_task: bool = False) -> dict:
    """`content`: the store's copy (what is decoded); `sha`: of the fetched
    bytes (the content's identity); width and height: the fetched picture's.
    `validators_per_task`: the tasks carry their own ETag and Last-Modified
    (one content found under several URLs in the store's URL index)."""
    image = dict(content=content, image_sha256=sha, image_format=image_format,
                 http_status=http_status, attempts=attempts, fetch_seconds=fetch_seconds,
                 bytes=nbytes, width=width, height=height, tasks=tasks)
    if not validators_per_task:
        image.update(etag=etag, last_modified=last_modified)
    return image


def embedding_rows(image: dict, vector: np.ndarray, fingerprint: str) -> list[dict]:
    """One embedding row per row (task) of the image; the image's own fields
    (sha256, size, validators) win over the task's."""
    fields = facts_of(image)
    fields.pop("tasks")
    embedded_at = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for task in image["tasks"]:
        row = {k: v for k, v in task.items() if k not in _TRANSIENT_TASK_KEYS}
        row.update(fields, embedding=vector, model_fingerprint=fingerprint,
                   embedded_at=embedded_at)
        rows.append(row)
    return rows
