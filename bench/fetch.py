"""Benchmark: does the fetch stage keep `concurrency` requests in flight?

A loopback server (in its own process, so it does not share our GIL) answers
every request after a fixed latency L. With C requests in flight the ideal
throughput is C / L; efficiency is the measured throughput over that ideal.
Anything the fetcher does per request (thread hand-offs, locks, politeness,
address checks, magic-number sniffing, hashing) shows up as lost efficiency.

Per-host limits are opened up for the measurement (one host serves all, in
`concurrency` shards); they are what production runs are meant to be limited
by, not this code.

    .venv/bin/python bench/fetch.py [--n 640] [--concurrency 64] [--latency 0.1]

The last line is `fetch_efficiency=<ratio>`.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apache_beam.pvalue import TaggedOutput  # noqa: E402
from apache_beam.transforms.window import GlobalWindow  # noqa: E402
from apache_beam.utils.timestamp import MIN_TIMESTAMP  # noqa: E402

from transforms.fetch.stage import FetchHostShards, shard_key  # noqa: E402
from transforms.fetch.config import FetchConfig  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402


def _image(size: int = 192) -> bytes:
    """A real JPEG of a realistic small size (noise does not compress)."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(
        buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _serve(latency: float, body: bytes, ready, stop) -> None:
    """A minimal keep-alive HTTP/1.1 server on asyncio: every GET, after `latency`.

    The thread-per-connection FaultServer spends more CPU per request than
    the fetcher under test, and on 2 cores that would be what is measured.
    """
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(latency)
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def run() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024)
        ready.send(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        server.close()

    asyncio.run(run())


def _tasks(base_url: str, n: int) -> list[dict]:
    return [{"gbifID": str(i), "identifier": f"{base_url}/img.jpg?i={i}",
             "occurrenceID": None, "datasetKey": None, "taxonKey": None,
             "scientificName": None, "license": None, "rightsHolder": None,
             "creator": None} for i in range(n)]


def _run(dofn: FetchHostShards, tasks: list[dict]) -> tuple[float, list]:
    """Drive the DoFn as a runner would: the tasks grouped by (host, shard) as the
    stage's GroupByKey groups them, one bundle, every group through process."""
    groups: dict = {}
    for task in tasks:
        groups.setdefault(shard_key(task, dofn.config), []).append(task)
    outputs: list = []
    started = time.perf_counter()
    dofn.start_bundle()
    for group in groups.items():
        outputs.extend(dofn.process(group, GlobalWindow(), MIN_TIMESTAMP))
    outputs.extend(dofn.finish_bundle())
    return time.perf_counter() - started, outputs


def _split(outputs: list) -> tuple[list[dict], list]:
    fetched, other = [], []
    for output in outputs:
        if isinstance(output, TaggedOutput):
            other.append(output)
        else:
            fetched.append(output.value)
    return fetched, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=640, help="URLs to fetch")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1, help="Server latency, seconds")
    parser.add_argument("--image_px", type=int, default=192, help="Side of the served JPEG")
    args = parser.parse_args()

    body = _image(args.image_px)
    ready_recv, ready_send = multiprocessing.Pipe(duplex=False)
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, daemon=True,
                                     args=(args.latency, body, ready_send, stop))
    server.start()
    base_url = ready_recv.recv()

    config = FetchConfig(fetch_concurrency=args.concurrency,
                         per_host_concurrency=args.concurrency, per_host_rate=1e6,
                         allow_private_networks=("127.0.0.1/32",), max_attempts=1,
                         connect_timeout=5, read_timeout=10, fetch_timeout=30)
    dofn = FetchHostShards(config)
    dofn.setup()
    try:
        elapsed, outputs = _run(dofn, _tasks(base_url, args.n))
    finally:
        dofn.teardown()
        stop.set()
        server.join(5)

    fetched, other = _split(outputs)
    tally = next((o.value.value for o in other if o.tag == "tally"), {})
    failures = [o.value.value for o in other if o.tag == "failures"]
    latencies = sorted(r["fetch_seconds"] for r in fetched)
    throughput = len(fetched) / elapsed
    ideal = args.concurrency / args.latency
    efficiency = throughput / ideal

    print(f"cpu                 {describe_cpu()}")
    print(f"urls                {args.n} (cold start: connections opened in the run), "
          f"body {len(body)} bytes JPEG")
    print(f"concurrency         {args.concurrency}, server latency {args.latency * 1000:.0f} ms")
    print(f"fetched / failed    {len(fetched)} / {len(failures)}"
          + (f"  first failure: {failures[0]}" if failures else ""))
    print(f"elapsed             {elapsed:.3f} s")
    if latencies:
        print(f"latency p50 / p95   {statistics.median(latencies) * 1000:.0f} / "
              f"{latencies[int(0.95 * (len(latencies) - 1))] * 1000:.0f} ms")
    print(f"throughput          {throughput:.1f} req/s (ideal {ideal:.1f} req/s)")
    print(f"tally               {dict(sorted(tally.items()))}")
    print(f"fetch_efficiency={efficiency:.2f}")


if __name__ == "__main__":
    main()
