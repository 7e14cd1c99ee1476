"""Benchmark: a GBIF-shaped run over many hosts, polite for the whole job.

Hosts on 127.0.0.2, 127.0.0.3, ... (one address each) serve image counts
drawn from a Zipf law (a few big institutional servers, a long tail), with
latencies from 20 to 800 ms; one host answers 429 with `Retry-After` (for its
first seconds, then every 10th request) and one stalls (holds every answer
longer than the client waits). `gbif-embed run` fetches them with 2 local
worker processes at `--per_host_rate` and `--per_host_concurrency`, which
now hold for the whole job, so the two processes together must keep them.

Every host logs each request's arrival and end. Printed:
- `over_limit=`: the 1-second windows [n, n+1) in which any host got more than
  floor(rate) requests or had more than `concurrency` in flight (must be 0).
- `host_efficiency=` (last line): the ideal wall time over the measured one.
  Ideal: the larger of the slowest host's images ÷ its allowed rate
  (min(rate, concurrency ÷ latency); the stalling host excluded) and the
  compute time (distinct images ÷ the model's images/s in a tight loop on this
  machine). Measured: from the first request any host saw to the last answer,
  so the fixed start-up and end of the run (TensorFlow, the model check,
  Parquet) are not counted: they are the subject of bench/pipeline.py.

    .venv/bin/python bench/hosts.py [--images 1200] [--hosts 24] [--rate 4] [--concurrency 2]
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, log, model, tight_loop, write_export  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402
from tests.image_hosts import Host, ImageHosts, violations  # noqa: E402


def _plan(hosts: int, images: int, seed: int) -> tuple[list[Host], list[int]]:
    """Hosts and their image counts: Zipf (s=1), latencies log-uniform 20–800 ms."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(hosts)]
    counts = [max(2, round(images * w / sum(weights))) for w in weights]
    latencies = [math.exp(rng.uniform(math.log(0.02), math.log(0.8))) for _ in range(hosts)]
    farm = []
    for i in range(hosts):
        throttle = 3.0 if i == hosts // 2 else 0.0  # a mid-sized host
        stall = 60.0 if i == hosts - 1 else 0.0
        farm.append(Host(f"127.0.0.{i + 2}", latency=round(latencies[i], 3),
                         throttle=throttle, stall=stall))
    return farm, counts


def _model_rate(model_dir: str, batch: int = 16) -> float:
    import numpy as np
    from transforms.embed.models import load
    embed = load(model_dir).embed
    batches = [np.zeros((batch, 299, 299, 3), np.uint8)]
    return tight_loop(embed, batches, seconds=3.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--hosts", type=int, default=24)
    parser.add_argument("--rate", type=float, default=4.0, help="--per_host_rate")
    parser.add_argument("--concurrency", type=int, default=2, help="--per_host_concurrency")
    parser.add_argument("--arch", default="tiny", help="stand-in model: tiny or inception_v4")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.hosts < 4 or args.hosts > 200:
        sys.exit("--hosts must be between 4 and 200")

    print(f"cpu                 {describe_cpu()}")
    model_dir = model(args.arch)
    compute_rate = _model_rate(model_dir)
    hosts, counts = _plan(args.hosts, args.images, args.seed)
    work = tempfile.mkdtemp(prefix="bench-hosts-")
    log_path = os.path.join(work, "requests.tsv")
    with ImageHosts(hosts, log_path) as farm:
        urls = [f"{base}/img-{i}-{k}.jpg" for i, base in enumerate(farm.urls)
                for k in range(counts[i])]
        random.Random(args.seed).shuffle(urls)
        export = write_export(os.path.join(work, "export.zip"), urls)
        argv = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                "--export", export, "--model", model_dir,
                "--output", os.path.join(work, "out"), "--quiet", "--report_samples", "0",
                "--allow_private_networks", "127.0.0.0/8",
                "--per_host_rate", str(args.rate),
                "--per_host_concurrency", str(args.concurrency),
                "--read_timeout", "2", "--fetch_timeout", "6", "--max_attempts", "4",
                "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
        log(f"running {len(urls)} images over {len(hosts)} hosts with 2 worker processes ...")
        started = time.time()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        total = time.time() - started
    if done.returncode != 0:
        sys.exit(f"the run failed:\n{done.stderr[-3000:]}")
    seen = farm.requests()
    over, worst = violations(seen, args.rate, args.concurrency)
    first = min(r[1] for r in seen)
    last = max(r[2] for r in seen)
    measured = last - first

    ideal_hosts = []
    print(f"run                 {len(urls)} images, {len(hosts)} hosts, rate {args.rate:g}/s "
          f"and {args.concurrency} in flight per host for the whole job, 2 worker processes")
    print(f"{'host':<12}{'images':>7}{'latency':>9}{'allowed/s':>10}{'bound s':>9}"
          f"{'max/s':>7}{'in flight':>10}{'done at s':>10}  note")
    by_host = collections.defaultdict(list)
    for address, arrived, end, _ in seen:
        by_host[address].append(end)
    for host, n in zip(hosts, counts):
        allowed = min(args.rate, args.concurrency / host.latency)
        bound = n / allowed
        note = "stalls" if host.stall else ("429 + Retry-After" if host.throttle else "")
        if not host.stall:
            ideal_hosts.append(bound)
        w = worst.get(host.address, {})
        finished = max(by_host.get(host.address, [first])) - first
        print(f"{host.address:<12}{n:>7}{host.latency * 1000:>7.0f}ms{allowed:>10.2f}"
              f"{bound:>9.1f}{w.get('max_per_second', 0):>7}{w.get('max_in_flight', 0):>10}"
              f"{finished:>10.1f}  {note}")
    compute = len(urls) / compute_rate
    ideal = max(max(ideal_hosts), compute)
    print(f"model               {args.arch}: {compute_rate:.1f} images/s in a tight loop "
          f"(compute {compute:.1f} s)")
    print(f"requests            {len(seen)} for {len(urls)} URLs")
    print(f"wall                {measured:.1f} s from the first request to the last answer "
          f"({total:.1f} s for the whole command)")
    print(f"ideal               {ideal:.1f} s (slowest host {max(ideal_hosts):.1f} s, "
          f"compute {compute:.1f} s)")
    print(f"over_limit={over}")
    print(f"host_efficiency={ideal / measured:.2f}")


if __name__ == "__main__":
    main()
