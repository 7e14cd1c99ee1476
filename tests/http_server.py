"""A fault-injecting HTTP server on loopback, for tests of anything that fetches.

Real image hosts time out, drop connections, answer 429 and serve HTML as
image/jpeg; tests need those faults on demand, offline and repeatably. Each
path gets a script of responses served in order (the last one repeats), and
every request is logged with its arrival time and headers, so tests can
assert what the client did (how often, how fast, with which validators).

Response dicts take: status, body, headers, delay (seconds before the
response), behaviour, stall (seconds, for behaviour "stall"). A header given
as None is left out; `"Content-Length": None` sends the body without a
length, ending it by closing the connection. Behaviours:
  "normal"  the response as given; answers 304 by itself when the request's
            If-None-Match matches the response's ETag, or If-Modified-Since
            equals its Last-Modified.
  "drop"    announces a Content-Length larger than the body, sends the body,
            then closes the connection (a connection dropped mid-body).
  "close"   closes the connection without answering.
  "stall"   sends the headers and half the body, waits `stall` seconds, then
            sends the rest.
  "drip"    sends the whole response, status line and headers included, one
            byte every `stall` seconds (a slowloris server: no single read
            times out, yet the response never ends).
"""
from __future__ import annotations

import http.server
import mimetypes
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Optional

BEHAVIOURS = ("normal", "drop", "close", "stall", "drip")


class _Headers(dict):
    """Request headers as sent, looked up without regard to case."""

    def _key(self, name: str) -> Optional[str]:
        lowered = name.lower()
        return next((k for k in self.keys() if k.lower() == lowered), None)

    def __getitem__(self, name: str) -> str:
        key = self._key(name)
        if key is None:
            raise KeyError(name)
        return dict.__getitem__(self, key)

    def get(self, name: str, default: Any = None) -> Any:
        key = self._key(name)
        return default if key is None else dict.__getitem__(self, key)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None


class _Route:
    """A path's scripted responses; the last one repeats."""

    def __init__(self, responses: list[dict]):
        self.responses = responses
        self.served = 0

    def next(self) -> dict:
        response = self.responses[min(self.served, len(self.responses) - 1)]
        self.served += 1
        return response


def _response(spec: dict, default_type: str) -> dict:
    behaviour = spec.get("behaviour", "normal")
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; use one of {BEHAVIOURS}")
    headers = dict(spec.get("headers") or {})
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = default_type
    return {
        "status": int(spec.get("status", 200)),
        "body": bytes(spec.get("body", b"")),
        "headers": headers,
        "delay": float(spec.get("delay", 0.0)),
        "behaviour": behaviour,
        "stall": float(spec.get("stall", 0.0)),
    }


def _content_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path.split("?", 1)[0])
    return guessed or "image/jpeg"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server_version = "FaultServer/1"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.fault._serve(self)

    do_HEAD = do_GET

    def log_message(self, format, *args):  # tests read hits(), not logs
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for stalled handlers
    request_queue_size = 256  # benchmarks open dozens of connections at once

    def handle_error(self, request, client_address):
        pass  # clients that time out and hang up are the point of the tests


class FaultServer:
    """Scripted HTTP server on 127.0.0.1; a context manager.

    `tls`: a server-side SSLContext to serve https instead (for tests of
    certificate and SNI handling).
    """

    def __init__(self, tls: Optional[ssl.SSLContext] = None):
        self._tls = tls
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._hits: dict[str, list[float]] = {}
        self._headers: dict[str, list[dict]] = {}
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle

    def start(self) -> "FaultServer":
        if self._server is None:
            self._server = _Server(("127.0.0.1", 0), _Handler)
            if self._tls is not None:
                # Handshakes happen in the handler threads, not in accept().
                self._server.socket = self._tls.wrap_socket(
                    self._server.socket, server_side=True, do_handshake_on_connect=False)
            self._server.fault = self
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name="FaultServer", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultServer is not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- routes

    def add(self, path: str, body: bytes = b"", status: int = 200,
            headers: Optional[dict] = None, *, delay: float = 0.0,
            script: Optional[list[dict]] = None) -> str:
        """Serve `path`; with `script`, those responses in order instead."""
        specs = script or [{"status": status, "body": body, "headers": headers,
                            "delay": delay}]
        route = _Route([_response(spec, _content_type(path)) for spec in specs])
        with self._lock:
            self._routes[path] = route
        return self.url(path)

    def add_file(self, path: str, file_path: str | Path) -> str:
        body = Path(file_path).read_bytes()
        return self.add(path, body, headers={"Content-Type": _content_type(str(file_path))})

    # -- what the client did

    def hits(self, path: str) -> int:
        with self._lock:
            return len(self._hits.get(path, []))

    def hit_times(self, path: str) -> list[float]:
        """time.monotonic() at each request's arrival."""
        with self._lock:
            return list(self._hits.get(path, []))

    def request_headers(self, path: str) -> list[dict]:
        with self._lock:
            return [_Headers(h) for h in self._headers.get(path, [])]

    # -- serving

    def _serve(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        path = handler.path
        with self._lock:
            key = path if path in self._routes else path.split("?", 1)[0]
            route = self._routes.get(key)
            self._hits.setdefault(key, []).append(arrived)
            self._headers.setdefault(key, []).append(dict(handler.headers.items()))
            response = route.next() if route else _response(
                {"status": 404, "body": b"not found"}, "text/plain")
        if response["delay"]:
            time.sleep(response["delay"])
        try:
            _write(handler, response)
        except OSError:
            handler.close_connection = True


def _not_modified(handler: _Handler, headers: dict) -> bool:
    etag = headers.get("ETag")
    if etag:
        match = handler.headers.get("If-None-Match", "")
        return match.strip() == "*" or etag in [m.strip() for m in match.split(",")]
    last_modified = headers.get("Last-Modified")
    return bool(last_modified) and handler.headers.get("If-Modified-Since") == last_modified


def _write(handler: _Handler, response: dict) -> None:
    behaviour, body, headers = response["behaviour"], response["body"], response["headers"]
    if behaviour == "close":
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
        return
    if behaviour == "drip":
        _drip(handler, response)
        return
    status = response["status"]
    if status == 200 and _not_modified(handler, headers):
        status, body = 304, b""
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    handler.send_response(status)
    length = len(body) * 2 + 100 if behaviour == "drop" else len(body)
    named = {k.lower() for k in headers}
    if "content-length" not in named and status != 304:
        handler.send_header("Content-Length", str(length))
    for name, value in headers.items():
        if value is not None:
            handler.send_header(name, str(value))
    # No length (a header given as None): the body ends when the connection does.
    until_close = "content-length" in named and headers.get(
        next(k for k in headers if k.lower() == "content-length")) is None
    if behaviour == "drop" or until_close:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    if handler.command == "HEAD":
        return
    if behaviour == "stall":
        half = len(body) // 2
        handler.wfile.write(body[:half])
        handler.wfile.flush()
        time.sleep(response["stall"])
        body = body[half:]
    handler.wfile.write(body)
    handler.wfile.flush()


def _drip(handler: _Handler, response: dict) -> None:
    handler.close_connection = True
    head = f"HTTP/1.1 {response['status']} OK\r\nContent-Length: {len(response['body'])}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in response["headers"].items() if v is not None)
    for byte in (head + "\r\n").encode("latin-1") + response["body"]:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(response["stall"])
