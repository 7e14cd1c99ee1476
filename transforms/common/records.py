"""The shapes of the elements that travel between stages.

Elements are plain dicts so that every runner can pickle them without custom
coders. An image task (one row of the export) starts in `read_export` with the
keys of `TASK_FIELDS`. From the fetch on, an element is one *image*: one
distinct URL's content and what later stages learn of it, with `tasks`, the
rows that share it; the rows get their own outputs (an embedding row or a
failure row each) only at the end, so an image shared by many rows is fetched,
decoded and embedded once. Stages drop the bulky keys (`content`, `pixels`) as
soon as the next stage no longer needs them.
"""
from __future__ import annotations

from typing import Any, Optional

# Keys of an image task as read from the export (all but gbifID may be None).
TASK_FIELDS = (
    "gbifID", "identifier", "occurrenceID", "datasetKey", "taxonKey",
    "scientificName", "license", "rightsHolder", "creator",
)

FAILURES = "failures"   # tag of every stage's dead-letter output
NOT_MODIFIED = "not_modified"  # tag of fetches answered 304 on revalidation


def key_of(row: dict) -> tuple[int, str]:
    """The key of an image row: (gbifID, identifier)."""
    return (int(row["gbifID"]), row["identifier"])


def failure(task: dict, stage: str, reason: str, detail: str = "",
            http_status: Optional[int] = None, attempts: int = 0) -> dict[str, Any]:
    """A failure row: why one image did not become an embedding.

    `reason` is a short stable code (http_404, timeout, truncated, ...) that
    users can group by; `detail` is the human-readable explanation.
    """
    return {
        "gbifID": task.get("gbifID"),
        "identifier": task.get("identifier"),
        "stage": stage,
        "reason": reason,
        "http_status": http_status,
        "attempts": int(attempts),
        "detail": detail[:500],
    }


def failures_of(image: dict, stage: str, reason: str, detail: str = "") -> list[dict]:
    """A failure row for every row (task) of one image."""
    return [failure(task, stage, reason, detail, image.get("http_status"),
                    image.get("attempts", 0)) for task in image["tasks"]]
