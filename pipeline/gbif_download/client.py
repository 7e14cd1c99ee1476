"""A small, polite client of GBIF's occurrence download API, on urllib3.

urllib3 is what the fetch stage already speaks (transforms/fetch/http_client.py);
pygbif 0.7 was not used: its download request goes to a fixed
`http://api.gbif.org/v1/...` URL (no other endpoint, so no mirror and no
loopback tests), it neither honours `Retry-After` nor waits for a download,
and it fetches the zip without resuming. Here every call goes to the
`--gbif_api` the user chose; answers that mean "not now" (HTTP 420 Enhance
Your Calm, 429, 5xx, a connection refused or reset, a time-out) are retried
after `Retry-After` when the server sent one, else after an exponential
backoff, until the API has stayed unusable for `give_up_s` seconds.

Credentials reach this module as an `Account` built from the environment and
only ever leave it as an `Authorization` header; no message built here
contains them (`_scrub` removes them from any server text shown).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import urllib3
from urllib3 import exceptions as u3e

from pipeline.gbif_download.errors import GBIF, GbifError
from transforms.fetch.config import DEFAULT_USER_AGENT
from transforms.fetch.http_client import _ca_bundle
from transforms.fetch.outcome import backoff_delay, parse_retry_after, short

DEFAULT_API = "https://api.gbif.org/v1"
# Statuses that mean "ask again later" rather than "this request is wrong".
RETRY_STATUSES = frozenset({420, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 3600.0


@dataclasses.dataclass(frozen=True)
class Account:
    """A GBIF account (GBIF_USER, GBIF_PWD, GBIF_EMAIL); its repr hides all of it."""

    user: str = dataclasses.field(repr=False)
    password: str = dataclasses.field(repr=False)
    email: str = dataclasses.field(repr=False)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.user, self.password, self.email) if s)


class Unusable(Exception):
    """The API did not answer usefully this time (retried by `Api.call`)."""

    def __init__(self, what: str, retry_after: Optional[float] = None,
                 progressed: bool = False):
        super().__init__(what)
        self.retry_after = retry_after
        self.progressed = progressed  # some work got done: the patience starts again


@dataclasses.dataclass
class Answer:
    status: int
    body: bytes
    headers: Any

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise GbifError(f"GBIF's API answered HTTP {self.status} with something that is not "
                            f"JSON ({err}); expected a download's status object") from None


class Api:
    """Calls to one GBIF API root (`--gbif_api`), retried politely."""

    def __init__(self, root: str = DEFAULT_API, *, give_up_s: float = 900.0,
                 base_delay_s: float = 5.0, connect_timeout: float = 30.0,
                 read_timeout: float = 120.0,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        if not root.startswith(("http://", "https://")):
            raise GbifError(f"--gbif_api: expected an http(s) URL such as {DEFAULT_API}; "
                            f"found {root!r}", 2)
        self.root = root.rstrip("/")
        self.give_up_s = give_up_s
        self.base_delay_s = base_delay_s
        self.sleep = sleep
        self.clock = clock
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.http = urllib3.PoolManager(
            headers={"User-Agent": DEFAULT_USER_AGENT}, ca_certs=_ca_bundle(),
            # Redirects are followed (the zip link redirects to GBIF's file server);
            # nothing else is retried here: `call` decides, honouring Retry-After.
            retries=urllib3.Retry(total=10, connect=0, read=0, other=0, status=0,
                                  redirect=5, raise_on_redirect=True, raise_on_status=False))
        self._secrets: tuple[str, ...] = ()
        self.say: Callable[[str], None] = lambda line: None  # one line per retry

    def url(self, path: str) -> str:
        return f"{self.root}/{path.lstrip('/')}"

    # -- one request, retried

    def call(self, what: str, send: Callable[[], Answer]) -> Answer:
        """`send()` until it gives an answer that is not a "later", or give up.

        `what` names the call in the one line shown when the API stays
        unusable for `give_up_s` seconds."""
        started = self.clock()
        failures = 0
        while True:
            try:
                return send()
            except Unusable as unusable:
                if unusable.progressed:
                    started, failures = self.clock(), 0
                failures += 1
                delay = unusable.retry_after
                if delay is None:
                    delay = backoff_delay(failures, self.base_delay_s, self.give_up_s / 4 or 1)
                delay = min(delay, MAX_RETRY_AFTER_S)
                spent = self.clock() - started
                if spent >= self.give_up_s:
                    raise GbifError(
                        f"GBIF's API at {self.root} stayed unusable for {spent:.0f} s while "
                        f"{what} ({failures} tries; last: {unusable}); check the network or "
                        f"https://status.gbif.org and run the command again", GBIF) from None
                self.say(f"gbif: {what}: {unusable}; trying again in {delay:.3g} s")
                self.sleep(delay)

    def request(self, method: str, url: str, *, body: Optional[bytes] = None,
                headers: Optional[dict] = None, stream: bool = False,
                once: bool = False) -> Any:
        """One HTTP exchange; "later" answers raise `Unusable`, others return.

        `once`: a request that must not be sent twice (a download request: GBIF
        might have made the download before an error) is retried only when it
        surely was not received: a connection that never opened, or an answer
        that says "not now" (420, 429, 503)."""
        try:
            response = self.http.request(method, url, body=body, headers=headers or {},
                                         timeout=self.timeout, preload_content=not stream)
        except u3e.MaxRetryError as err:
            if isinstance(err.reason, u3e.ResponseError):  # too many redirects
                raise GbifError(f"{url}: too many redirects ({self._scrub(short(err))})") from None
            self._unusable(err.reason or err, once)
        except (u3e.HTTPError, OSError) as err:
            self._unusable(err, once)
        if once and response.status in (500, 502, 504):
            raise GbifError(f"GBIF answered HTTP {response.status} to the download request; "
                            "it may have been made all the same: see "
                            "https://www.gbif.org/user/download, then resume with "
                            "--gbif_download KEY or run the same command again")
        if response.status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if stream:
                response.drain_conn()
                response.release_conn()
            raise Unusable(f"HTTP {response.status}" + (
                f" (Retry-After {retry_after:.0f} s)" if retry_after is not None else ""),
                retry_after)
        return response

    def _unusable(self, err: BaseException, once: bool) -> None:
        if once and not isinstance(err, (u3e.NewConnectionError, u3e.ConnectTimeoutError,
                                         ConnectionRefusedError)):
            raise GbifError(f"the download request to GBIF got no answer "
                            f"({self._scrub(short(err))}); it may have been made all the "
                            "same: see https://www.gbif.org/user/download, then resume with "
                            "--gbif_download KEY or run the same command again") from None
        raise Unusable(self._scrub(short(err))) from None

    def get_json(self, path: str, what: str, missing: str) -> Any:
        """GET a JSON document; `missing`: what a 404 means, for its one line."""
        url = self.url(path)

        def send() -> Answer:
            response = self.request("GET", url, headers={"Accept": "application/json"})
            return Answer(response.status, response.data, response.headers)

        answer = self.call(what, send)
        if answer.status == 404:
            raise GbifError(f"GBIF's API has no {missing} (HTTP 404 for {url})", 2)
        if answer.status != 200:
            raise GbifError(f"GBIF's API answered HTTP {answer.status} while {what} at {url}: "
                            f"{self.snippet(answer.body)}")
        return answer.json()

    def post_json(self, path: str, payload: dict, account: Account, what: str) -> Answer:
        url = self.url(path)
        self._secrets = account.secrets()
        headers = urllib3.util.make_headers(basic_auth=f"{account.user}:{account.password}")
        headers.update({"Content-Type": "application/json", "Accept": "text/plain"})
        body = json.dumps(payload).encode("utf-8")

        def send() -> Answer:
            response = self.request("POST", url, body=body, headers=headers, once=True)
            return Answer(response.status, response.data, response.headers)

        return self.call(what, send)

    # -- messages never carry the account

    def snippet(self, body: bytes, limit: int = 200) -> str:
        text = body.decode("utf-8", "replace").strip().replace("\n", " ")
        return self._scrub(text[:limit] + ("…" if len(text) > limit else "")) or "(empty body)"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
