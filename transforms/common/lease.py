"""One run at a time per folder: a lock on the output (and on the image store)
that a crashed run cannot keep.

Two runs writing the same `--output` at once would both fetch the same
images (twice each host's limits) and race to publish. So a run takes
`FOLDER/LEASE` at launch, before anything is fetched, renews it while it
runs, and gives it back at the end. A second run finds it held and stops with
a message naming the first. The lease expires `TTL_S` seconds after its last
renewal, so a run that was killed (SIGKILL, a lost machine) blocks the folder
for at most that long; a holder on the same machine whose process is gone is
recognised at once, unless its job's workers keep the lease (below).

Every change of the lease (take, renew, give back) is a read, a judgement and
a write made inside a short critical section, so of two runs starting at the
same instant exactly one goes on:
- local paths: an exclusive `flock` on `FOLDER/.LEASE.guard` (held for
  milliseconds; the kernel drops it when the process dies);
- object stores (gs://): the GCS emulator the tests use ignores generation
  preconditions, so the section is a mutex made of claims, which needs only
  what every strongly consistent store gives (a write, then a listing that
  shows every write finished before it): each contender writes its own claim
  object `FOLDER/.LEASE.guard/<time>-<token>`, then lists the claims. Of two
  contenders at least one sees the other's claim (whoever listed last), and
  whoever sees another live claim withdraws and tries again after a random
  pause, so two can never be inside together. A claim older than
  `CLAIM_STALE_S` (a contender that died inside) is ignored and deleted. On
  real GCS the lease object is also written with `ifGenerationMatch` (the
  generation read inside the section, 0 when absent), so there the store
  itself refuses a write that another run's came between.

Renewal compares the lease's token with its own each time: a lease taken over
(it had expired) or one that cannot be renewed before it would expire is
*lost*, and the holder is told (`on_lost`): the launcher then stops the run
as Ctrl-C does, keeping its work.

On a distributed runner the job outlives its launcher (Ctrl-C that cannot
cancel it, SIGKILL, a lost laptop), so the lease must live as long as the
job, not as the launcher: the launcher hands each lease's `LeaseRef` (folder,
token, TTL) to the graph, and every worker process running the fetch, embed
or write stage or the publishing step renews it too (`keep_alive`, one daemon
thread per process, running while a DoFn of those stages is set up there). A worker renews only
a lease that still carries the job's token: one that is gone (given back at
the job's end, or removed by hand) or taken by another run is never
recreated; the process marks it lost and the fetch stage refuses new work
(`check` raises `LeaseLost`), so the job fails rather than fetch for a run
that no longer holds its folder, and the publishing step does the same
before it moves LATEST. Such a lease is judged by its expiry only,
never by its launcher's pid: it expires TTL after the job's last worker
stops renewing. This module is the one implementation; the launcher uses it
through `pipeline/lease.py` and `pipeline/store_guard.py`.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import json
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import fsspec

from transforms.common.files import join, write_atomically

LEASE = "LEASE"
GUARD = ".LEASE.guard"  # local: the file flock'ed; object stores: the folder of claims
TTL_S = float(os.environ.get("GBIF_EMBED_LEASE_SECONDS", "120"))
CLAIM_STALE_S = 30.0  # a claim this old belongs to a contender that died inside
GUARD_WAIT_S = 120.0  # how long a contender tries to enter the critical section

log = logging.getLogger(__name__)


class LeaseRef(NamedTuple):
    """What a job's workers need to renew one lease: it travels in the graph."""

    folder: str
    token: str
    what: str
    ttl_s: float


class LeaseHeld(ValueError):
    """Another run holds the folder."""


class LeaseLost(RuntimeError):
    """This run no longer holds its lease (taken over, or not renewable)."""


def _now() -> float:
    return time.time()


def _process_start(pid: int):
    """When a process started (clock ticks since boot), or None when there is no
    such process: with the pid it names one process, pid reuse aside."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")


def _renewer(role: str) -> dict:
    """Who renewed a lease: recorded in it as `renewed_by`."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "role": role}


def _filesystem(path: str):
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return fs, local


