"""`gbif-embed flink start|stop|status`: a standalone Flink cluster on loopback.

One JobManager, two TaskManagers (one slot each, so a job of parallelism 2
spreads over both) and one Beam Python worker pool per TaskManager, all on
this machine, with their logs in one folder. It is a Python command rather
than a shell script so that the tests' cluster fixture runs the very same
code, and so that it ships with the package (`pip install gbif-embed`
users have no scripts/ folder).

Each TaskManager's JVM reads its own hosts file (`-Djdk.net.hosts.file`)
in which the pool's name, `beam-worker-pool`, is the address of its own
pool (127.0.0.1 for the first, 127.0.0.2 for the second): one
`--environment_config beam-worker-pool:PORT` reaches the pool beside
whichever TaskManager asks, as `localhost:PORT` reaches the worker-pool
sidecar in each TaskManager's pod on Kubernetes.

Restart strategy (configured in every piece's config.yaml): fixed-delay,
3 attempts, 10 s apart; a TaskManager that stops answering heartbeats for
20 s is given up and its tasks restarted. `start` on a cluster that is up
reuses it and starts only what is missing (a killed TaskManager, say).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Optional, Sequence

import yaml

from pipeline.flink import distribution
from pipeline.flink.distribution import FLINK_MINOR, FLINK_VERSION, FlinkSetupError

POOL_NAME = "beam-worker-pool"
RESTART_STRATEGY = {"restart-strategy.type": "fixed-delay",
                    "restart-strategy.fixed-delay.attempts": 3,
                    "restart-strategy.fixed-delay.delay": "10 s"}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where a cluster lives and which ports it takes."""
    state_dir: pathlib.Path
    rest_port: int = 8081
    rpc_port: int = 6123
    pool_port: int = 50000
    taskmanagers: int = 2

    @property
    def logs(self) -> pathlib.Path:
        return self.state_dir / "logs"

    @property
    def master(self) -> str:
        return f"localhost:{self.rest_port}"

    @property
    def environment_config(self) -> str:
        return f"{POOL_NAME}:{self.pool_port}"

    def pool_host(self, index: int) -> str:
        """The loopback address of TaskManager `index`'s pool (1-based)."""
        return f"127.0.0.{index}"


def default_spec(**overrides) -> ClusterSpec:
    return ClusterSpec(state_dir=distribution.cache_root() / "cluster", **overrides)


# --- the pieces' processes --------------------------------------------------

def _pid_file(spec: ClusterSpec, piece: str) -> pathlib.Path:
    return spec.state_dir / "pids" / f"{piece}.pid"


def _daemon_pid_dir(spec: ClusterSpec, piece: str) -> pathlib.Path:
    return spec.state_dir / "pids" / piece


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def piece_pid(spec: ClusterSpec, piece: str) -> Optional[int]:
    """The pid of `jobmanager`, `taskmanager-N` or `pool-N`, if it runs."""
    files = ([_pid_file(spec, piece)] if piece.startswith("pool")
             else sorted(_daemon_pid_dir(spec, piece).glob("*.pid")))
    for path in files:
        for line in path.read_text().split() if path.exists() else []:
            if line.isdigit() and _alive(int(line)):
                return int(line)
    return None


def pieces(spec: ClusterSpec) -> list[str]:
    return ["jobmanager", *(f"taskmanager-{i}" for i in range(1, spec.taskmanagers + 1)),
            *(f"pool-{i}" for i in range(1, spec.taskmanagers + 1))]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


def rest(spec: ClusterSpec, path: str, timeout: float = 2.0):
    """GET the JobManager's REST API; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://localhost:{spec.rest_port}{path}",
                                    timeout=timeout) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


# --- configuration ----------------------------------------------------------

def _set(tree: dict, key: str, value) -> None:
    """Sets a dotted key in Flink's nested config.yaml in place (a second
    top-level block for the same prefix would not be read)."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _config(spec: ClusterSpec, home: pathlib.Path, piece: str) -> pathlib.Path:
    """A conf folder of the piece's own: the stock one with our keys."""
    conf = spec.state_dir / f"conf-{piece}"
    shutil.rmtree(conf, ignore_errors=True)
    shutil.copytree(home / "conf", conf)
    tree = yaml.safe_load((home / "conf" / "config.yaml").read_text()) or {}
    tmp = spec.state_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    settings = {
        "jobmanager.rpc.address": "localhost", "jobmanager.rpc.port": spec.rpc_port,
        "jobmanager.bind-host": "localhost", "jobmanager.memory.process.size": "1024m",
        "rest.address": "localhost", "rest.bind-address": "localhost",
        "rest.port": spec.rest_port,
        "taskmanager.host": "localhost", "taskmanager.bind-host": "localhost",
        "taskmanager.numberOfTaskSlots": 1, "taskmanager.memory.process.size": "1280m",
        "parallelism.default": spec.taskmanagers,
        "heartbeat.interval": 2000, "heartbeat.timeout": 20000,
        "io.tmp.dirs": str(tmp),
        **RESTART_STRATEGY,
    }
    if piece.startswith("taskmanager-"):
        index = int(piece.rsplit("-", 1)[1])
        hosts = spec.state_dir / f"{piece}.hosts"
        # Every name this JVM resolves must be here: the file replaces the system's.
        hosts.write_text(f"127.0.0.1 localhost {socket.gethostname()}\n"
                         f"{spec.pool_host(index)} {POOL_NAME}\n")
        settings["taskmanager.resource-id"] = piece
        settings["env.java.opts.taskmanager"] = f"-Djdk.net.hosts.file={hosts}"
    for key, value in settings.items():
        _set(tree, key, value)
    (conf / "config.yaml").write_text(yaml.safe_dump(tree, default_flow_style=False))
    return conf


