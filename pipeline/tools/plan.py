"""`gbif-embed plan --export EXPORT`: how long a run will take, before paying for it.

A first run is bounded by two things that more workers cannot both fix: the
politeness limits of the busiest host (its distinct URLs at `--per_host_rate`
requests/s for the whole job, whatever the worker count) and the CPU time of
the model. `plan` reads the export with the run's own reader and URL rules
(so its counts are the run's counts), fetches nothing, and measures the model
on this machine's CPU (or takes a rate measured elsewhere), then says which
of the two sets the pace and how many workers are worth paying for.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import machine
from pipeline.options import GbifEmbedOptions, fetch_config
from transforms.fetch.config import FetchConfig, fetch_url, host_of
from transforms.fetch.politeness import shard_budgets
from transforms.read.export import Archive, image_rows, read_spec
from transforms.store.copies import BYTES_PER_STORED_PICTURE
from transforms.common.tally import Tally

TOP_HOSTS = 20
NO_RATE = ("not measured: pass --model PATH (measured here for a few seconds) or "
           "--images_per_second_per_vcpu X (measured elsewhere) for the compute part")
BATCH = 16
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # as `run` requires for --precision bfloat16
NOT_MODELLED = ("not modelled: start-up (workers, model loading), retries and back-off "
                "(429/503, Retry-After), latency-bound hosts, failures, decoding and other "
                "pipeline overhead, and the reuse of a previous snapshot (this is a first run "
                "or --full)")


def job_rate(config: FetchConfig, host: str) -> float:
    """Requests/s one host gets for the whole job: the sum of its shards' budgets,
    as the fetch stage grants them (floor(rate) when the rate is 1/s or more)."""
    return sum(b.rate for b in shard_budgets(*config.host_limits(host)))


def lower_bound_s(urls: int, rate: float) -> float:
    """Seconds a host needs at least to serve `urls` at `rate` (0: no rate limit)."""
    return urls / rate if rate > 0 else 0.0


def estimate(compute_vcpu_s: Optional[float], slowest_host_s: float, workers: int,
             vcpus_per_worker: int) -> dict:
    """Wall time, vCPU-hours and the useful worker count for N workers of M vCPUs,
    for a first run and for a model change (which reads the image store).

    Where fetching and inference overlap (the local runner embeds in the
    fetching stage), a first run's wall time is the larger of the slowest
    host's bound and the compute time; workers beyond the point where compute
    fits in the slowest host's time only add idle vCPU-hours. On Dataflow and
    Flink in batch mode the shuffle keyed by content (ByContent) is a barrier:
    embedding starts when fetching has ended, so a first run takes the fetch
    phase plus the compute phase spread over every vCPU (`batch_wall_s`),
    and vCPU-hours are those of a fixed fleet for that long. A model change
    asks no host: compute only. Without a model rate only the hosts' bound
    is known.
    """
    vcpus = workers * vcpus_per_worker
    if compute_vcpu_s is None:
        return {"compute_s": None, "wall_s": slowest_host_s,
                "vcpu_hours": slowest_host_s * vcpus / 3600, "useful_workers_max": None,
                "bound_by": "host", "model_change_s": None, "model_change_vcpu_hours": None,
                "fetch_s": slowest_host_s, "batch_wall_s": None, "batch_vcpu_hours": None}
    compute_s = compute_vcpu_s / vcpus
    wall_s = max(slowest_host_s, compute_s)
    useful = (max(1, math.ceil(compute_vcpu_s / (slowest_host_s * vcpus_per_worker)))
              if slowest_host_s > 0 else None)
    return {"compute_s": compute_s, "wall_s": wall_s, "vcpu_hours": wall_s * vcpus / 3600,
            "useful_workers_max": useful,
            "bound_by": "host" if slowest_host_s >= compute_s else "compute",
            "model_change_s": compute_s, "model_change_vcpu_hours": compute_vcpu_s / 3600,
            "fetch_s": slowest_host_s, "batch_wall_s": slowest_host_s + compute_s,
            "batch_vcpu_hours": (slowest_host_s + compute_s) * vcpus / 3600}


@dataclass
class ExportCounts:
    images: int                   # rows the run keeps: distinct (gbifID, identifier)
    urls_by_host: dict[str, int]  # distinct fetch URLs per host
    invalid_urls: int             # rows without a fetchable URL (the run fails them)
    skipped: dict[str, float]     # what the reader skipped, by the run's reasons


@functools.lru_cache(maxsize=65536)
def _host_of_authority(start: str) -> str:
    return host_of(start)


def _host(url: str) -> str:
    """host_of, cached by what it reads (scheme and authority end at the third
    `/`): most of a plan's time went into parsing the same few hundred hosts."""
    return _host_of_authority("/".join(url.split("/", 3)[:3]))


