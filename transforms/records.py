"""The shapes of the elements that travel between stages.

Elements are plain dicts so that every runner can pickle them without custom
coders. An image task starts in `read_export` with the keys of `TASK_FIELDS`;
later stages add keys and drop the bulky ones (`content`, `pixels`) as soon as
the next stage no longer needs them.
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