def _flink_env(spec: ClusterSpec, home: pathlib.Path, piece: str) -> dict:
    return dict(os.environ, FLINK_HOME=str(home), FLINK_CONF_DIR=str(_config(spec, home, piece)),
                FLINK_LOG_DIR=str(spec.logs), FLINK_PID_DIR=str(_daemon_pid_dir(spec, piece)),
                FLINK_IDENT_STRING=f"gbif-embed-{piece}")  # each its own log file


def _start_daemons(spec: ClusterSpec, home: pathlib.Path, daemons: Sequence[str]) -> None:
    """`jobmanager.sh start` / `taskmanager.sh start`, all at once (each script
    runs Java a few times to read the configuration: seconds each)."""
    started = []
    for piece in daemons:
        script = "jobmanager.sh" if piece == "jobmanager" else "taskmanager.sh"
        pid_dir = _daemon_pid_dir(spec, piece)
        shutil.rmtree(pid_dir, ignore_errors=True)
        pid_dir.mkdir(parents=True)
        started.append((script, subprocess.Popen(
            [str(home / "bin" / script), "start"], env=_flink_env(spec, home, piece),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for script, process in started:
        said, _ = process.communicate(timeout=180)
        if process.returncode != 0:
            raise FlinkSetupError(f"{script} start failed: {said.strip()[-300:]}")


def cpu_share(taskmanagers: int, index: int) -> list[int]:
    """TaskManager `index`'s share (1-based) of the CPUs this process may use:
    an equal slice each, or one CPU each in turn where there are fewer CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if taskmanagers >= len(cpus):
        return [cpus[(index - 1) % len(cpus)]]
    size = len(cpus) // taskmanagers
    return cpus[(index - 1) * size:index * size]


def _start_pool(spec: ClusterSpec, index: int) -> None:
    """The pool starts SDK workers with the `python` on PATH: this environment's,
    pinned to this TaskManager's share of the cores (see worker_pool.py)."""
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(spec.logs / f"worker-pool-{index}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.flink.worker_pool",
             "--host", spec.pool_host(index), "--port", str(spec.pool_port),
             "--cpus", ",".join(map(str, cpu_share(spec.taskmanagers, index)))],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(spec, f"pool-{index}").write_text(f"{process.pid}\n")


def _wait(what: str, check, seconds: float, spec: ClusterSpec) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise FlinkSetupError(f"{what} within {seconds:.0f} s; see the logs in {spec.logs}")
        time.sleep(0.5)


def registered_taskmanagers(spec: ClusterSpec) -> list[str]:
    answer = rest(spec, "/taskmanagers") or {}
    return sorted(tm.get("id", "") for tm in answer.get("taskmanagers", []))


# --- the commands -----------------------------------------------------------

def start(spec: ClusterSpec, say=print) -> dict:
    """Starts what is not running (everything, the first time); reuses the rest."""
    distribution.java()
    home = distribution.flink_home()
    try:  # the launcher needs it, the cluster does not: say so, go on
        distribution.job_server_jar()
    except FlinkSetupError:
        pass  # status (below) says why
    spec.logs.mkdir(parents=True, exist_ok=True)
    (spec.state_dir / "pids").mkdir(parents=True, exist_ok=True)
    missing = [piece for piece in pieces(spec) if piece_pid(spec, piece) is None]
    if not missing:
        say(f"flink: reusing the running cluster in {spec.state_dir}")
    for piece in missing:  # one clear line for a port that something else holds
        ports = ([("localhost", spec.rest_port), ("localhost", spec.rpc_port)]
                 if piece == "jobmanager" else
                 [(spec.pool_host(int(piece.rsplit("-", 1)[1])), spec.pool_port)]
                 if piece.startswith("pool") else [])
        for host, port in ports:
            if not _port_free(host, port):
                raise FlinkSetupError(
                    f"port {port} on {host} is in use by another program (the Flink {piece} "
                    f"needs it): stop that program or pick another port (--rest_port, "
                    f"--rpc_port, --pool_port)")
    if "jobmanager" in missing:
        _start_daemons(spec, home, ["jobmanager"])
    _wait("the JobManager did not answer on http://" + spec.master,
          lambda: rest(spec, "/overview") is not None, 90, spec)
    for piece in missing:
        if piece.startswith("pool-"):
            _start_pool(spec, int(piece.rsplit("-", 1)[1]))
    _start_daemons(spec, home, [piece for piece in missing if piece.startswith("taskmanager-")])
    wanted = [f"taskmanager-{i}" for i in range(1, spec.taskmanagers + 1)]
    _wait(f"{spec.taskmanagers} TaskManagers did not register",
          lambda: all(tm in registered_taskmanagers(spec) for tm in wanted), 90, spec)
    _wait("the worker pools did not listen",
          lambda: all(not _port_free(spec.pool_host(i), spec.pool_port)
                      for i in range(1, spec.taskmanagers + 1)), 60, spec)
    return status(spec, say)


def stop(spec: ClusterSpec, say=print) -> None:
    """Stops every piece (TERM, then KILL after 20 s) and their SDK workers."""
    running = {piece: piece_pid(spec, piece) for piece in reversed(pieces(spec))}
    running = {piece: pid for piece, pid in running.items() if pid}
    for piece, pid in running.items():
        try:
            if piece.startswith("pool"):
                os.killpg(pid, signal.SIGTERM)  # the pool and the workers it started
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for piece, pid in running.items():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    say(f"flink: stopped {', '.join(running) or 'nothing (no cluster was running)'}")


def status(spec: ClusterSpec, say=print) -> dict:
    """What runs, with the flags a run on it needs."""
    overview = rest(spec, "/overview")
    state = {piece: piece_pid(spec, piece) for piece in pieces(spec)}
    try:
        jar: Optional[str] = str(distribution.job_server_jar(fetch=False))
        jar_problem = None
    except FlinkSetupError as err:
        jar, jar_problem = None, str(err)
    result = {"running": overview is not None and all(state.values()), "pids": state,
              "taskmanagers": registered_taskmanagers(spec) if overview else [],
              "slots": (overview or {}).get("slots-total", 0), "master": spec.master,
              "environment_config": spec.environment_config, "logs": str(spec.logs),
              "flink_version": (overview or {}).get("flink-version"),
              "job_server_jar": jar, "job_server_problem": jar_problem}
    if overview is None:
        say(f"flink: no JobManager answers on http://{spec.master}"
            + (f" (pieces still running: {', '.join(p for p, pid in state.items() if pid)})"
               if any(state.values()) else ""))
        return result
    say(f"flink: JobManager http://{spec.master} (Flink {result['flink_version']}), "
        f"{len(result['taskmanagers'])} TaskManagers, {result['slots']} slots; "
        f"worker pools {spec.environment_config} at "
        f"{', '.join(spec.pool_host(i) for i in range(1, spec.taskmanagers + 1))}")
    down = [piece for piece, pid in state.items() if not pid]
    if down:
        say(f"flink: not running: {', '.join(down)} (`gbif-embed flink start` starts them)")
    say(f"flink: logs in {spec.logs}")
    if jar:
        say(f"flink: job server jar {jar}")
    else:
        say(f"flink: no job server jar: {jar_problem}")
    say("flink: run with: gbif-embed run --runner FlinkRunner --flink_master "
        f"{spec.master} --flink_version {FLINK_MINOR} --flink_job_server_jar "
        f"{jar or 'JAR'} --environment_type EXTERNAL --environment_config "
        f"{spec.environment_config} --export ... --model ... --output ...")
    return result


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gbif-embed flink",
        description=f"A standalone Flink {FLINK_VERSION} cluster on loopback: a JobManager, "
        "TaskManagers and one Beam Python worker pool per TaskManager. The distribution "
        "(from PyPI) and Beam's Flink job server jar (from Maven Central) are cached in "
        f"{distribution.cache_root()}.")
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--state_dir", type=pathlib.Path, default=None,
                        help="Configuration, pid files and logs (default: "
                        f"{distribution.cache_root() / 'cluster'})")
    parser.add_argument("--rest_port", type=int, default=8081)
    parser.add_argument("--rpc_port", type=int, default=6123)
    parser.add_argument("--pool_port", type=int, default=50000)
    parser.add_argument("--taskmanagers", type=int, default=2)
    args = parser.parse_args(argv)
    spec = ClusterSpec(state_dir=args.state_dir or default_spec().state_dir,
                       rest_port=args.rest_port, rpc_port=args.rpc_port,
                       pool_port=args.pool_port, taskmanagers=args.taskmanagers)
    try:
        if args.action == "start":
            start(spec)
        elif args.action == "stop":
            stop(spec)
        else:
            return 0 if status(spec)["running"] else 1
    except FlinkSetupError as err:
        print(f"gbif-embed flink: error: {err}", file=sys.stderr)
        return 1
    return 0
