"""The `gbif-embed` command: run, plan, evaluate, query, make-model, demo.

`run` checks the export and the model at launch, before anything is
fetched, so a wrong path or a model that does not fit fails in seconds with
a message that says what was expected and what was found. On the local
runner it shows live progress; after any run it writes `report.html` into
the snapshot and prints a summary. `evaluate` and `query` use the
embeddings: Recall@k of retrieval, and the nearest images to a picture.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)

from pipeline.interrupt import RunStopped, stop, stoppable
from pipeline.options import GbifEmbedOptions
from pipeline.summary import format_summary
from transforms.read.export import Archive, ExportError, read_identity, read_spec
from transforms.compare.resume import RUN, resumable_runs
from transforms.write.snapshot import (
    join,
    new_snapshot_name,
    read_latest,
    read_manifest,
    write_atomically,
)

LOCAL_RUNNERS = (None, "DirectRunner", "SwitchingDirectRunner")


class UsageError(ValueError):
    """A flag is missing or wrong."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command, "plan": plan_command, "evaluate": evaluate_command,
                "query": query_command, "make-model": make_model_command,
                "demo": demo_command}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: gbif-embed {run,plan,evaluate,query,make-model,demo} [options]\n\n"
              "  run         embed the images of a GBIF DwC-A download into Parquet\n"
              "  plan        how long a run will take: hosts, politeness bounds, compute\n"
              "  evaluate    Recall@1/5/10 of image retrieval over the current snapshot\n"
              "  query       the nearest stored images to a picture or an occurrence\n"
              "  make-model  write a stand-in of the fungi_V2 embedder (TF1 Hub format)\n"
              "  demo        generate a small GBIF export, serve it on loopback, run it\n\n"
              "`gbif-embed COMMAND --help` lists a command's options.",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _quiet_libraries()
    try:
        return commands[argv[0]](argv[1:])
    except (UsageError, ExportError, ValueError, FileNotFoundError) as err:
        print(f"gbif-embed {argv[0]}: error: {err}", file=sys.stderr)
        return 2


# Warnings Beam workers send on every run that say nothing about this run: the
# first repeats per batch when torch is not installed; the others come with
# every local worker process (our options, which Beam's own parser does not
# know; no staging folder on a local machine).
_NOISE = ("Resource module is not available", "Discarding unparseable args",
          "No semi_persistent_directory found")


