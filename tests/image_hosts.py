"""Many image hosts on loopback, each on its own 127.0.0.x address, that log
what they see: for tests and benchmarks of job-wide politeness.

Each host is an asyncio server in one separate process (so it never shares
a GIL with the pipeline under test) and answers every GET after its own
latency with a small JPEG that is distinct per URL (the path is appended
after the JPEG's end, which decoders ignore), except under `/same-*` paths,
which all serve the very same bytes (a placeholder picture). A host can also answer 429 with
`Retry-After` (`throttle`: every request in the first `throttle` seconds
after its first request, then every 10th), or stall (`stall`: hold each
response that long). Every request is logged with its arrival and its end
(the response written, or the client gone), in wall-clock seconds, so
`violations` can count the 1-second windows in which a host got more
requests than its rate allowed or had more in flight than allowed.
"""
from __future__ import annotations

import asyncio
import collections
import io
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Host:
    address: str           # 127.0.0.x
    latency: float = 0.05  # seconds before answering
    throttle: float = 0.0  # seconds of 429 + Retry-After at the start (then every 10th)
    stall: float = 0.0     # seconds to hold each response (longer than the client waits)


def jpeg(size: int = 64, seed: int = 0) -> bytes:
    from PIL import Image
    import random
    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3))
                    ).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _serve(hosts: list[Host], body: bytes, ready, stop, log_path: str) -> None:
    log: list[tuple] = []

    async def handler_for(host: Host):
        first: list[float] = []
        count = [0]

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    arrived = time.time()
                    path = head.split(b" ", 2)[1]
                    count[0] += 1
                    if not first:
                        first.append(arrived)
                    end = arrived
                    try:
                        if host.stall:
                            gone = asyncio.ensure_future(reader.read(1))
                            done, _ = await asyncio.wait([gone], timeout=host.stall)
                            if done:  # the client gave up and closed
                                end = time.time()
                                return
                            gone.cancel()
                        await asyncio.sleep(host.latency)
                        throttled = host.throttle and (arrived - first[0] < host.throttle
                                                       or count[0] % 10 == 0)
                        if throttled:
                            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                                         b"Content-Length: 0\r\n\r\n")
                        else:
                            # /same-* paths: one content under many URLs (a placeholder)
                            content = body if path.startswith(b"/same") else body + path
                            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                                         b"Content-Length: %d\r\n\r\n" % len(content) + content)
                        await writer.drain()
                        end = time.time()
                    finally:
                        log.append((host.address, arrived, end, path.decode(errors="replace")))
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()
        return answer

    async def run() -> None:
        servers, urls = [], []
        for host in hosts:
            server = await asyncio.start_server(await handler_for(host), host.address, 0,
                                                backlog=1024)
            servers.append(server)
            urls.append(f"http://{host.address}:{server.sockets[0].getsockname()[1]}")
        ready.send(urls)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        for server in servers:
            server.close()

    asyncio.run(run())
    with open(log_path, "w") as handle:
        for address, arrived, end, path in log:
            handle.write(f"{address}\t{arrived:.6f}\t{end:.6f}\t{path}\n")


class ImageHosts:
    """`with ImageHosts(hosts, log_path) as farm:` farm.urls[i] serves hosts[i]."""

    def __init__(self, hosts: list[Host], log_path: str, body: Optional[bytes] = None):
        self.hosts = hosts
        self.log_path = log_path
        self._body = body or jpeg()
        self.urls: list[str] = []

    def __enter__(self) -> "ImageHosts":
        receive, send = multiprocessing.Pipe(duplex=False)
        self._stop = multiprocessing.Event()
        self._process = multiprocessing.Process(
            target=_serve, args=(self.hosts, self._body, send, self._stop, self.log_path),
            daemon=True)
        self._process.start()
        if not receive.poll(30):
            raise RuntimeError("the image hosts did not start")
        self.urls = receive.recv()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._process.join(30)

    def requests(self) -> list[tuple[str, float, float, str]]:
        """(address, arrival, end, path) of every request; after the `with`."""
        rows = []
        if os.path.exists(self.log_path):
            with open(self.log_path) as handle:
                for line in handle:
                    address, arrived, end, path = line.rstrip("\n").split("\t", 3)
                    rows.append((address, float(arrived), float(end), path))
        return rows


def violations(requests: list[tuple[str, float, float, str]], rate: float,
               concurrency: int) -> tuple[int, dict]:
    """(windows over a limit, the worst seen per host).

    A window is one wall-clock second [n, n+1) of one host; it is over the
    limit when the host got more than floor(rate) requests in it, or had more
    than `concurrency` requests in flight at some moment in it.
    """
    allowed = max(1, int(rate + 1e-9))
    per_second: collections.Counter = collections.Counter()
    events: dict[str, list] = collections.defaultdict(list)
    for address, arrived, end, _ in requests:
        per_second[(address, int(arrived))] += 1
        events[address] += [(arrived, 1), (end, -1)]
    bad = {window for window, n in per_second.items() if n > allowed}
    worst: dict = {}
    for address, changes in events.items():
        in_flight = peak = 0
        # Ends before arrivals at the same instant: a slot freed, then taken.
        for at, change in sorted(changes, key=lambda c: (c[0], c[1])):
            in_flight += change
            peak = max(peak, in_flight)
            if in_flight > concurrency:
                bad.add((address, int(at)))
        busiest = max((n for (a, _), n in per_second.items() if a == address), default=0)
        worst[address] = {"max_per_second": busiest, "max_in_flight": peak}
    return len(bad), worst
