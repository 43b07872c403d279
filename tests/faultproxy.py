"""A fault-injecting HTTP reverse proxy for S3 tests, in front of moto's server.

Use from a test module with::

    from tests.faultproxy import fault_proxy  # noqa: F401
    from tests.s3server import s3_bucket, s3_endpoint  # noqa: F401

``fault_proxy`` (per test) yields a started :class:`FaultProxy` forwarding to the session's
moto server, with no faults; the test sets ``fail_every``, ``delay_s`` or ``deny`` and points
its S3 client at ``fault_proxy.url`` (``endpoint_url``). Buckets made with ``s3_bucket`` on the
server are visible through the proxy.

Faults are deterministic and transient: the N-th, 2N-th, ... request (``fail_every=N``) gets
the next fault of ``fault_kinds`` (by default ``503`` SlowDown, ``500`` InternalError, and a
connection reset with no response, in turn), and a request whose previous attempt was faulted
is never faulted itself (the fault moves on to the next request), so a client that retries
always gets through. Paths containing a ``deny`` substring get a permanent ``403
AccessDenied``. Request bodies are forwarded byte for byte, with their framing: a
``Transfer-Encoding: chunked`` body (aws-chunked uploads with trailing checksums included)
reaches the server exactly as the client sent it, trailers and all. The ``Host`` header is
forwarded unchanged (SigV4 signs the host the client connected to: the proxy's).
"""

from __future__ import annotations

import http.client
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

FAULT_KINDS = ("503", "500", "reset")
# Error bodies as S3 sends them (botocore reads the code; s3fs also matches the message).
ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "deny": (403, "AccessDenied", "Access Denied"),
    "bad_gateway": (502, "InternalError", "The fault proxy could not reach the server."),
}
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business on each side. Request
# bodies keep their Transfer-Encoding (and Trailer): the framing is forwarded unchanged.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
              "proxy-authorization", "te", "upgrade"}
# "Expect: 100-continue" is answered by the proxy itself (BaseHTTPRequestHandler does it).
REQUEST_DROPPED = HOP_BY_HOP | {"expect"}
# Responses are re-framed with a Content-Length.
RESPONSE_DROPPED = HOP_BY_HOP | {"transfer-encoding", "trailer"}
RECENT_FAULTS_KEPT = 1024
COPY_BLOCK = 1 << 16


