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

# Keys of an image task as read from the export. coreID is the archive's core
# id (a GBIF download's gbifID, or a publisher's own id such as an
# occurrenceID); gbifID is set where the archive has one; others may be None.
TASK_FIELDS = (
    "coreID", "gbifID", "identifier", "occurrenceID", "datasetKey", "taxonKey",
    "scientificName", "license", "rightsHolder", "creator",
)

FAILURES = "failures"   # tag of every stage's dead-letter output
NOT_MODIFIED = "not_modified"  # tag of fetches answered 304 on revalidation


def core_id_of(row: dict) -> str:
    """The row's core id; rows written before core ids were kept have only a
    gbifID, which was their archive's core id (a GBIF download's)."""
    core_id = row.get("coreID")
    if core_id:
        return str(core_id)
    gbif_id = row.get("gbifID")
    return "" if gbif_id is None else str(int(gbif_id))


def key_of(row: dict) -> tuple[str, str]:
    """The key of an image row: (coreID, identifier)."""
    return (core_id_of(row), row["identifier"])


def failure(task: dict, stage: str, reason: str, detail: str = "",
            http_status: Optional[int] = None, attempts: int = 0) -> dict[str, Any]:
    """A failure row: why one image did not become an embedding.

    `reason` is a short stable code (http_404, timeout, truncated, ...) that
    users can group by; `detail` is the human-readable explanation.
    """
    return {
        "coreID": core_id_of(task) or None,
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