def count_export(export: str, config: FetchConfig, max_images: int = 0) -> ExportCounts:
    """Counts what the run would fetch, with its reader and its URL rules."""
    tally, pairs, host_by_url, invalid = Tally(), set(), {}, 0
    with Archive(export) as archive:
        spec = read_spec(archive)
        for gbif_id, media in image_rows(archive, spec.image_source(), tally, max_images):
            pair = (gbif_id, media["identifier"])
            if pair in pairs:  # the run's join drops it (JoinOccurrences)
                tally.add("skipped.duplicate_image")
                continue
            pairs.add(pair)
            try:
                url = fetch_url({"gbifID": gbif_id, **media}, config)
            except ValueError:
                invalid += 1
                continue
            if url not in host_by_url:
                host_by_url[url] = _host(url)
    counts = tally.flush()
    return ExportCounts(len(pairs), dict(collections.Counter(host_by_url.values())), invalid,
                        {k: v for k, v in counts.items() if k.startswith("skipped.")})


def planned_precision(model: str, requested: str) -> tuple[str, str]:
    """The precision the run would embed in on this CPU, and why: --precision
    auto takes the first candidate only if it passes the run's self-check,
    which plan cannot run, so it plans with that candidate and says so."""
    from transforms.embed.auto_precision import candidates
    from transforms.embed.model_files import localize, model_format
    if requested != "auto":
        return requested, f"--precision {requested}"
    tried = candidates(model_format(localize(model), model), "auto")
    if not tried:
        return "float32", ("--precision auto: this CPU runs no faster precision for this "
                           "model's format")
    return tried[0], (f"--precision auto would try {tried[0]} first; the run's launcher keeps "
                      "it for the whole job only if it passes its self-check on the run's "
                      "pictures (local runner; a distributed run's auto is float32)")


