"""The `gbif-embed` command: run, make-model, demo.

`run` checks the export and the model at launch, before anything is
fetched, so a wrong path or a model that does not fit fails in seconds with
a message that says what was expected and what was found.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                  StandardOptions)

from pipeline.options import GbifEmbedOptions
from transforms.read_export import Archive, ExportError, read_identity, read_spec
from transforms.snapshot import join, new_snapshot_name, read_latest, read_manifest

LOCAL_RUNNERS = (None, "DirectRunner", "SwitchingDirectRunner")


class UsageError(ValueError):
    """A flag is missing or wrong."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command, "make-model": make_model_command,
                "demo": demo_command}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: gbif-embed {run,make-model,demo} [options]\n\n"
              "  run         embed the images of a GBIF DwC-A download into Parquet\n"
              "  make-model  write a stand-in of the fungi_V2 embedder (TF1 Hub format)\n"
              "  demo        generate a small GBIF export, serve it on loopback, run it\n\n"
              "`gbif-embed COMMAND --help` lists a command's options.",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _quiet_libraries()
    try:
        return commands[argv[0]](argv[1:])
    except (UsageError, ExportError, ValueError) as err:
        print(f"gbif-embed {argv[0]}: error: {err}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: TensorFlow's C++ start-up lines
    (including a harmless cuInit error on machines without a GPU) and a Beam
    warning that repeats per batch when torch is not installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().addFilter(
        lambda record: "Resource module is not available" not in record.getMessage())
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def make_model_command(argv: Sequence[str]) -> int:
    from pipeline.make_model import ARCHITECTURES, build_model
    parser = argparse.ArgumentParser(prog="gbif-embed make-model", description=(
        "Write a STAND-IN for svampeatlas/vision/embedder/fungi_V2/1: same TF1 Hub "
        "format and contract, deterministic random weights, no fungus knowledge."))
    parser.add_argument("--out", required=True, help="Folder to create")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="inception_v4")
    parser.add_argument("--embedding_dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_model(args.out, args.arch, args.embedding_dim, args.seed)
    print(f"wrote the {args.arch} stand-in embedder to {args.out}")
    return 0


def demo_command(argv: Sequence[str]) -> int:
    from pipeline.demo import demo
    return demo(argv)


def run_command(argv: Sequence[str]) -> int:
    if "-h" in argv or "--help" in argv:
        PipelineOptions(["--help"]).view_as(GbifEmbedOptions)
        return 0
    options = PipelineOptions(list(argv))
    result = run(options)
    return 0 if result.get("counts") is not None else 1


def run(options: PipelineOptions) -> dict:
    """Checks inputs, runs the pipeline to the end, prints and returns the manifest."""
    from pipeline import graph
    from transforms.embed import check_contract, cpu_supports_bfloat16, fingerprint, localize
    opts = options.view_as(GbifEmbedOptions)
    for flag in ("export", "model", "output"):
        if not getattr(opts, flag):
            raise UsageError(f"--{flag} is required")
    if opts.precision == "bfloat16" and not cpu_supports_bfloat16():
        raise UsageError("--precision bfloat16 needs a CPU with AVX512-BF16 or AMX "
                         "(/proc/cpuinfo lists neither avx512_bf16 nor amx_bf16); "
                         "use --precision float32")
    with Archive(opts.export) as archive:
        identity = read_identity(archive, read_spec(archive))
    check_contract(opts.model, opts.embedding_dim)
    model_fingerprint = fingerprint(localize(opts.model))
    previous = read_latest(opts.output)
    snapshot = new_snapshot_name()
    mode = "full" if opts.full else ("refresh" if previous else "first run")
    manifest = {
        "snapshot": snapshot,
        "previous_snapshot": previous,
        "refresh_mode": mode,
        "launched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "export": identity,
        "model": {"uri": opts.model, "fingerprint": model_fingerprint,
                  "embedding_dim": opts.embedding_dim},
        "options": {k: v for k, v in options.get_all_options(drop_default=True).items()},
    }
    pipeline = beam.Pipeline(runner=_runner(options), options=options)
    graph.build(pipeline, opts, snapshot=snapshot, manifest=manifest,
                model_fingerprint=model_fingerprint,
                inference_threads=_inference_threads(options),
                previous_folder=join(opts.output, previous) if mode == "refresh" else None)
    pipeline.run().wait_until_finish()
    result = read_manifest(opts.output, snapshot)
    if not opts.quiet:
        print_summary(result, opts.output)
    return result


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


def print_summary(manifest: dict, output: str) -> None:
    counts = manifest["counts"]
    lines = [
        f"snapshot   {output.rstrip('/')}/{manifest['snapshot']} (LATEST)",
        f"embedded   {counts['embedded']}",
        f"failed     {counts['failed']}",
        f"skipped    {counts['skipped']}",
    ]
    for reason, n in counts["failed_by_reason"].items():
        lines.append(f"  failed   {reason}: {n}")
    for reason, n in counts["skipped_by_reason"].items():
        lines.append(f"  skipped  {reason}: {n}")
    if manifest.get("previous_snapshot"):
        lines.append(f"refresh    {manifest['refresh_mode']} from {manifest['previous_snapshot']}: "
                     f"{counts['reused']} reused, {counts['new']} new, "
                     f"{counts['reembedded']} re-embedded, {counts['removed']} removed, "
                     f"{counts['retried_failures']} earlier failures retried")
    timings = manifest["timings"]
    lines.append(f"time       {timings['seconds']:.1f} s, "
                 f"{timings['images_per_second'] or 0:.2f} images/s")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
