"""GBIF's occurrence download API on loopback, for tests of `run --gbif_*`.

It speaks the endpoints gbif-embed uses, as GBIF documents them
(https://techdocs.gbif.org/en/data-use/api-downloads):

  POST /v1/occurrence/download/request          basic auth, JSON body -> 201, the key as text/plain
  GET  /v1/occurrence/download/{key}             the download object: key, doi, license, request
                                                 {predicate, format, creator, ...}, created, modified,
                                                 eraseAfter, status, downloadLink, size,
                                                 totalRecords, numberDatasets
  GET  /v1/occurrence/download/request/{key}.zip 302 to the file server, as GBIF's does
  GET  /files/{key}.zip                          the zip, with HTTP Range (206 + Content-Range)

with GBIF's status values (PREPARING, RUNNING, SUCCEEDED, FAILED, KILLED,
CANCELLED, SUSPENDED, FILE_ERASED) and the faults the client must survive or
report: scripted HTTP answers (401, 420/429 with Retry-After, 500) on the
request and status endpoints, a zip cut short after N bytes, a server that
ignores Range, and a `size` that does not match the file. Every request is
logged with its arrival time, method, path, headers and body.
"""
from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import re
import threading
import time
from typing import Any, Optional

V1 = "/v1"


@dataclasses.dataclass
class Download:
    """One download as the server holds it."""
    key: str
    zip_bytes: bytes
    doi: str = "10.15468/dl.loop01"
    statuses: list = dataclasses.field(default_factory=lambda: ["SUCCEEDED"])  # one per status GET; the last repeats
    predicate: Any = None
    total_records: int = 40
    number_datasets: int = 1
    size: Optional[int] = None            # what the API reports (default: the zip's length)
    cuts: list = dataclasses.field(default_factory=list)  # zip GETs: bytes sent before closing, in order
    ignore_range: bool = False
    created: str = "2026-11-30T08:00:01.123+00:00"
    modified: str = "2026-11-30T08:06:40.456+00:00"
    creator: str = "someone"
    email: str = "someone@example.org"
    polls: int = 0

    def status(self) -> str:
        state = self.statuses[min(self.polls, len(self.statuses) - 1)]
        self.polls += 1
        return state


class GbifApi:
    """The loopback server; a context manager. `user`/`password`/`email`: the one
    account it accepts. `answers`: {"request"|"status": [dicts]} served before
    the real answer, one per request, e.g. {"status": 429, "Retry-After": "1"}."""

    def __init__(self, user: str = "tester", password: str = "pw", email: str = "t@example.org"):
        self.user, self.password, self.email = user, password, email
        self.downloads: dict[str, Download] = {}
        self.answers: dict[str, list[dict]] = {"request": [], "status": []}
        self.next_download: Optional[Download] = None  # what a POST creates
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None

    # -- lifecycle
    def __enter__(self) -> "GbifApi":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.api = self
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{V1}"

    def add(self, download: Download) -> Download:
        with self._lock:
            self.downloads[download.key] = download
        return download

    def requests(self, method: Optional[str] = None, path_start: str = "") -> list[dict]:
        with self._lock:
            return [r for r in self.log if (method is None or r["method"] == method)
                    and r["path"].startswith(path_start)]

    # -- answers
    def status_object(self, download: Download) -> dict:
        size = len(download.zip_bytes) if download.size is None else download.size
        return {
            "key": download.key, "doi": download.doi,
            "license": "http://creativecommons.org/licenses/by-nc/4.0/legalcode",
            # GBIF's request object; creator and addresses echoed, so that tests can
            # check the client never copies them anywhere.
            "request": {"predicate": download.predicate, "sendNotification": False,
                        "format": "DWCA", "type": "OCCURRENCE", "creator": download.creator,
                        "notificationAddresses": [download.email]},
            "created": download.created, "modified": download.modified,
            "eraseAfter": "2027-05-30T08:00:01.123+00:00", "status": download.status(),
            "downloadLink": f"{self.root}/occurrence/download/request/{download.key}.zip",
            "size": size, "totalRecords": download.total_records,
            "numberDatasets": download.number_datasets,
        }

    def scripted(self, endpoint: str) -> Optional[dict]:
        with self._lock:
            queue = self.answers[endpoint]
            return queue.pop(0) if queue else None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass  # clients that hang up are part of the tests


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    @property
    def api(self) -> GbifApi:
        return self.server.api

    def _record(self, body: bytes = b"") -> None:
        with self.api._lock:
            self.api.log.append({"time": time.monotonic(), "method": self.command,
                                 "path": self.path, "headers": self.headers,  # any case
                                 "body": body})

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _scripted(self, endpoint: str) -> bool:
        answer = self.api.scripted(endpoint)
        if answer is None:
            return False
        answer = dict(answer)
        status = answer.pop("status")
        self._send(status, json.dumps({"error": f"scripted {status}"}).encode(), headers=answer)
        return True

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        if self.path != f"{V1}/occurrence/download/request":
            return self._send(404, b'{"error": "not found"}')
        if self._scripted("request"):
            return
        expected = "Basic " + base64.b64encode(
            f"{self.api.user}:{self.api.password}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self._send(401, b"", headers={"WWW-Authenticate": 'Basic realm="GBIF"'})
        try:
            request = json.loads(body)
        except ValueError:
            return self._send(400, b"Invalid JSON", "text/plain")
        if request.get("creator") != self.api.user or request.get("format") != "DWCA" \
                or request.get("notificationAddresses") != [self.api.email] \
                or not isinstance(request.get("predicate"), dict):
            return self._send(400, b"Bad download request", "text/plain")
        download = self.api.next_download
        if download is None:
            return self._send(500, b"no download prepared by the test", "text/plain")
        download.predicate = request["predicate"]
        download.creator, download.email = request["creator"], request["notificationAddresses"][0]
        self.api.add(download)
        self._send(201, download.key.encode(), "text/plain")

    def do_GET(self):  # noqa: N802
        self._record()
        path = self.path.split("?", 1)[0]
        match = re.fullmatch(rf"{V1}/occurrence/download/request/([\w-]+)\.zip", path)
        if match:
            return self._send(302, b"", headers={"Location": f"/files/{match.group(1)}.zip"})
        match = re.fullmatch(r"/files/([\w-]+)\.zip", path)
        if match:
            return self._zip(match.group(1))
        match = re.fullmatch(rf"{V1}/occurrence/download/([\w-]+)", path)
        if match:
            if self._scripted("status"):
                return
            download = self.api.downloads.get(match.group(1))
            if download is None:
                return self._send(404, b"")
            return self._send(200, json.dumps(self.api.status_object(download)).encode())
        self._send(404, b"")

    def _zip(self, key: str) -> None:
        download = self.api.downloads.get(key)
        if download is None:
            return self._send(404, b"")
        data = download.zip_bytes
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not download.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                return self._send(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
        cut = download.cuts.pop(0) if download.cuts else None
        body = data[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if cut is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
