"""Beam's Python worker pool bound to one address: one per TaskManager.

`python -m apache_beam.runners.worker.worker_pool_main` listens on every
address (`[::]:PORT`), so two pools on one machine cannot share a port. Each
TaskManager here resolves the pool's name (`beam-worker-pool`) to an address
of its own (127.0.0.1, 127.0.0.2, ...; see cluster.py), and each pool listens
on its own, so `--environment_config beam-worker-pool:PORT` reaches the pool
beside the TaskManager that asks, as a sidecar in the TaskManager's pod does
in a real deployment. The pool starts each SDK worker with the `python` on
PATH (the cluster puts the project's environment first).

`--cpus` pins the pool, and so the workers it starts, to its TaskManager's
share of the machine's cores: TensorFlow sizes its thread pools from the
CPUs a process may run on, so the workers of all the TaskManagers on one
machine together run no more inference threads than it has cores.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor


def serve(host: str, port: int) -> grpc.Server:
    """A started pool on HOST:PORT whose workers are separate processes."""
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0),
                                  ("grpc.http2.max_ping_strikes", 0)])
    if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"the worker pool cannot listen on {host}:{port}")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(use_process=True), server)
    server.start()
    return server


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flink.worker_pool")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpus", default="",
                        help="Comma-separated CPU numbers this pool and its workers run on")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = serve(args.host, args.port)
    logging.info("worker pool listening on %s:%d", args.host, args.port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