def _protocols(fs) -> tuple:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _is_local(fs) -> bool:
    return "file" in _protocols(fs)


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[None]:
    """The critical section in which a lease is read, judged and written."""
    fs, root = _filesystem(folder)
    if _is_local(fs):
        os.makedirs(root, exist_ok=True)
        descriptor = os.open(os.path.join(root, GUARD), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing drops the flock
        return
    with _claimed(fs, posixpath.join(root, GUARD)):
        yield


@contextlib.contextmanager
def _claimed(fs, claims: str) -> Iterator[None]:
    """A mutex from claim objects (see the module's docstring)."""
    deadline = time.monotonic() + GUARD_WAIT_S
    for attempt in range(1_000_000):
        mine = posixpath.join(claims, f"{time.time_ns():020d}-{uuid.uuid4().hex}")
        fs.pipe_file(mine, b"{}")
        try:
            others = [p for p in fs.ls(claims, detail=False, refresh=True)
                      if p.rstrip("/") != mine]
        except FileNotFoundError:
            others = []
        live = []
        for path in others:
            if _claim_age(path) > CLAIM_STALE_S:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
            else:
                live.append(path)
        if not live:
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(mine)
            return
        fs.rm_file(mine)  # withdraw, so that the other one can enter
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not enter {claims} for {GUARD_WAIT_S:.0f} s: "
                               f"{len(live)} other claims keep it busy")
        time.sleep(random.uniform(0.02, 0.2) * min(8, 1 + attempt))


def _claim_age(path: str) -> float:
    name = posixpath.basename(path.rstrip("/"))
    try:
        return _now() - int(name.split("-", 1)[0]) / 1e9
    except ValueError:
        return float("inf")  # not a claim of ours: ignored and removed


