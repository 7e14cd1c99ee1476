"""What to fetch and how: the fetch options, mirrors and the URL of a task.

One frozen `FetchConfig` travels to every worker; the launcher builds it
from its options (pipeline/options.py), so the stages never import the
launcher.
"""
from __future__ import annotations

import hashlib
import urllib.parse
from dataclasses import dataclass
from typing import Optional

DEFAULT_USER_AGENT = (
    "gbif-embed/0.1 (+https://github.com/gbif-embed/gbif-embed; "
    "image embeddings for GBIF occurrence downloads)")
GBIF_CACHE_HOST = "api.gbif.org"
GBIF_CACHE_URL = "https://api.gbif.org/v1/image/cache/occurrence/{gbif_id}/media/{md5}"


@dataclass(frozen=True)
class FetchConfig:
    """Every fetch option; frozen so that one config keys shared state."""

    fetch_concurrency: int = 32
    per_host_concurrency: int = 8
    per_host_rate: float = 20.0
    max_attempts: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    fetch_timeout: float = 120.0
    max_redirects: int = 5
    max_image_bytes: int = 30 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    # Shards a host's limits are split into at least (when its limits allow):
    # the local runner's worker processes, so that every one of them fetches
    # and embeds even for a one-host export.
    min_shards: int = 1
    user_agent: str = DEFAULT_USER_AGENT
    allow_private_networks: tuple[str, ...] = ()
    image_source: str = "identifier"
    mirrors: tuple[tuple[str, str], ...] = ()
    # Not options: tests shorten them so that retries take milliseconds.
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    # Not an option: a CA bundle for https (tests, private CAs); None: certifi's.
    ca_certs: Optional[str] = None

    def __post_init__(self):
        nets = self.allow_private_networks
        if isinstance(nets, str):
            nets = [n for n in nets.split(",")]
        object.__setattr__(self, "allow_private_networks",
                           tuple(n.strip() for n in (nets or ()) if n and n.strip()))
        if isinstance(self.mirrors, str):
            object.__setattr__(self, "mirrors", parse_mirrors(self.mirrors))

    def host_overrides(self) -> dict[str, tuple[int, float]]:
        """GBIF asks scripted users of its image cache for one connection."""
        if self.image_source == "gbif_cache":
            return {GBIF_CACHE_HOST: (1, self.per_host_rate)}
        return {}

    def host_limits(self, host: str) -> tuple[int, float]:
        """(concurrency, rate) allowed to one host for the whole job."""
        return self.host_overrides().get(host, (self.per_host_concurrency,
                                                self.per_host_rate))

    def shard_budgets(self, host: str) -> list:
        """The host's job-wide limits split into its shards' budgets."""
        from transforms.fetch.politeness import shard_budgets
        return shard_budgets(*self.host_limits(host), at_least=self.min_shards)


def parse_mirrors(value: str) -> tuple[tuple[str, str], ...]:
    """`OLD=NEW[,OLD=NEW]` URL prefixes; longest OLD first so the most specific wins."""
    pairs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--mirror expects OLD_PREFIX=NEW_PREFIX, found {item!r}")
        pairs.append((old, new))
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def mirrored(url: str, mirrors: tuple[tuple[str, str], ...]) -> str:
    """The URL to request when the images are also served from a mirror."""
    for old, new in mirrors:
        if url.startswith(old):
            return new + url[len(old):]
    return url


def source_url(task: dict, image_source: str = "identifier") -> str:
    """The URL to fetch for a task: the publisher's, or GBIF's cached copy.

    GBIF's cache is keyed by the occurrence and the MD5 (hex) of the media
    identifier (techdocs.gbif.org/en/openapi/images); it serves at most
    1200x1200 px, which is plenty for a 299 px model.
    """
    identifier = (task.get("identifier") or "").strip()
    if not identifier:
        raise ValueError("task has no identifier")
    if image_source == "identifier":
        return identifier
    if image_source == "gbif_cache":
        gbif_id = str(task.get("gbifID") or "").strip()
        if not gbif_id:
            raise ValueError("task has no gbifID for the GBIF image cache")
        md5 = hashlib.md5(identifier.encode("utf-8")).hexdigest()
        return GBIF_CACHE_URL.format(gbif_id=urllib.parse.quote(gbif_id, safe=""), md5=md5)
    raise ValueError(f"unknown image_source {image_source!r}")


def fetch_url(task: dict, config: FetchConfig) -> str:
    """The URL actually requested for a task: its source, through any mirror."""
    return mirrored(source_url(task, config.image_source), config.mirrors)


def host_of(url: str) -> str:
    """The politeness key of a URL: its host name (a bucket for gs://)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        return (parts.hostname or parts.netloc or "").rstrip(".").lower() or "(no host)"
    except ValueError:
        return "(invalid)"