def measure_rate(model: str, precision: str, seconds: float, normalize: str = "unit",
                 image_size: int = 0) -> tuple[float, float, float]:
    """(images/s of the whole machine, seconds measured, cores other processes
    used meanwhile): the model on uint8 noise at batch 16 after one warm-up
    call, as the run calls it. A busy machine measures low, hence the third."""
    import numpy as np
    from transforms.embed.model_files import localize, model_format
    from transforms.embed.models import load
    from transforms.embed.precision import configure_tensorflow
    if model_format(localize(model), model) != "onnx":
        configure_tensorflow(0, precision)
    loaded = load(model, normalize, image_size)
    embed, size = loaded.embed, loaded.spec.image_size
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    embed(batch)
    images, start = 0, time.perf_counter()
    busy, own = machine.busy_cpu_seconds(), time.process_time()
    while images < 2 * BATCH or time.perf_counter() - start < seconds:
        embed(batch)
        images += BATCH
    elapsed = time.perf_counter() - start
    others = machine.busy_cpu_seconds() - busy - (time.process_time() - own)
    return images / elapsed, elapsed, max(0.0, others / elapsed)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def format_plan(plan: dict, config: FetchConfig) -> str:
    """The plan as the terminal shows it; every figure is also in `--json`."""
    width = max([len(h["host"]) for h in plan["top_hosts"]] + [4])
    lines = [f"export: {plan['export']}", f"cpu: {plan['cpu']['description']}",
             f"images: {plan['images']:,} image rows, {plan['distinct_urls']:,} distinct URLs "
             f"(each fetched once) on {plural(plan['hosts'], 'host')}"]
    skipped = [f"{k.split('.', 1)[1]} {v:,.0f}" for k, v in sorted(plan["skipped"].items())]
    skipped += [f"invalid_url {plan['invalid_urls']:,}"] if plan["invalid_urls"] else []
    if skipped:
        lines.append(f"  not fetched (as in the run): {', '.join(skipped)}")
    special = "".join(f"; {h}: {c} in flight" for h, (c, _) in config.host_overrides().items())
    lines.append(f"largest hosts (distinct URLs; politeness lower bound at "
                 f"{config.per_host_rate:g} requests/s and {config.per_host_concurrency} in "
                 f"flight per host, for the whole job{special}):")
    lines += [f"  {h['host']:<{width}} {h['urls']:>9,}  {duration(h['lower_bound_s']):>9}"
              for h in plan["top_hosts"]]
    in_flight, rate = config.host_limits(plan["slowest_host"] or "")
    if rate > 0:
        lines.append(f"  a host answering slower than {in_flight / rate:.2f} s per image is "
                     f"slower still: it gets {in_flight} ÷ latency requests/s")
    n, m = plan["workers"], plan["vcpus_per_worker"]
    if plan["compute_vcpu_s"] is None:
        lines.append(f"compute: {plan['rate_source']}")
        lines.append(f"{plural(n, 'worker')} x {m} vCPUs: wall >= "
                     f"{duration(plan['wall_s'])} ({plan['slowest_host']} sets the pace at the "
                     f"least; the compute part is not known)")
    else:
        lines.append(f"compute: {plan['distinct_urls']:,} images (distinct URLs: an upper bound "
                     f"on distinct contents) ÷ {plan['rate_per_vcpu']:.2f} images/s per vCPU "
                     f"({plan['rate_source']}) = {plan['compute_vcpu_s'] / 3600:,.2f} "
                     f"vCPU-hours, spread over every vCPU")
        pace = (f"{plan['slowest_host']} sets the pace" if plan["bound_by"] == "host"
                else "the CPUs set the pace")
        useful = plan["useful_workers_max"]
        lines.append(f"first run, {plural(n, 'worker')} x {m} vCPUs: wall >= "
                     f"{duration(plan['wall_s'])} ({pace}; compute alone "
                     f"{duration(plan['compute_s'])}), {plan['vcpu_hours']:,.2f} vCPU-hours; "
                     + (f"more than {plural(useful, 'worker')} of {m} vCPUs do not help"
                        if useful else "no host rate limit: more workers always help"))
        lines.append(f"  on Dataflow or Flink in batch mode the shuffle keyed by content is a "
                     f"barrier (embedding starts when fetching ends): wall >= fetch "
                     f"{duration(plan['fetch_s'])} + compute {duration(plan['compute_s'])} = "
                     f"{duration(plan['batch_wall_s'])} (more workers shorten only the "
                     f"compute phase), {plan['batch_vcpu_hours']:,.2f} vCPU-hours on a fixed "
                     f"fleet")
        lines.append(f"a model change (pictures from the image store, no host asked): "
                     f"compute only, {duration(plan['model_change_s'])} on "
                     f"{plural(n, 'worker')} x {m} vCPUs, "
                     f"{plan['model_change_vcpu_hours']:,.2f} vCPU-hours")
    lines.append(f"image store: {plan['distinct_urls']:,} pictures x "
                 f"~{plan['store_bytes_per_picture'] / 1000:.0f} kB = "
                 f"~{plan['store_bytes'] / 1e9:,.2f} GB (one copy per content, shorter side "
                 f"299-597 px)")
    lines.append(NOT_MODELLED)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gbif-embed plan", allow_abbrev=False, description=(
            "Before a run: image rows, distinct URLs and hosts of an export, each host's "
            "politeness lower bound, the compute time, and the wall time and vCPU-hours "
            "for N workers. Fetches nothing."),
        epilog="Also read, with the meaning they have for `run`: --export (required), "
        "--model, --precision, --max_images, --image_source, --mirror, --per_host_rate, "
        "--per_host_concurrency.")
    add = parser.add_argument
    add("--images_per_second_per_vcpu", type=float, metavar="X",
        help="Model speed measured elsewhere (else --model is measured on this CPU)")
    add("--workers", type=int, default=1, metavar="N", help="Workers (default 1)")
    add("--vcpus_per_worker", type=int, default=os.cpu_count() or 1, metavar="M",
        help="vCPUs per worker (default: this machine's)")
    add("--measure_seconds", type=float, default=6.0, metavar="S",
        help="How long to run the model when measuring (default 6)")
    add("--json", metavar="PATH", help="Also write the figures as JSON here")
    return parser