class Lease:
    """The lease of one folder (an output, or an image store) for one run.

    `workers`: the run's job runs on a distributed runner whose workers renew
    the lease too (`ref`, `keep_alive`); it is then judged by its expiry only."""

    def __init__(self, folder: str, snapshot: str, command: str = "", *,
                 what: str = "output", output: str = "", workers: bool = False):
        self.path = join(folder, LEASE)
        self.folder = folder
        self.what = what
        self.holder = {"snapshot": snapshot, "output": output or folder,
                       "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_started": _process_start(os.getpid()),
                       "token": uuid.uuid4().hex,
                       "started_at": _iso(_now()), "command": command[:500]}
        if workers:
            self.holder["workers"] = True
        self.lost: Optional[str] = None  # why the lease was lost, once it was
        self.on_lost: Optional[Callable[[str], None]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._renewed = time.monotonic()  # of the last renewal that succeeded
        self._error: Optional[BaseException] = None  # of the last renewal that failed

    # -- the lease file -------------------------------------------------------
    def read(self) -> Optional[dict]:
        held, _ = self._read()
        return held

    def _read(self) -> tuple[Optional[dict], int]:
        return _read(self.path)

    def _write(self, generation: int, ttl: Optional[float] = None) -> None:
        _write(self.path, dict(self.holder, renewed_by=_renewer("launcher")), generation,
               TTL_S if ttl is None else ttl)

    def ref(self) -> LeaseRef:
        """This lease, for the job's workers to renew (`keep_alive`)."""
        return LeaseRef(self.folder, self.holder["token"], self.what, TTL_S)

    # -- taking, renewing, giving back ------------------------------------------
    def acquire(self) -> None:
        with exclusive(self.folder):
            held, generation = self._read()
            if held and not self._ours(held) and not self._expired(held) \
                    and not self._holder_gone(held):
                raise LeaseHeld(self._message(held))
            try:
                self._write(generation)
            except FileExistsError:  # the generation changed under us (real GCS)
                raise LeaseHeld(self._message(self.read() or {})) from None
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.what}",
                                        daemon=True)
        self._thread.start()

    def renew_once(self) -> None:
        """One renewal: raises LeaseLost when another run holds the lease now."""
        with exclusive(self.folder):
            held, generation = self._read()
            if not held or held.get("token") != self.holder["token"]:
                who = self._message(held) if held else f"{self.path} is gone"
                raise LeaseLost(f"this run's lease on its {self.what} was taken over or "
                                f"removed ({who})")
            try:
                self._write(generation)
            except FileExistsError:
                raise LeaseLost(f"this run's lease {self.path} changed under it") from None

    def release(self) -> None:
        """Gives the lease back if this run still holds it; never raises (the
        lease expires by itself where the storage cannot be reached)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder.get("job"):
            return  # kept for a job that still runs (keep_until_job_ends)
        if self.lost:
            return  # another run's now, or it expires by itself: nothing to give back
        try:
            with exclusive(self.folder):
                held, _ = self._read()
                if held and held.get("token") == self.holder["token"]:
                    fs, path = _filesystem(self.path)
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(path)
        except Exception as err:
            log.warning("could not give back %s (%s); it expires by itself", self.path, err)

    def keep_until_job_ends(self, job: str) -> None:
        """Stops renewing and leaves the lease without expiry: a job this
        launcher can no longer follow still runs and holds the folder."""
        self._stop.set()
        self.holder["job"] = job
        with exclusive(self.folder):
            held, generation = self._read()
            if held and held.get("token") == self.holder["token"]:
                self._write(generation, ttl=0)

    def _renew(self) -> None:
        """Every TTL/4: one renewal, on a thread of its own so that a call stuck
        on an unreachable store cannot hide that the lease is running out."""
        period = TTL_S / 4
        attempt: Optional[threading.Thread] = None
        while not self._stop.wait(period):
            if self.lost:
                return
            if attempt is None or not attempt.is_alive():
                attempt = threading.Thread(target=self._attempt, daemon=True,
                                           name=f"lease-renewal-{self.what}")
                attempt.start()
                attempt.join(timeout=period * 0.8)
            if self.lost:
                return self._lose(self.lost)
            silent = time.monotonic() - self._renewed
            if silent > TTL_S - period:  # no later renewal could land in time
                error = (f"{type(self._error).__name__}: {self._error}" if self._error
                         else "the storage did not answer")
                return self._lose(
                    f"could not renew this run's lease {self.path} for {silent:.0f} s "
                    f"({error}); it expires in {max(0.0, TTL_S - silent):.0f} s, after "
                    f"which another run may take the {self.what}")

    def _attempt(self) -> None:
        try:
            self.renew_once()
            self._renewed = time.monotonic()
        except LeaseLost as lost:
            self.lost = str(lost)
        except BaseException as err:  # every storage error: retried until the lease runs out
            self._error = err

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error("lease lost: %s", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    # -- judging a holder -------------------------------------------------------
    def _ours(self, held: dict) -> bool:
        return held.get("token") == self.holder["token"]

    @staticmethod
    def _holder_gone(held: dict) -> bool:
        """A holder on this machine whose process no longer runs (killed, or
        ended without giving the lease back): its lease need not expire first.
        Not so for a lease its job's workers renew: the job outlives its
        launcher, so that lease is judged by its expiry only."""
        if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
            return False
        if held.get("job") or _kept_by_workers(held):  # its job outlives the launcher
            return False
        return _process_start(held["pid"]) != held.get("pid_started")

    @staticmethod
    def _expired(held: dict) -> bool:
        renewed = held.get("renewed_at_s")
        ttl = held.get("ttl_s", TTL_S)
        if ttl == 0 and held.get("job"):
            return False  # kept until its job ends: removed by hand
        return not isinstance(renewed, (int, float)) or _now() > renewed + (ttl or TTL_S)

    def _message(self, held: dict) -> str:
        renewed = held.get("renewed_at_s")
        ago = f"{_now() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else "?"
        job = (f", kept for its job {held['job']} until that job ends"
               if held.get("job") else "")
        if _kept_by_workers(held):
            job += (f", kept alive by its job's workers (last renewed by "
                    f"{_who(held.get('renewed_by'))}; it expires "
                    f"{held.get('ttl_s') or TTL_S:.0f} s after the job's last worker stops, "
                    f"even if its launcher is gone)")
        if self.what == "output":
            head = f"another run is writing to {self.folder}"
            why = "Two runs on one output would fetch every image twice"
        else:
            head = (f"another run (output {held.get('output', '?')}) is using the "
                    f"{self.what} {self.folder}")
            why = ("Two runs sharing one image store would fetch the same URLs at the same "
                   "time")
        return (f"{head}: {held.get('snapshot', '?')}, "
                f"started {held.get('started_at', '?')} on {held.get('host', '?')} "
                f"(pid {held.get('pid', '?')}), lease renewed {ago}, expires "
                f"{held.get('expires_at', '?')}{job}. {why}; wait for it to finish (a run "
                f"that died gives the folder back when its lease expires, or delete "
                f"{self.path} if you are sure it is gone)")


def _kept_by_workers(held: dict) -> bool:
    """Whether a lease is renewed by its job's workers (a distributed run)."""
    renewed_by = held.get("renewed_by")
    return bool(held.get("workers")) or (
        isinstance(renewed_by, dict) and renewed_by.get("role") == "worker")


