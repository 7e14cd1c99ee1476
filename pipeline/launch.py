"""`gbif-embed run`: checks the inputs, builds and runs the pipeline, reports.

The export and the model are checked at launch, before anything is fetched,
so a wrong path or a model that does not fit fails in seconds with a message
that says what was expected and what was found. On the local runner the run
shows live progress; after any run it writes `report.html` into the
snapshot and prints a summary.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from typing import Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)

from pipeline import lease, store_guard
from pipeline.interrupt import INCOMPLETE_EXIT, RunStopped, cancel, stop, stoppable
from pipeline.options import GbifEmbedOptions
from pipeline.summary import format_summary
from transforms.compare.resume import RUN, resumable_runs
from transforms.read.export import Archive, read_identity, read_spec
from transforms.store.layout import default_store
from transforms.common.files import join, write_atomically
from transforms.write.snapshot import (
    new_snapshot_name,
    read_incomplete,
    read_latest,
    read_manifest,
)

LOCAL_RUNNERS = (None, "DirectRunner", "SwitchingDirectRunner")


class UsageError(ValueError):
    """A flag is missing or wrong."""


def run(options: PipelineOptions, argv: Optional[Sequence[str]] = None) -> dict:
    """Checks inputs, runs the pipeline to the end, prints and returns the manifest.

    A run stopped by Ctrl-C or SIGTERM raises `RunStopped`, which says what
    was kept and how to resume (`argv`: the command's arguments); a remote
    job is cancelled first (see `pipeline.interrupt.cancel`)."""
    from pipeline.model_check import run_model
    from pipeline.sdk_image import check_sdk_image
    from transforms.embed.models import forget_models
    from transforms.embed.precision import cpu_supports_bfloat16
    from pipeline.gbif_download import wants_gbif
    opts = options.view_as(GbifEmbedOptions)
    gbif = wants_gbif(opts)
    for flag in ("model", "output") if gbif else ("export", "model", "output"):
        if not getattr(opts, flag):
            raise UsageError(f"--{flag} is required")
    check_sdk_image(options)  # workers' image built for the launcher's Python minor version
    if opts.fetch_work_item_seconds < 0:
        raise UsageError(f"--fetch_work_item_seconds must be 0 (one work item per shard) or "
                         f"more; found {opts.fetch_work_item_seconds:g}")
    if opts.precision == "bfloat16" and not cpu_supports_bfloat16():
        raise UsageError("--precision bfloat16 needs a CPU with AVX512-BF16 or AMX "
                         "(/proc/cpuinfo lists neither avx512_bf16 nor amx_bf16); "
                         "use --precision float32")
    gbif_download = None
    if gbif:  # the zip, fetched before the output folder is read
        from pipeline.gbif_download.export import export_from_gbif
        opts.export, gbif_download = export_from_gbif(
            opts, argv, say=lambda line: None if opts.quiet else print(line, flush=True))
    with Archive(opts.export) as archive:
        spec = read_spec(archive)
        identity = dict(read_identity(archive, spec), **_row_key(spec))
    if gbif_download:
        identity = _with_gbif_download(identity, gbif_download)
    previous = read_latest(opts.output)
    model = run_model(opts.model, embedding_dim=opts.embedding_dim, normalize=opts.normalize,
                      image_size=opts.image_size, resize=opts.resize, output=opts.output,
                      previous=previous)
    if model.spec.format == "onnx" and opts.precision == "bfloat16":
        raise UsageError(f"--precision bfloat16 applies to TensorFlow models; "
                         f"{opts.model} is an ONNX model: use --precision float32 or auto")
    if not opts.quiet:
        print(f"model: {model.spec.describe()}", flush=True)
    runner = _runner(options)
    if runner is None:  # remote workers load their own copy from --model
        forget_models()
    store = opts.image_store or default_store(opts.output)
    snapshot = new_snapshot_name()
    dry_run = bool(options.view_as(TestOptions).dry_run)
    command = " ".join(["gbif-embed", "run", *(argv or [])])
    with contextlib.ExitStack() as held:
        leases = [] if dry_run else [
            held.enter_context(lease.held(opts.output, snapshot, command,
                                          workers=runner is None)),
            held.enter_context(store_guard.held(store, snapshot, opts.output, command,
                                                workers=runner is None))]
        for taken in leases:
            taken.on_lost = _interrupt_main
        return _run(options, argv, opts, model, previous, identity, runner, store, snapshot,
                    leases)


def _interrupt_main(_reason: str) -> None:
    """A lost lease stops the run the way SIGTERM does (see `stoppable`)."""
    import _thread
    import signal
    _thread.interrupt_main(signal.SIGTERM)


def _run(options: PipelineOptions, argv: Optional[Sequence[str]], opts: GbifEmbedOptions,
         model, previous: Optional[str], identity: dict, runner, store: str,
         snapshot: str, leases: Sequence = ()) -> dict:
    """The run itself, while this launcher holds the output's and the store's leases."""
    from pipeline import graph
    model_fingerprint = model.fingerprint
    mode = "full" if opts.full else ("refresh" if previous else "first run")
    resumed = resumable_runs(opts.output, model_fingerprint, opts.full)
    precision = _precision(options, opts, model, runner, store, snapshot)
    manifest = {
        "snapshot": snapshot,
        "previous_snapshot": previous,
        "refresh_mode": mode,
        "launched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "export": identity,
        "model": model.manifest_entry(),
        "options": {k: v for k, v in options.get_all_options(drop_default=True).items()},
        "resumed_from": resumed,
        "image_store": store,
        "precision": precision,
    }
    write_atomically(join(opts.output, snapshot, RUN), json.dumps({
        "snapshot": snapshot, "launched_at": manifest["launched_at"],
        "model_fingerprint": model_fingerprint, "full": bool(opts.full),
        "export": identity}, indent=2, default=str))
    plan = _plan(opts, model, store, snapshot, previous if mode == "refresh" else None,
                 resumed)
    pipeline = beam.Pipeline(runner=runner, options=options)
    graph.build(pipeline, opts, snapshot=snapshot, manifest=manifest, model=model,
                precision=precision["precision"], store=store,
                inference_threads=_inference_threads(options),
                distributed=runner is None, local_processes=_local_processes(options),
                previous_folder=join(opts.output, previous) if mode == "refresh" else None,
                resume_folders=[join(opts.output, name) for name in resumed], plan=plan,
                leases=[taken.ref() for taken in leases] if runner is None else ())
    submitted = time.monotonic()
    job = None
    with stoppable(True) as signals:
        try:
            with _live_progress(options, _planned_progress(plan)):
                job = pipeline.run()
                job.wait_until_finish()
        except BaseException:
            if signals.received is None:
                raise
            lost = next((taken.lost for taken in leases if taken.lost), None)
            if runner is None:  # a distributed job outlives its launcher unless cancelled
                raise cancel(job, signals.received, join(opts.output, snapshot), argv,
                             leases, lost) from None
            raise stop(signals.received, join(opts.output, snapshot), argv, lost) from None
    if options.view_as(TestOptions).dry_run:
        return _dry_run(pipeline, opts.quiet)
    finished = time.monotonic()
    incomplete = read_incomplete(opts.output, snapshot)
    if incomplete is not None:  # publishing found rows missing: LATEST was not moved
        raise RunStopped(incomplete["message"], INCOMPLETE_EXIT)
    result = read_manifest(opts.output, snapshot)
    _maintain_store(opts, store)
    result["metrics"] = beam_metrics(job)
    report = _write_report(opts.output, snapshot)
    result["metrics"]["phases"] = result["timings"]["phases"] = _phases(
        result, submitted, finished)
    write_atomically(join(opts.output, snapshot, "metrics.json"),
                     json.dumps(result["metrics"], indent=2))
    if not opts.quiet:
        print(format_summary(result, opts.output, report))
    return result


def _precision(options: PipelineOptions, opts: GbifEmbedOptions, model, runner, store: str,
               snapshot: str) -> dict:
    """The job's precision, decided here once (see pipeline/precision_choice.py)."""
    from pipeline.options import fetch_config
    from pipeline.precision_choice import choose_precision
    from pipeline.precision_sample import run_sample
    from transforms.embed.auto_precision import SAMPLE

    def sample():
        return run_sample(store, opts.export, fetch_config(opts, _local_processes(options)),
                          snapshot, size=model.spec.image_size, resize=opts.resize,
                          wanted=SAMPLE, max_images=opts.max_images)
    choice = choose_precision(opts.precision, model, distributed=runner is None,
                              sample=sample)
    if not opts.quiet:
        print(f"precision: {choice['precision']} ({choice['decided_by']})", flush=True)
    return choice


def _plan(opts: GbifEmbedOptions, model, store: str, snapshot: str,
          previous: Optional[str], resumed: Sequence[str]):
    """What the run must do, decided here with DuckDB over the Parquet files
    (transforms/compare/planning.py), before the graph is built."""
    from transforms.compare.planning import plan_run
    return plan_run(
        export=opts.export, folder=join(opts.output, snapshot), fingerprint=model.fingerprint,
        store=store, previous_folder=join(opts.output, previous) if previous else None,
        resume_folders=[join(opts.output, name) for name in resumed],
        revalidate=opts.revalidate, use_cache=not opts.full, look_up=not opts.refetch,
        retry_failed_after=opts.retry_failed_after, max_images=opts.max_images,
        width=model.spec.width)


def _maintain_store(opts: GbifEmbedOptions, store: str) -> None:
    """After publishing: the URL index compacted once it has grown, and with
    --prune_store what no kept snapshot uses removed. A courtesy, like the
    report: failing must not fail a finished run."""
    from transforms.store.maintenance import maybe_compact_url_index, prune
    try:
        if opts.prune_store:
            report = prune([opts.output], store)
            if not opts.quiet:
                print("\n".join(report.lines()))
        else:
            maybe_compact_url_index(store)
    except Exception as err:
        logging.getLogger(__name__).warning("image store maintenance not done: %s", err)


def _seconds_since_process_start() -> float:
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_PROCESS_STARTED = time.monotonic() - _seconds_since_process_start()


def _phases(manifest: dict, submitted: float, finished: float) -> dict:
    """Where a run's time went: the launcher's phases (wall seconds), and the
    busy seconds of the pipeline's stages (summed over processes; they overlap)."""
    metrics = manifest.get("metrics") or {}
    distributions = metrics.get("distributions") or {}
    tally = manifest.get("tally") or {}

    def total_ms(name: str) -> float:
        return (distributions.get(name) or {}).get("sum", 0) / 1000.0

    return {"start_s": round(submitted - _PROCESS_STARTED, 2),
            "pipeline_s": round(finished - submitted, 2),
            "publish_s": (manifest.get("timings") or {}).get("publish_s"),
            "report_s": round(time.monotonic() - finished, 2),
            "busy_reading_s": round(tally.get("time.read_s", 0), 2),
            "busy_fetching_s": round(tally.get("time.fetch_s", 0), 2),
            "busy_embedding_s": round(
                total_ms("embed/inference_batch_latency_micro_secs") / 1000.0, 2),
            "busy_writing_s": round(total_ms("write/part_ms"), 2)}


def beam_metrics(job) -> dict:
    """The runner's Beam metrics by `namespace/name`, summed over steps.

    They come from the runner after the job (the manifest's own counts come
    from inside the pipeline and do not depend on them): model loads per
    worker process, inferences, batch latencies, fetch outcomes.
    """
    try:
        results = job.metrics().query()
    except Exception as err:  # some runners cannot report metrics
        return {"error": str(err)}
    counters: dict = {}
    distributions: dict = {}
    for result in results.get("counters", []):
        key = f"{result.key.metric.namespace}/{result.key.metric.name}"
        value = result.committed if result.committed is not None else result.attempted
        counters[key] = counters.get(key, 0) + (value or 0)
    for result in results.get("distributions", []):
        key = f"{result.key.metric.namespace}/{result.key.metric.name}"
        value = result.committed if result.committed is not None else result.attempted
        if value is None or not value.count:
            continue
        merged = distributions.setdefault(key, {"count": 0, "sum": 0, "min": value.min,
                                                "max": value.max})
        merged["count"] += value.count
        merged["sum"] += value.sum
        merged["min"] = min(merged["min"], value.min)
        merged["max"] = max(merged["max"], value.max)
    return {"counters": dict(sorted(counters.items())),
            "distributions": dict(sorted(distributions.items()))}


def _dry_run(pipeline: beam.Pipeline, quiet: bool) -> dict:
    """--dry_run (Dataflow): the job was translated but not submitted. Says
    which steps carry resource hints (their own worker environment)."""
    proto = pipeline.to_runner_api()
    environments = proto.components.environments
    transforms = sorted(t.unique_name for t in proto.components.transforms.values())
    hints = sorted({f"{urn}={value.decode(errors='replace')}"
                    for env in environments.values()
                    for urn, value in env.resource_hints.items()})
    hinted = sorted(t.unique_name for t in proto.components.transforms.values()
                    if t.environment_id and environments[t.environment_id].resource_hints)
    if not quiet:
        print(f"dry run: the job was built ({len(transforms)} transforms) and not submitted")
    return {"dry_run": True, "transforms": transforms, "resource_hints": hints,
            "hinted_transforms": hinted}


def _planned_progress(plan) -> dict:
    """What the progress line starts from: the export's image rows (read by
    planning, before the workers start) and those planning already finished
    (every image row but the ones it left to the graph)."""
    import fsspec
    import pyarrow.parquet as pq
    images = int(plan.tally.get("export.image_rows", 0))
    left = 0
    for path in (*plan.fetch, *plan.revalidate, *plan.stored):
        try:
            with fsspec.open(path, "rb") as handle:
                left += pq.ParquetFile(handle).metadata.num_rows
        except (OSError, ValueError):  # the count is a courtesy: a missing file costs nothing
            pass
    return {"images": images, "planned": max(0, images - left)}


@contextlib.contextmanager
def _live_progress(options: PipelineOptions, base: Optional[dict] = None) -> Iterator[None]:
    """The live progress line, for local runs only: remote workers cannot reach
    the launcher's loopback listener, and their runners have their own consoles.
    `base`: the counts the launcher knows before the workers start."""
    opts = options.view_as(GbifEmbedOptions)
    if opts.quiet or options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        yield
        return
    from pipeline.progress_display import ProgressDisplay
    from transforms.common.progress import Listener
    with Listener(base) as listener, ProgressDisplay(listener.totals):
        yield


def _write_report(output: str, snapshot: str) -> Optional[str]:
    """report.html is a courtesy: failing to write it must not fail a finished run."""
    from pipeline.tools.report import write_report
    try:
        return write_report(output, snapshot)
    except Exception as err:  # thumbnails, a full disk, a bucket's permissions
        logging.getLogger(__name__).warning("report.html not written: %s", err)
        return None


def _runner(options: PipelineOptions):
    """The in-process portable runner for local runs.

    Beam's DirectRunner first tries to download the Prism runner binary,
    which fails offline after a delay; it then falls back to this same
    FnApiRunner, which also handles --direct_running_mode multi_processing.
    """
    name = options.view_as(StandardOptions).runner
    if name not in LOCAL_RUNNERS:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def _row_key(spec) -> dict:
    """What keys the output's rows: the archive's core id (its gbifID in a GBIF
    download, the publisher's own id in a dataset's archive) and the URL."""
    core = spec.core
    term = next((name for name, index in core.terms if index == core.id_index), None)
    gbif = core.index("gbifID") is not None
    return {"kind": "GBIF download" if gbif else "dataset archive (no gbifIDs)",
            "core_id_term": term or "id", "row_key": ["coreID", "identifier"]}


def _with_gbif_download(identity: dict, provenance: dict) -> dict:
    """The export's identity plus where GBIF made it; the API's key and DOI
    stand in where the archive's metadata.xml gives none."""
    return dict(identity, download_key=identity.get("download_key") or provenance["download_key"],
                doi=identity.get("doi") or provenance.get("doi"), gbif_download=provenance)


def _local_processes(options: PipelineOptions) -> int:
    """Worker processes of a local run (1 for the in-process runner)."""
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        return max(1, direct.direct_num_workers or 1)
    return 1


def _inference_threads(options: PipelineOptions) -> int:
    """Several local worker processes share the cores instead of each taking all."""
    opts = options.view_as(GbifEmbedOptions)
    if opts.inference_threads:
        return opts.inference_threads
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if direct.direct_running_mode == "multi_processing" and workers > 1:
        return max(1, (os.cpu_count() or 1) // workers)
    return 0


