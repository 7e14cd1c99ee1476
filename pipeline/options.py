"""Pipeline options of gbif-embed.

They are Beam pipeline options (not a separate argparse layer) so that every
worker, on every runner, sees the same values the launcher parsed.
"""
from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from transforms.fetch.config import DEFAULT_USER_AGENT, FetchConfig, parse_mirrors


class GbifEmbedOptions(PipelineOptions):
    """Options of `gbif-embed run`; every other flag is a Beam option."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("gbif-embed")
        add = group.add_argument
        # Inputs and outputs.
        add("--export", help="GBIF DwC-A download: a .zip or an unzipped folder, "
            "local or gs://")
        # Straight from GBIF instead of --export (pipeline/gbif_download; the account
        # comes from GBIF_USER, GBIF_PWD, GBIF_EMAIL in the environment only).
        add("--gbif_dataset", default=None,
            help="Request a fresh DWCA download of this GBIF dataset key (images only), "
            "wait for it, fetch it and embed it")
        add("--gbif_predicate", default=None,
            help="As --gbif_dataset, for any GBIF download predicate in this JSON file")
        add("--gbif_download", default=None,
            help="Embed this existing GBIF download key (wait for it if still running)")
        add("--gbif_api", default="https://api.gbif.org/v1",
            help="GBIF API root (a mirror, or a test server)")
        add("--download_dir", default="",
            help="Folder for GBIF zips, local or gs:// (default: OUTPUT/downloads); "
            "resumable")
        add("--gbif_poll_seconds", type=float, default=60.0,
            help="First interval between GBIF status checks; grows 1.5x to 5x this")
        add("--model", help="The embedder, local or gs://: a TF1 Hub module or TF2 "
            "SavedModel folder, or an ONNX file (or a folder holding one)")
        add("--output", help="Output folder (local or gs://); holds LATEST and snapshots")
        add("--image_store", default="",
            help="The image store (local or gs://): one copy of every fetched picture, "
            "the URL index and each model's embedding cache, shared by every run and "
            "model that names it (default: OUTPUT/store)")
        add("--embedding_dim", type=int, default=0,
            help="Check that the model's output has this width (0: whatever the model "
            "gives)")
        add("--image_size", type=int, default=0,
            help="Picture size for a model whose input does not declare one (a "
            "variable-size TF2 input; 0: the model's own, else 224, and the run says so)")
        add("--normalize", choices=("unit", "imagenet", "clip"), default="unit",
            help="Input values the model expects: unit: RGB in [0,1] (TF Hub's "
            "convention); imagenet or clip: their published mean/std after [0,1]")
        add("--batch_size", type=int, default=16, help="Images per inference call")
        add("--resize", choices=("squash", "center_crop"), default="squash",
            help="squash: the whole image to the model's size (299x299 for fungi_V2); "
            "center_crop: the central square, then the model's size")
        add("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
            help="auto: the fastest precision this CPU runs well that passes a self-check "
            "on the run's own pictures (else float32); bfloat16: oneDNN mixed precision "
            "(TensorFlow models, CPUs with AVX512-BF16 or AMX)")
        add("--inference_threads", type=int, default=0,
            help="TensorFlow threads per worker process (0: the process's share "
            "of the cores)")
        add("--max_images", type=int, default=0,
            help="Stop after this many image rows of the export (0: all)")
        # Fetching.
        add("--fetch_concurrency", type=int, default=32,
            help="Requests in flight per worker process (all hosts together)")
        add("--per_host_concurrency", type=int, default=8,
            help="Requests in flight to one host, for the whole job (all workers "
            "together)")
        add("--per_host_rate", type=float, default=20.0,
            help="Requests per second to one host, for the whole job (all workers "
            "together; at most floor(rate) in any 1-second window); 429/503 lower "
            "it, Retry-After pauses it")
        add("--max_attempts", type=int, default=4,
            help="Tries per URL, counting the first, for transient failures")
        add("--connect_timeout", type=float, default=10.0, help="Seconds")
        add("--read_timeout", type=float, default=30.0, help="Seconds between bytes")
        add("--fetch_timeout", type=float, default=120.0,
            help="Seconds for one URL, all tries and waits included")
        add("--max_redirects", type=int, default=5)
        add("--max_image_bytes", type=int, default=30 * 1024 * 1024)
        add("--max_image_pixels", type=int, default=100_000_000,
            help="Images with more pixels are refused as decompression bombs")
        # --user_agent is Beam's own option (SetupOptions); when it is unset the
        # fetcher sends DEFAULT_USER_AGENT.
        add("--allow_private_networks", default="",
            help="Comma-separated CIDRs that may be fetched although they are "
            "loopback, private, link-local or metadata addresses")
        add("--image_source", choices=("identifier", "gbif_cache"),
            default="identifier",
            help="identifier: the publisher's URL; gbif_cache: GBIF's image cache")
        add("--mirror", default="",
            help="OLD=NEW[,OLD=NEW]: fetch URLs that start with OLD from NEW instead "
            "(a mirror of the image host); rows keep the original identifier")
        add("--decode_threads", type=int, default=2,
            help="Decoding threads per worker process")
        # Refreshing.
        add("--full", action="store_true", default=False,
            help="Embed every image again instead of reusing the previous snapshot or "
            "the embedding cache (pictures still come from the image store; add "
            "--refetch to ask the hosts again)")
        add("--revalidate", action="store_true", default=False,
            help="Ask hosts whether reused images changed (conditional requests)")
        add("--refetch", action="store_true", default=False,
            help="Fetch every image again instead of reading the image store "
            "(the store keeps the new copies)")
        add("--keep_snapshots", type=int, default=0,
            help="Keep this many snapshots, pruning older ones (0: keep all)")
        add("--retry_failed_after", type=float, default=28.0,
            help="Days before a URL that answered 404, 410 or not a picture is asked "
            "again (doubling after each further such answer; 0: ask every run)")
        add("--prune_store", action="store_true", default=False,
            help="After publishing, remove store copies and embedding caches that no "
            "kept snapshot uses, and stray temporary files (as `gbif-embed store prune`)")
        # Keeping finished work.
        add("--checkpoint_rows", type=int, default=500,
            help="A writer makes its rows durable (closes a part file) at least every "
            "this many rows ...")
        add("--checkpoint_seconds", type=float, default=5.0,
            help="... or every this many seconds, so a run killed at any moment loses "
            "at most that much; running the same command again resumes")
        add("--fetch_work_item_seconds", type=float, default=120.0,
            help="Distributed runners: a host shard is fetched in work items of about "
            "this many seconds of fetching each, so a failure redoes at most that much")
        # Resource hints for the inference step.
        add("--inference_min_ram", default=None,
            help="Resource hint for the inference step, e.g. 8GB")
        add("--accelerator", default=None,
            help="Resource hint for the inference step, e.g. "
            "type:nvidia-tesla-t4;count:1;install-nvidia-driver")
        add("--report_samples", type=int, default=6,
            help="Images of report.html shown with their nearest neighbours, from "
            "thumbnails the runs kept while decoding (0: no pictures)")
        add("--quiet", action="store_true", default=False,
            help="No progress display and no summary on the terminal")
        add("--verbose", action="store_true", default=False,
            help="Also show TensorFlow's own start-up and log lines")


def fetch_config(opts: Any, min_shards: int = 1) -> FetchConfig:
    """The fetch stage's configuration from the parsed options; `min_shards`:
    the local runner's worker processes (see FetchConfig)."""
    if not isinstance(opts, GbifEmbedOptions):
        opts = opts.view_as(GbifEmbedOptions)
    return FetchConfig(
        fetch_concurrency=opts.fetch_concurrency,
        per_host_concurrency=opts.per_host_concurrency,
        per_host_rate=opts.per_host_rate,
        max_attempts=opts.max_attempts,
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        fetch_timeout=opts.fetch_timeout,
        max_redirects=opts.max_redirects,
        max_image_bytes=opts.max_image_bytes,
        max_image_pixels=opts.max_image_pixels,
        min_shards=max(1, min_shards),
        # --user_agent is Beam's own option (SetupOptions); unset means ours.
        user_agent=opts.view_as(SetupOptions).user_agent or DEFAULT_USER_AGENT,
        allow_private_networks=opts.allow_private_networks or (),
        image_source=opts.image_source,
        mirrors=parse_mirrors(opts.mirror or ""),
    )