def error_body(code: str, message: str, request_id: str = "faultproxy") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{request_id}</RequestId></Error>"
            ).encode()


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy on 127.0.0.1 that injects S3 faults on demand.

    ``fail_every=N`` faults every N-th request (0: none), cycling through ``fault_kinds``;
    ``delay_s`` sleeps before forwarding each request; ``deny`` is a set of substrings: a
    request whose (URL-decoded) path contains one is answered ``403 AccessDenied`` and not
    forwarded. All three can be changed while the proxy runs (thread-safe; a new
    ``fail_every`` counts its N requests from then on). Counters:
    ``requests`` (all received), ``forwarded``, ``faults`` (per kind), ``denied``,
    ``chunked`` (forwarded requests with a chunked body), ``bad_gateway`` (502s sent when the
    server could not be reached); ``history`` lists ``(method, path, outcome)`` per request,
    outcome ``"ok"`` (forwarded), a fault kind or ``"deny"``. With ``record_headers``,
    ``forwarded_headers`` lists ``(method, path, [(name, value), ...])`` as sent upstream.
    """

    def __init__(self, upstream: str, fail_every: int = 0, delay_s: float = 0.0,
                 deny: Iterable[str] = (), fault_kinds: Iterable[str] = FAULT_KINDS,
                 upstream_timeout: float = 60.0, record_headers: bool = False) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._upstream_https = parts.scheme == "https"
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or (443 if self._upstream_https else 80)
        self.upstream_timeout = upstream_timeout
        self.record_headers = record_headers
        self._lock = threading.Lock()
        self._eligible, self._pending = 0, False
        self._fail_every = 0
        self._delay_s = 0.0
        self._deny: frozenset[str] = frozenset()
        self._kinds: tuple[str, ...] = ()
        self.configure(fail_every=fail_every, delay_s=delay_s, deny=deny,
                       fault_kinds=fault_kinds)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset_counters()

    # -- configuration (thread-safe, also while running) ------------------------------------

    def configure(self, *, fail_every: int | None = None, delay_s: float | None = None,
                  deny: Iterable[str] | None = None,
                  fault_kinds: Iterable[str] | None = None) -> None:
        """Change any of the settings at once; the others stay as they are."""
        with self._lock:
            if fail_every is not None:
                if fail_every < 0:
                    raise ValueError("fail_every must be >= 0")
                self._fail_every = int(fail_every)
                self._eligible, self._pending = 0, False  # count the N-th from now on
            if delay_s is not None:
                if delay_s < 0:
                    raise ValueError("delay_s must be >= 0")
                self._delay_s = float(delay_s)
            if deny is not None:
                self._deny = frozenset([deny] if isinstance(deny, str) else deny)
            if fault_kinds is not None:
                kinds = tuple(fault_kinds)
                unknown = [k for k in kinds if k not in FAULT_KINDS]
                if not kinds or unknown:
                    raise ValueError(f"fault_kinds must be taken from {FAULT_KINDS}")
                self._kinds = kinds

    @property
    def fail_every(self) -> int:
        return self._fail_every

    @fail_every.setter
    def fail_every(self, value: int) -> None:
        self.configure(fail_every=value)

    @property
    def delay_s(self) -> float:
        return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self.configure(delay_s=value)

    @property
    def deny(self) -> frozenset[str]:
        return self._deny

    @deny.setter
    def deny(self, value: Iterable[str]) -> None:
        self.configure(deny=value)

    @property
    def fault_kinds(self) -> tuple[str, ...]:
        return self._kinds

    # -- counters ----------------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the counters and the history, and restart the fault cycle."""
        with self._lock:
            self._requests = self._forwarded = self._denied = self._chunked = 0
            self._bad_gateway = 0  # requests the server could not be reached for (502)
            self._faults = dict.fromkeys(FAULT_KINDS, 0)
            self._eligible = 0  # requests that count towards fail_every (not denied ones)
            self._pending = False  # a fault is due but was not injected yet
            self._next_kind = 0
            self._recent_faults: dict[tuple[str, str], None] = {}
            self._history: list[tuple[str, str, str]] = []
            self._forwarded_headers: list[tuple[str, str, list[tuple[str, str]]]] = []

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def forwarded(self) -> int:
        return self._forwarded

    @property
    def denied(self) -> int:
        return self._denied

    @property
    def chunked(self) -> int:
        return self._chunked

    @property
    def bad_gateway(self) -> int:
        return self._bad_gateway

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def history(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self._history)

    @property
    def forwarded_headers(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        with self._lock:
            return list(self._forwarded_headers)

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of every counter."""
        with self._lock:
            return {"requests": self._requests, "forwarded": self._forwarded,
                    "faults": dict(self._faults), "denied": self._denied,
                    "chunked": self._chunked, "bad_gateway": self._bad_gateway}

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return (f"FaultProxy({where} -> {self.upstream}, fail_every={self._fail_every}, "
                f"delay_s={self._delay_s}, deny={sorted(self._deny)}, {self.stats()})")

    # -- used by the handler -----------------------------------------------------------------

    def _decide(self, method: str, path: str) -> tuple[str, float]:
        """``(outcome, delay)`` for a request: ``"ok"``, a fault kind, or ``"deny"``."""
        raw_path = path.split("?", 1)[0]
        plain_path = unquote(raw_path)
        key = (method, path)
        with self._lock:
            self._requests += 1
            if any(part in plain_path or part in raw_path for part in self._deny):
                self._denied += 1
                outcome = "deny"
            else:
                outcome = "ok"
                if self._fail_every:
                    self._eligible += 1
                    if self._eligible % self._fail_every == 0:
                        self._pending = True
                if key in self._recent_faults:
                    # The retry of a faulted request: let it through (a due fault waits).
                    del self._recent_faults[key]
                elif self._pending and self._fail_every:
                    self._pending = False
                    outcome = self._kinds[self._next_kind % len(self._kinds)]
                    self._next_kind += 1
                    self._faults[outcome] += 1
                    self._recent_faults[key] = None
                    while len(self._recent_faults) > RECENT_FAULTS_KEPT:
                        del self._recent_faults[next(iter(self._recent_faults))]
            self._history.append((method, path, outcome))
            return outcome, self._delay_s

    def _count(self, forwarded: bool = False, chunked: bool = False,
               bad_gateway: bool = False) -> None:
        with self._lock:
            self._forwarded += forwarded
            self._chunked += chunked
            self._bad_gateway += bad_gateway

    def _record(self, method: str, path: str, headers: list[tuple[str, str]]) -> None:
        if self.record_headers:
            with self._lock:
                self._forwarded_headers.append((method, path, headers))

    def _connect_upstream(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._upstream_https else http.client.HTTPConnection
        return cls(self._upstream_host, self._upstream_port, timeout=self.upstream_timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._connections: set[socket.socket] = set()
        self._to_reset: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are normal
            super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.discard(request)
            reset = request in self._to_reset
            self._to_reset.discard(request)
        if reset:
            # No FIN first: SO_LINGER 0 makes close() send an RST, as a dropped connection.
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def mark_reset(self, request: socket.socket) -> None:
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._conn_lock:
            self._to_reset.add(request)

    def close_connections(self) -> None:
        """Unblock handler threads still waiting on idle keep-alive connections."""
        with self._conn_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _proxy(self) -> None:
        proxy = self.server.proxy
        try:
            body, chunked = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        outcome, delay = proxy._decide(self.command, self.path)
        if outcome == "reset":
            self.server.mark_reset(self.connection)
            self.close_connection = True
            return
        if outcome != "ok":
            self._send_error(*ERRORS[outcome])
            return
        if delay:
            time.sleep(delay)
        try:
            self._forward(body, chunked)
        except (OSError, http.client.HTTPException):
            # The client went away, or the server broke off mid-response: nothing to answer.
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _proxy

    def _read_body(self) -> tuple[bytes, bool]:
        """The request body exactly as it came (chunk framing and trailers included)."""
        encoding = self.headers.get("Transfer-Encoding", "")
        if "chunked" in encoding.lower():
            return self._read_chunked_raw(), True
        length = self.headers.get("Content-Length")
        if length is None:
            return b"", False
        return self.rfile.read(int(length)), False

    def _read_chunked_raw(self) -> bytes:
        raw = bytearray()
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise ValueError("truncated chunk size line")
            raw += line
            size = int(line.split(b";", 1)[0].strip(), 16)  # chunk extensions may follow
            if size == 0:
                break
            data = self.rfile.read(size + 2)  # the chunk and its CRLF
            if len(data) != size + 2:
                raise ValueError("truncated chunk")
            raw += data
        while True:  # trailer fields (aws-chunked checksums), then the empty line
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise ValueError("truncated trailer")
            raw += line
            if line in (b"\r\n", b"\n"):
                return bytes(raw)

    def _forward(self, body: bytes, chunked: bool) -> None:
        proxy = self.server.proxy
        conn = proxy._connect_upstream()
        try:
            try:
                # Host and Accept-Encoding exactly as the client sent them (SigV4 signs Host).
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                headers = [(name, value) for name, value in self.headers.items()
                           if name.lower() not in REQUEST_DROPPED]
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders()
                proxy._record(self.command, self.path, headers)
                if body:
                    conn.send(body)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException):
                proxy._count(bad_gateway=True)
                self._send_error(*ERRORS["bad_gateway"])
                return
            proxy._count(forwarded=True, chunked=chunked)
            self._relay(response)
        finally:
            conn.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        no_body = (self.command == "HEAD" or response.status in (204, 304)
                   or 100 <= response.status < 200)
        length = response.getheader("Content-Length")
        known_length = length is not None and not response.chunked
        payload = b""
        if not no_body and not known_length:
            payload = response.read()  # chunked or close-delimited: re-framed here
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            lowered = name.lower()
            if lowered in RESPONSE_DROPPED:
                continue
            if lowered == "content-length" and not no_body and not known_length:
                continue
            self.send_header(name, value)
        if not no_body and not known_length:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if no_body:
            return
        if not known_length:
            self.wfile.write(payload)
            return
        remaining = int(length)
        while remaining > 0:
            block = response.read(min(COPY_BLOCK, remaining))
            if not block:
                # The server broke off: so must we, or the client would wait for the rest.
                self.close_connection = True
                return
            self.wfile.write(block)
            remaining -= len(block)

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = error_body(code, message, f"faultproxy-{self.server.proxy.requests}")
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", f"faultproxy-{self.server.proxy.requests}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of the session's moto server, no faults yet."""
    with FaultProxy(s3_endpoint, fail_every=0) as proxy:
        yield proxy
