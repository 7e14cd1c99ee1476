"""The citation GBIF asks users of a download to give (its DOI), in GBIF's form."""
from __future__ import annotations

import datetime
from typing import Any, Optional


def citation(doi: Optional[str], created: Any) -> Optional[str]:
    """GBIF.org (16 July 2020) GBIF Occurrence Download https://doi.org/10.15468/dl.4gbcs6;
    `created`: the download's date (ISO), left out when unknown."""
    if not doi:
        return None
    when = ""
    if isinstance(created, str) and created:
        try:
            day = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
            when = f" ({day.day} {day:%B %Y})"
        except ValueError:
            when = ""
    return f"GBIF.org{when} GBIF Occurrence Download https://doi.org/{doi}"