def _check(args: argparse.Namespace, opts: GbifEmbedOptions) -> None:
    """Fails before reading anything when the flags cannot give a plan."""
    given = args.images_per_second_per_vcpu
    if not opts.export:
        raise ValueError("--export is required: a GBIF DwC-A download (.zip or folder)")
    if (given is not None and given <= 0) or args.workers < 1 or args.vcpus_per_worker < 1:
        raise ValueError("--images_per_second_per_vcpu, --workers and --vcpus_per_worker "
                         "must be positive")
    if given is None and opts.precision == "bfloat16" and not (
            BF16_FLAGS & set(machine.vector_flags())):
        raise ValueError("--precision bfloat16 needs a CPU with AVX512-BF16 or AMX; "
                         "use --precision float32, or --images_per_second_per_vcpu")


def _rate(args: argparse.Namespace, opts: GbifEmbedOptions
          ) -> tuple[Optional[float], str, Optional[str]]:
    """images/s per vCPU, where the figure comes from (None: not known), and
    the precision it was measured in."""
    if args.images_per_second_per_vcpu is not None:
        return args.images_per_second_per_vcpu, "--images_per_second_per_vcpu", None
    if not opts.model:
        return None, NO_RATE, None
    precision, why = planned_precision(opts.model, opts.precision)
    total, seconds, others = measure_rate(opts.model, precision, args.measure_seconds,
                                          opts.normalize, opts.image_size)
    cpus = os.cpu_count() or 1
    return total / cpus, (f"measured here: {total:.2f} images/s on {cpus} vCPUs, "
                          f"{precision} ({why}), batch {BATCH}, {seconds:.1f} s; other "
                          f"processes used {others:.1f} cores meanwhile"), precision


def plan_command(argv: Sequence[str]) -> int:
    args, rest = _parser().parse_known_args(list(argv))  # -h prints help and exits
    opts = PipelineOptions(rest).view_as(GbifEmbedOptions)
    _check(args, opts)
    config = fetch_config(opts)
    counts = count_export(opts.export, config, opts.max_images)
    rate, source, precision = _rate(args, opts)
    hosts = sorted(counts.urls_by_host.items(), key=lambda item: (-item[1], item[0]))
    bounds = {h: lower_bound_s(n, job_rate(config, h)) for h, n in hosts}
    slowest = max(bounds, key=bounds.__getitem__, default=None)
    distinct = sum(counts.urls_by_host.values())
    compute_vcpu_s = distinct / rate if rate else None
    plan = {"export": opts.export,
            "cpu": {"model": machine.cpu_model(), "vector_flags": machine.vector_flags(),
                    "vcpus": os.cpu_count(), "description": machine.describe_cpu()},
            "images": counts.images, "distinct_urls": distinct,
            "hosts": len(hosts), "invalid_urls": counts.invalid_urls, "skipped": counts.skipped,
            "per_host_rate": config.per_host_rate,
            "per_host_concurrency": config.per_host_concurrency,
            "top_hosts": [{"host": h, "urls": n, "lower_bound_s": bounds[h]}
                          for h, n in hosts[:TOP_HOSTS]],
            "slowest_host": slowest,
            "rate_per_vcpu": rate, "rate_source": source, "compute_vcpu_s": compute_vcpu_s,
            "precision": precision,
            "workers": args.workers, "vcpus_per_worker": args.vcpus_per_worker,
            "store_bytes": distinct * BYTES_PER_STORED_PICTURE,
            "store_bytes_per_picture": BYTES_PER_STORED_PICTURE,
            **estimate(compute_vcpu_s, bounds.get(slowest, 0.0), args.workers,
                       args.vcpus_per_worker),
            "not_modelled": NOT_MODELLED}
    print(format_plan(plan, config))
    if args.json:
        with fsspec.open(args.json, "w") as handle:  # local or gs://, like the export
            json.dump(plan, handle, indent=2)
    return 0


if __name__ == "__main__":  # `python -m pipeline.tools.plan`, failing as `gbif-embed` does
    try:
        sys.exit(plan_command(sys.argv[1:]))
    except ValueError as err:  # ExportError and ModelError are ValueErrors
        print(f"gbif-embed plan: error: {err}", file=sys.stderr)
        sys.exit(2)