def _who(renewed_by) -> str:
    if not isinstance(renewed_by, dict):
        return "?"
    return (f"its {renewed_by.get('role', '?')} on {renewed_by.get('host', '?')} "
            f"(pid {renewed_by.get('pid', '?')})")


def _read(lease_path: str) -> tuple[Optional[dict], int]:
    """A lease's content and its generation (object stores; 0 when absent)."""
    fs, path = _filesystem(lease_path)
    fs.invalidate_cache()
    try:
        # The generation first: content newer than it makes the conditional
        # write fail (a refusal), never succeed over a lease not judged.
        generation = 0 if _is_local(fs) else int(fs.info(path).get("generation") or 0)
        with fs.open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        return None, 0
    try:
        return json.loads(text), generation
    except ValueError:
        return {}, generation  # not ours to judge: treated as expired


def _write(lease_path: str, holder: dict, generation: int, ttl: float) -> None:
    """The holder's lease, renewed now for `ttl` seconds (0: until its job ends)."""
    now = _now()
    text = json.dumps(dict(holder, renewed_at=_iso(now), renewed_at_s=now,
                           expires_at=_iso(now + ttl) if ttl else "when its job ends",
                           ttl_s=ttl), indent=2)
    fs, path = _filesystem(lease_path)
    if "gs" not in _protocols(fs):
        write_atomically(lease_path, text)
        return
    _write_if_generation(fs, path, text.encode(), generation)


def _write_if_generation(fs, path: str, data: bytes, generation: int) -> None:
    """One JSON-API upload with `ifGenerationMatch` (0: only if absent): real GCS
    refuses it with 412 (FileExistsError) when the object changed since it was read."""
    bucket, key, _ = fs.split_path(path)
    body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n' +
            json.dumps({"name": key}).encode() +
            b'\n--==0==\nContent-Type: application/octet-stream\n\n' + data + b"\n--==0==--")
    fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="multipart",
            ifGenerationMatch=str(generation), data=body,
            headers={"Content-Type": 'multipart/related; boundary="==0=="'}, json_out=True)
    fs.invalidate_cache(path)


@contextlib.contextmanager
def held(folder: str, snapshot: str, command: str = "", *, what: str = "output",
         output: str = "", workers: bool = False) -> Iterator[Lease]:
    lease = Lease(folder, snapshot, command, what=what, output=output, workers=workers)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


# -- the job's workers keep its leases alive (distributed runners) --------------

def renew_for_job(ref: LeaseRef) -> bool:
    """One worker's renewal of a job's lease: raises LeaseLost when the lease
    is gone or carries another token (it is never recreated), returns whether
    it wrote. A lease renewed less than TTL/8 ago (by the launcher or another
    worker) is left as it is, so that many workers do not crowd the section.
    Every other field of the holder is kept (its `job`, when the launcher left
    it for the job: with workers renewing, it now expires TTL after the last)."""
    path = join(ref.folder, LEASE)
    held, _ = _read(path)
    _check_token(ref, held)
    renewed = held.get("renewed_at_s")
    if held.get("ttl_s") and isinstance(renewed, (int, float)) and \
            _now() - renewed < ref.ttl_s / 8:
        return False
    with exclusive(ref.folder):
        held, generation = _read(path)
        _check_token(ref, held)
        try:
            _write(path, dict(held, renewed_by=_renewer("worker")), generation, ref.ttl_s)
        except FileExistsError:  # another write came between (real GCS): judged next time
            return False
    return True


def _check_token(ref: LeaseRef, held: Optional[dict]) -> None:
    if not held:
        raise LeaseLost(f"the lease {join(ref.folder, LEASE)} of this job's {ref.what} "
                        f"{ref.folder} is gone (the run gave it back or it was removed)")
    if held.get("token") != ref.token:
        raise LeaseLost(f"another run took the {ref.what} {ref.folder} "
                        f"({held.get('snapshot', '?')}, started {held.get('started_at', '?')} "
                        f"on {held.get('host', '?')}); this job stops")