def console() -> None:
    """The `gbif-embed` console command: `main`, then exit at once.

    Every file a command writes is complete and closed when `main` returns;
    what Python would still do at exit is tear down TensorFlow and Beam and
    join their threads, about 1.2 s of a run's fixed cost for nothing."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _not_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(noise in message for noise in _NOISE)


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: TensorFlow's C++ start-up lines
    (including a harmless cuInit error on machines without a GPU) and Beam's
    routine worker warnings (`_NOISE`). The filter sits on the handlers, since
    a logger's own filter does not see records its children pass up, and local
    workers' logs reach the launcher through a child logger of Beam's."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_noise)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def make_model_command(argv: Sequence[str]) -> int:
    from pipeline.models.make_model import main as make_model
    return make_model(argv)


def plan_command(argv: Sequence[str]) -> int:
    from pipeline.tools.plan import plan_command as plan
    return plan(argv)


def demo_command(argv: Sequence[str]) -> int:
    from pipeline.demo.demo import demo
    return demo(argv)


def evaluate_command(argv: Sequence[str]) -> int:
    from pipeline.tools.evaluate import DEFAULT_QUERIES, LABELS, evaluate, format_table, write_evaluation
    parser = argparse.ArgumentParser(prog="gbif-embed evaluate", description=(
        "Recall@1/5/10 of nearest-neighbour retrieval (cosine, exact) over OUTPUT/LATEST: "
        "a hit is a neighbour with the query's label; images of the query's own "
        "occurrence are never neighbours. Writes evaluation.json and rewrites "
        "report.html in the snapshot folder."))
    parser.add_argument("--output", required=True, metavar="OUTPUT",
                        help="The run's output folder (local or gs://)")
    parser.add_argument("--label", choices=LABELS, default="scientificName",
                        help="What counts as the same kind of mushroom")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, metavar="N",
                        help="Query images sampled from the eligible ones (0: all of them)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="Seed of the query sample")
    args = parser.parse_args(argv)
    result = evaluate(args.output, args.label, args.queries, args.seed)
    written = [write_evaluation(args.output, result)]
    written += [p for p in [_write_report(args.output, result["snapshot"])] if p]
    print(format_table(result))
    print(f"\nwritten: {', '.join(written)}")
    return 0


def query_command(argv: Sequence[str]) -> int:
    from pipeline.tools.query import format_results, query, run_fetch_config
    from pipeline.tools.report import write_contact_sheet
    parser = argparse.ArgumentParser(prog="gbif-embed query", description=(
        "The k stored images nearest to a picture (--image) or to an occurrence's "
        "first image (--gbif_id), by cosine similarity over OUTPUT/LATEST. A picture "
        "is fetched, decoded, resized and embedded exactly as the run did."))
    parser.add_argument("--output", required=True, metavar="OUTPUT",
                        help="The run's output folder (local or gs://)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="PATH_OR_URL",
                        help="A picture: local path, or http(s):// or gs:// URL")
    source.add_argument("--gbif_id", type=int, metavar="N",
                        help="An occurrence in the snapshot; its first image is the query "
                        "and its other images are left out of the answer")
    parser.add_argument("--k", type=int, default=10, metavar="K",
                        help="How many neighbours (default 10)")
    parser.add_argument("--model", metavar="MODEL",
                        help="Embedder folder (default: the snapshot's model, manifest "
                        "model.uri); must be the model the rows were made with")
    parser.add_argument("--html", metavar="FILE",
                        help="Also write a contact sheet (self-contained HTML) here")
    parser.add_argument("--allow_private_networks", default="", metavar="CIDRS",
                        help="Comma-separated CIDRs that may be fetched although loopback, "
                        "private, link-local or metadata addresses")
    args = parser.parse_args(argv)
    result = query(args.output, image=args.image, gbif_id=args.gbif_id, k=args.k,
                   model=args.model, allow_private_networks=args.allow_private_networks)
    print(format_results(result))
    if args.html:
        config = run_fetch_config(result.snapshot.manifest, args.allow_private_networks)
        print(f"\ncontact sheet: {write_contact_sheet(result, args.html, config)}")
    return 0


def run_command(argv: Sequence[str]) -> int:
    if "-h" in argv or "--help" in argv:
        parser = argparse.ArgumentParser(
            prog="gbif-embed run", description="Embed the images of a GBIF DwC-A download.",
            epilog="Any Apache Beam pipeline option is accepted too (--runner, "
            "--direct_num_workers, --project, --temp_location, --setup_file, ...).")
        GbifEmbedOptions._add_argparse_args(parser)
        parser.print_help()
        return 0
    options = PipelineOptions(list(argv))
    try:
        result = run(options, argv)
    except RunStopped as stopped:
        print(f"gbif-embed run: {stopped.message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(stopped.exit_code)  # no waiting for fetch threads stuck on a slow host
    return 0 if result.get("counts") is not None else 1


def run(options: PipelineOptions, argv: Optional[Sequence[str]] = None) -> dict:
    """Checks inputs, runs the pipeline to the end, prints and returns the manifest.

    A local run stopped by Ctrl-C or SIGTERM raises `RunStopped`, which says
    what was kept and how to resume (`argv`: the command's arguments)."""
    from pipeline import graph
    from pipeline.sdk_image import check_sdk_image
    from transforms.embed.inference import (check_contract, cpu_supports_bfloat16, fingerprint,
                                  forget_models, localize)
    opts = options.view_as(GbifEmbedOptions)
    for flag in ("export", "model", "output"):
        if not getattr(opts, flag):
            raise UsageError(f"--{flag} is required")
    check_sdk_image(options)  # workers' image built for the launcher's Python minor version
    if opts.precision == "bfloat16" and not cpu_supports_bfloat16():
        raise UsageError("--precision bfloat16 needs a CPU with AVX512-BF16 or AMX "
                         "(/proc/cpuinfo lists neither avx512_bf16 nor amx_bf16); "
                         "use --precision float32")
    with Archive(opts.export) as archive:
        identity = read_identity(archive, read_spec(archive))
    model_fingerprint = fingerprint(localize(opts.model))
    previous = read_latest(opts.output)
    if not _checked_before(opts, previous, model_fingerprint):
        check_contract(opts.model, opts.embedding_dim)
    runner = _runner(options)
    if runner is None:  # remote workers load their own copy from --model
        forget_models()
    snapshot = new_snapshot_name()
    mode = "full" if opts.full else ("refresh" if previous else "first run")
    resumed = resumable_runs(opts.output, model_fingerprint, opts.full)
    manifest = {
        "snapshot": snapshot,
        "previous_snapshot": previous,
        "refresh_mode": mode,
        "launched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "export": identity,
        "model": {"uri": opts.model, "fingerprint": model_fingerprint,
                  "embedding_dim": opts.embedding_dim},
        "options": {k: v for k, v in options.get_all_options(drop_default=True).items()},
        "resumed_from": resumed,
    }
    write_atomically(join(opts.output, snapshot, RUN), json.dumps({
        "snapshot": snapshot, "launched_at": manifest["launched_at"],
        "model_fingerprint": model_fingerprint, "full": bool(opts.full),
        "export": identity}, indent=2, default=str))
    pipeline = beam.Pipeline(runner=runner, options=options)
    graph.build(pipeline, opts, snapshot=snapshot, manifest=manifest,
                model_fingerprint=model_fingerprint,
                inference_threads=_inference_threads(options),
                previous_folder=join(opts.output, previous) if mode == "refresh" else None,
                resume_folders=[join(opts.output, name) for name in resumed])
    submitted = time.monotonic()
    with stoppable(runner is not None) as signals:
        try:
            with _live_progress(options):
                job = pipeline.run()
                job.wait_until_finish()
        except BaseException:
            if signals.received is None:
                raise
            raise stop(signals.received, join(opts.output, snapshot), argv) from None
    if options.view_as(TestOptions).dry_run:
        return _dry_run(pipeline, opts.quiet)
    finished = time.monotonic()
    result = read_manifest(opts.output, snapshot)
    result["metrics"] = beam_metrics(job)
    report = _write_report(opts.output, snapshot)
    result["metrics"]["phases"] = result["timings"]["phases"] = _phases(
        result, submitted, finished)
    write_atomically(join(opts.output, snapshot, "metrics.json"),
                     json.dumps(result["metrics"], indent=2))
    if not opts.quiet:
        print(format_summary(result, opts.output, report))
    return result


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


def _checked_before(opts: GbifEmbedOptions, previous: Optional[str], model_fingerprint: str
                    ) -> bool:
    """Whether the previous snapshot was made with these very model files and
    width: they passed the contract check then, and loading TensorFlow and the
    model only to check them again would be most of a small refresh's time."""
    if previous is None:
        return False
    try:
        model = read_manifest(opts.output, previous).get("model") or {}
    except (OSError, ValueError):
        return False
    return (model.get("fingerprint") == model_fingerprint
            and model.get("embedding_dim") == opts.embedding_dim)


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
    """--dry_run (Dataflow): the job was translated but not submitted."""
    proto = pipeline.to_runner_api()
    transforms = sorted(t.unique_name for t in proto.components.transforms.values())
    hints = sorted({f"{urn}={value.decode(errors='replace')}"
                    for env in proto.components.environments.values()
                    for urn, value in env.resource_hints.items()})
    if not quiet:
        print(f"dry run: the job was built ({len(transforms)} transforms) and not submitted")
    return {"dry_run": True, "transforms": transforms, "resource_hints": hints}


@contextlib.contextmanager
def _live_progress(options: PipelineOptions) -> Iterator[None]:
    """The live progress line, for local runs only: remote workers cannot reach
    the launcher's loopback listener, and their runners have their own consoles."""
    opts = options.view_as(GbifEmbedOptions)
    if opts.quiet or options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        yield
        return
    from pipeline.progress_display import ProgressDisplay
    from transforms.common.progress import Listener
    with Listener() as listener, ProgressDisplay(listener.totals):
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


if __name__ == "__main__":
    console()
