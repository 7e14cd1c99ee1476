"""The `gbif-embed` command: run, plan, evaluate, query, make-model, demo, explore, suspects.

`run` checks the export and the model at launch, before anything is
fetched, so a wrong path or a model that does not fit fails in seconds with
a message that says what was expected and what was found. On the local
runner it shows live progress; after any run it writes `report.html` into
the snapshot and prints a summary. `evaluate` and `query` use the
embeddings: Recall@k of retrieval, and the nearest images to a picture.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.gbif_download.errors import GbifError
from pipeline.interrupt import RunStopped
from pipeline.launch import UsageError, _write_report, run  # noqa: F401 (run: the API)
from pipeline.options import GbifEmbedOptions
from transforms.read.export import ExportError

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command, "plan": plan_command, "evaluate": evaluate_command,
                "query": query_command, "make-model": make_model_command,
                "demo": demo_command, "flink": flink_command, "store": store_command,
                "explore": explore_command, "suspects": suspects_command}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: gbif-embed {run,plan,evaluate,query,make-model,demo,flink,store,explore,"
              "suspects} "
              "[options]\n\n"
              "  run         embed the images of a GBIF DwC-A download into Parquet\n"
              "  plan        how long a run will take: hosts, politeness bounds, compute\n"
              "  evaluate    Recall@1/5/10 of image retrieval over the current snapshot\n"
              "  query       the nearest stored images to a picture or an occurrence\n"
              "  make-model  write an embedder: a stand-in of fungi_V2 (random weights) or\n"
              "              ImageNet EfficientNet-Lite0 (trained), as TF1 Hub, TF2 or ONNX\n"
              "  demo        generate a small GBIF export, serve it on loopback, run it\n"
              "  flink       start, stop or show a Flink cluster on loopback\n"
              "  store       prune (or compact) the image store: what no kept snapshot uses\n"
              "  explore     a local page: search by id, name or photo, filters, a map,\n"
              "              suspect identifications\n"
              "  suspects    records whose pictures look like another name, as CSV\n\n"
              "`gbif-embed COMMAND --help` lists a command's options.",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _quiet_libraries(verbose="--verbose" in argv)
    try:
        return commands[argv[0]](argv[1:])
    except (UsageError, ExportError, ValueError, FileNotFoundError) as err:
        print(f"gbif-embed {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except GbifError as err:  # a GBIF download that cannot be had: its own exit code
        print(f"gbif-embed {argv[0]}: error: {err}", file=sys.stderr)
        return err.exit_code


def store_command(argv: Sequence[str]) -> int:
    from pipeline.tools.store import store_command as command
    return command(argv)


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


def _quiet_libraries(verbose: bool = False) -> None:
    """Keep the terminal for our own output: TensorFlow's start-up lines
    (transforms/embed/tf_quiet.py; workers inherit the setting) and Beam's
    routine worker warnings (`_NOISE`). The filter sits on the handlers, since
    a logger's own filter does not see records its children pass up, and local
    workers' logs reach the launcher through a child logger of Beam's.
    `--verbose` (or TF_CPP_MIN_LOG_LEVEL set by the user) shows them all."""
    from transforms.embed import tf_quiet
    if verbose:
        os.environ[tf_quiet.VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if tf_quiet.verbose():
        return
    tf_quiet.quiet_environment()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_noise)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def make_model_command(argv: Sequence[str]) -> int:
    from transforms.embed.tf_quiet import import_tensorflow
    import_tensorflow()  # its start-up lines filtered, before the builders import it
    from pipeline.models.make_model import main as make_model
    return make_model(argv)


def plan_command(argv: Sequence[str]) -> int:
    from pipeline.tools.plan import plan_command as plan
    return plan(argv)


def demo_command(argv: Sequence[str]) -> int:
    from pipeline.demo.demo import demo
    return demo(argv)


def flink_command(argv: Sequence[str]) -> int:
    from pipeline.flink.cluster import main as flink
    return flink(argv)


def explore_command(argv: Sequence[str]) -> int:
    from pipeline.tools.explore.command import explore_command as explore
    return explore(argv)


def suspects_command(argv: Sequence[str]) -> int:
    from pipeline.tools.explore.command import suspects_command as suspects
    return suspects(argv)


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
    source.add_argument("--core_id", metavar="ID",
                        help="An occurrence by its archive's core id (a dataset's own "
                        "archive: its occurrenceID, e.g. urn:catalog:...); as --gbif_id")
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
    result = query(args.output, image=args.image, gbif_id=args.gbif_id, core_id=args.core_id,
                   k=args.k,
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


if __name__ == "__main__":
    console()