class WorkerRenewer:
    """One worker process's renewals of its job's leases: a daemon thread that
    runs while at least one user (a DoFn set up in this process) holds on.

    `keep_alive` (from a DoFn's `setup`) adds a user of its leases and starts
    the thread if none runs; `let_go` (from `teardown`) removes it. A lease is
    renewed while it has users (so a process that outlives its job, as a
    worker pool's may, never renews a finished job's lease for the next
    job), and the thread ends once no lease has any. A lease found lost stays
    lost in this process: `check` raises `LeaseLost` for it from then on.
    Storage errors are logged and retried at the next period; they never end
    the thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users: collections.Counter = collections.Counter()  # by token
        self._refs: dict[str, LeaseRef] = {}  # by token
        self.lost: dict[str, str] = {}  # token → why
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self.renewals = 0  # writes made (for tests and logs)
        self.errors = 0

    def keep_alive(self, refs: Iterable[LeaseRef]) -> None:
        refs = [LeaseRef(*ref) for ref in refs]
        if not refs:
            return
        with self._lock:
            new = [ref for ref in refs if ref.token not in self._refs]
            for ref in refs:
                self._refs[ref.token] = ref
                self._users[ref.token] += 1
        for ref in new:  # a process started after the lease was lost learns it at once
            try:
                _check_token(ref, _read(join(ref.folder, LEASE))[0])
            except LeaseLost as lost:
                self._lose(ref, str(lost))
            except Exception as err:
                log.warning("could not read the lease of %s (%s); retried", ref.folder, err)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._wake.clear()
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="lease-worker-renewal")
                self._thread.start()

    def let_go(self, refs: Iterable[LeaseRef]) -> None:
        with self._lock:
            for ref in refs:
                token = LeaseRef(*ref).token
                if self._users[token] > 0:
                    self._users[token] -= 1
            if not self._live():
                self._wake.set()

    def check(self, refs: Iterable[LeaseRef]) -> None:
        """Raises LeaseLost when one of these leases is no longer the job's."""
        for ref in refs:
            why = self.lost.get(LeaseRef(*ref).token)
            if why is not None:
                raise LeaseLost(why)

    def _live(self) -> list[LeaseRef]:
        """The leases to renew now: those with users, not lost; called with the lock held."""
        return [ref for token, ref in self._refs.items()
                if self._users[token] > 0 and token not in self.lost]

    def _run(self) -> None:
        while True:
            with self._lock:  # deciding to end and ending are one step for keep_alive
                live = self._live()
                if not live:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
            period = min(ref.ttl_s for ref in live) / 4
            # A little jitter, so that the workers of a job do not renew in step.
            if self._wake.wait(period * random.uniform(0.8, 1.0)):
                self._wake.clear()
                continue  # woken: the last user may have left
            with self._lock:
                live = self._live()
            for ref in live:
                try:
                    if renew_for_job(ref):
                        self.renewals += 1
                except LeaseLost as lost:
                    self._lose(ref, str(lost))
                except Exception as err:  # every storage error: tried again next period
                    self.errors += 1
                    log.warning("could not renew the lease of %s %s (%s: %s); retried",
                                ref.what, ref.folder, type(err).__name__, err)

    def _lose(self, ref: LeaseRef, why: str) -> None:
        self.lost.setdefault(ref.token, why)
        # Gone is also how every job ends (its launcher gives the lease back
        # while idle workers may still be set up): worth an error only when
        # another run took it.
        log.log(logging.ERROR if "another run took" in why else logging.INFO,
                "lease no longer renewed by this worker: %s", why)

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()


_PROCESS = WorkerRenewer()  # the one renewer of this worker process


def keep_alive(refs: Iterable[LeaseRef]) -> None:
    """From a stage's `setup`: this process renews the job's leases while set up."""
    _PROCESS.keep_alive(refs)


def let_go(refs: Iterable[LeaseRef]) -> None:
    """From the same stage's `teardown`."""
    _PROCESS.let_go(refs)


def check(refs: Iterable[LeaseRef]) -> None:
    """Raises LeaseLost when this job no longer holds one of its leases."""
    _PROCESS.check(refs)
