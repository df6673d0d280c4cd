"""A fault-injecting HTTP reverse proxy for S3, between s3fs and moto's server, on loopback.

    client (s3fs, boto3) --> FaultProxy 127.0.0.1:<free port> --> upstream (moto's server)

Each request is classified by what it does to the store (`classify`: GET, HEAD, PUT, UPLOAD_PART,
CREATE_MPU, COMPLETE_MPU, ABORT_MPU, COPY, LIST, DELETE, OTHER), and a declarative, seeded
`FaultPolicy` decides whether it is broken and how (`FAULTS`). Every injected fault is counted by
(kind, fault). Bytes are forwarded as they came, bodies included (Content-Length, chunked and
aws-chunked alike); only hop-by-hop headers (Connection, Keep-Alive, Expect) are the proxy's own.
Nothing is re-signed: the client signs for the proxy's host:port, the Host header is forwarded
unchanged, and moto does not check signatures.

What s3fs (aiobotocore, over http) sends: bodies framed by Content-Length, `Expect: 100-continue` on
PutObject and UploadPart (the proxy answers the 100 itself and reads the body), checksums in
headers. A `Transfer-Encoding: chunked` body is forwarded chunk for chunk; an aws-chunked one
(botocore's trailing checksums, https only) is framed by Content-Length, so it passes as it is.
Path-style addressing only (bucket in the path), which botocore uses for an IP endpoint.
The proxy runs its own event loop in a background thread: `with FaultProxy(upstream) as proxy:`,
or `start()` / `stop()`, which stops exactly the server, connections and thread it started;
`through(proxy, policy)` points this process's s3fs (and the actors a job starts) at it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

KINDS = ("GET", "HEAD", "PUT", "UPLOAD_PART", "CREATE_MPU", "COMPLETE_MPU", "ABORT_MPU", "COPY", "LIST",
         "DELETE", "OTHER")

FAULTS = {
    "reset_before": "the connection is reset before the request reaches the store",
    "reset_after": "the store handles the request, then the connection is reset before its response",
    "error_500": "500 InternalError; the request does not reach the store",
    "error_503": "503 ServiceUnavailable; the request does not reach the store",
    "slowdown": "503 SlowDown; the request does not reach the store",
    "stall": "the request is held for the policy's stall_s seconds, then forwarded",
    "truncate_response": "the response keeps its Content-Length but stops halfway through its body "
                         "(through its head when it has no body), then the connection closes",
    "truncate_request": "half of the request body (half of the head, for a request without a body) reaches "
                        "the store, then both connections are reset",
    "short_body": "the store is sent the first half of the request body as if it were all of it (Content-Length "
                  "rewritten; a store that loses bytes), and its answer goes back to the client",
}

_ERRORS = {
    "error_500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "error_503": (503, "Service Unavailable", "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
# GET on a bucket with these (or no) parameters lists it; other bucket GETs (?location, ?acl) are OTHER.
_LIST_PARAMS = frozenset({"list-type", "prefix", "delimiter", "marker", "continuation-token", "start-after",
                          "max-keys", "uploads", "versions", "encoding-type"})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "expect", "upgrade"})
_MAX_HEAD = 1 << 20


def classify(method: str, target: str, headers: Mapping[str, str]) -> str:
    """The S3 kind of a path-style request; `headers` keyed by lower-case name."""
    split = urlsplit(target)
    query = parse_qs(split.query, keep_blank_values=True)
    bucket, _, key = unquote(split.path).lstrip("/").partition("/")
    method = method.upper()
    if method == "GET":
        if not key:
            return "LIST" if not bucket or not query or _LIST_PARAMS.intersection(query) else "OTHER"
        return "LIST" if "uploadId" in query else "GET"  # ListParts lists an upload's parts
    if method == "HEAD":
        return "HEAD"
    if method == "PUT":
        if not key:
            return "OTHER"  # CreateBucket and bucket settings
        if "x-amz-copy-source" in headers:
            return "COPY"  # CopyObject, and UploadPartCopy
        if "partNumber" in query and "uploadId" in query:
            return "UPLOAD_PART"
        return "PUT" if not query.keys() - {"x-id"} else "OTHER"  # ?tagging, ?acl: not object bytes
    if method == "POST":
        if "delete" in query:
            return "DELETE"  # DeleteObjects
        if "uploads" in query:
            return "CREATE_MPU"
        if "uploadId" in query:
            return "COMPLETE_MPU"
        return "OTHER"
    if method == "DELETE":
        if "uploadId" in query:
            return "ABORT_MPU"
        return "DELETE" if key else "OTHER"
    return "OTHER"


@dataclass(frozen=True)
class Rule:
    """Break `rate` of the requests of a kind, with one of `faults` each (drawn uniformly).

    path: a regex searched in the request target (path and query, `/bucket/key?partNumber=2&...`);
      requests that do not match pass untouched.
    limit: at most this many faults from this rule (None: no limit).
    """

    rate: float
    faults: tuple[str, ...] = tuple(FAULTS)
    path: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate={self.rate} must be within [0, 1]")
        unknown = sorted(set(self.faults) - set(FAULTS))
        if unknown or not self.faults:
            raise ValueError(f"faults {unknown or '()'} are not allowed; expected some of {sorted(FAULTS)}")
        object.__setattr__(self, "faults", tuple(self.faults))
        if self.path is not None:
            re.compile(self.path)


@dataclass(frozen=True)
class FaultPolicy:
    """Which requests break, per kind: `rules` maps a kind (or "*", every kind not named) to a Rule.

    Decisions are a pure function of (seed, kind, n), n being the request's place among the
    requests of its kind: a client that sends the same requests in the same order meets the same
    faults, and faults on one kind do not shift the schedule of another.
    """

    rules: Mapping[str, Rule] = field(default_factory=dict)
    seed: int = 0
    stall_s: float = 0.5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rules) - set(KINDS) - {"*"})
        if unknown:
            raise ValueError(f"rule kinds {unknown} are not allowed; expected some of {list(KINDS)} or '*'")
        if self.stall_s < 0:
            raise ValueError(f"stall_s={self.stall_s} must be >= 0")
        object.__setattr__(self, "rules", dict(self.rules))

    @classmethod
    def uniform(cls, rate: float, faults: tuple[str, ...] = tuple(FAULTS), *, seed: int = 0,
                stall_s: float = 0.5) -> FaultPolicy:
        """The same rate and faults for every kind."""
        return cls({"*": Rule(rate, faults)}, seed=seed, stall_s=stall_s)

    def rule_for(self, kind: str) -> Rule | None:
        return self.rules.get(kind, self.rules.get("*"))

    def decide(self, kind: str, n: int, target: str, injected: int) -> str | None:
        """The fault for the n-th request of `kind` to `target` (None: forward it), `injected`
        faults given by this rule so far."""
        rule = self.rule_for(kind)
        if rule is None or rule.rate <= 0.0 or (rule.limit is not None and injected >= rule.limit):
            return None
        if rule.path is not None and not re.search(rule.path, target):
            return None
        digest = hashlib.sha256(f"{self.seed}:{kind}:{n}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= rule.rate:
            return None
        return rule.faults[int.from_bytes(digest[8:16], "big") % len(rule.faults)]


@dataclass(frozen=True)
class Event:
    """One request that met a fault."""

    n: int
    kind: str
    method: str
    path: str
    fault: str


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    kind: str = "OTHER"

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.target).path)


@dataclass
class _Response:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes
    eof_framed: bool  # neither Content-Length nor chunked: the body ran to the end of the connection


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body as it came on the wire (sizes, extensions, trailers and all)."""
    raw = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = await reader.readuntil(b"\r\n")
                raw += trailer
                if trailer == b"\r\n":
                    return bytes(raw)
        raw += await reader.readexactly(size + 2)


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes | None:
    """The body framed by `headers`; None when they frame none (a response then runs to EOF)."""
    lower = {k.lower(): v for k, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    if "content-length" in lower:
        return await reader.readexactly(int(lower["content-length"]))
    return None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a store or load balancer that drops a connection does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed by the peer
    writer.transport.abort()


class FaultProxy:
    """The proxy; see the module docstring. `policy` may be replaced between requests (`set_policy`)."""

    def __init__(self, upstream: str, policy: FaultPolicy | None = None, *, host: str = "127.0.0.1",
                 upstream_timeout_s: float = 120.0) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname or not split.port:
            raise ValueError(f"upstream={upstream!r} must be http://host:port")
        self.upstream = (split.hostname, split.port)
        self.host = host
        self.upstream_timeout_s = upstream_timeout_s
        self.policy = policy or FaultPolicy()
        self.port: int | None = None
        self._lock = threading.Lock()
        self._seen: collections.Counter[str] = collections.Counter()  # requests by kind, since reset_counts
        self._seq: collections.Counter[str] = collections.Counter()  # by kind, under the current policy
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._injected: collections.Counter[str] = collections.Counter()  # by kind, under the current policy
        self._events: list[Event] = []
        self.upstream_errors = 0  # the store itself failed (not an injected fault)
        self.internal_errors = 0  # bugs in this proxy; tests assert there are none
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- control, from the test's thread --------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("the proxy is not started")
        return f"http://{self.host}:{self.port}"

    def set_policy(self, policy: FaultPolicy) -> None:
        """A new policy, its schedule and limits from the start; the counts of faults so far are kept."""
        with self._lock:
            self.policy = policy
            self._seq.clear()
            self._injected.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self._seen.clear()
            self._seq.clear()
            self._injected.clear()
            self._counts.clear()
            self._events.clear()

    def counts(self) -> dict[tuple[str, str], int]:
        """Injected faults by (kind, fault)."""
        with self._lock:
            return dict(self._counts)

    def requests(self) -> dict[str, int]:
        """Requests seen by kind, faulted or not."""
        with self._lock:
            return dict(self._seen)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def report(self) -> str:
        """A table of requests and injected faults per kind, for test output."""
        seen, counts = self.requests(), self.counts()
        faults = [f for f in FAULTS if any(f == fault for _, fault in counts)]
        lines = [f"{'kind':<13}{'requests':>9}{'faulted':>9}  " + " ".join(f"{f:>17}" for f in faults)]
        for kind in KINDS:
            if not seen.get(kind):
                continue
            row = [counts.get((kind, f), 0) for f in faults]
            lines.append(f"{kind:<13}{seen[kind]:>9}{sum(row):>9}  " + " ".join(f"{c:>17}" for c in row))
        lines.append(f"{'total':<13}{sum(seen.values()):>9}{sum(counts.values()):>9}")
        return "\n".join(lines)

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0,
                                                                            limit=_MAX_HEAD))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # handed to start()'s caller
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the server and every connection it holds, stop the loop and join the thread."""
        if self._thread is None or self._loop is None:
            return
        loop, thread = self._loop, self._thread
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if not loop.is_closed():
            loop.close()
        self._thread = self._loop = self._server = None
        self.port = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # --- one client connection, in the loop's thread --------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            while True:
                request = await self._read_request(reader, writer)
                if request is None or not await self._handle(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or gave up mid-request: nothing to answer
        except asyncio.CancelledError:
            pass  # stop()
        except Exception:  # noqa: BLE001 - a proxy bug: counted, logged, and the connection dropped
            with self._lock:
                self.internal_errors += 1
            log.exception("fault proxy: internal error")
        finally:
            if not writer.transport.is_closing():
                writer.transport.abort()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise
            return None  # the client closed an idle keep-alive connection
        line, headers = _parse_head(head)
        method, target, version = line.split(" ", 2)
        request = _Request(method, target, version, headers, b"")
        if (request.header("expect") or "").lower() == "100-continue":
            # The proxy answers the Expect itself and reads the body: the store sees no Expect.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        request.body = await _read_body(reader, headers) or b""
        request.kind = classify(method, target, {k.lower(): v for k, v in headers})
        return request

    def _decide(self, request: _Request) -> str | None:
        with self._lock:
            kind = request.kind
            n = self._seq[kind]
            self._seq[kind] += 1
            self._seen[kind] += 1
            fault = self.policy.decide(kind, n, unquote(request.target), self._injected[kind])
            if fault is not None:
                self._injected[kind] += 1
                self._counts[(kind, fault)] += 1
                self._events.append(Event(n, kind, request.method, request.path, fault))
        return fault

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request (or break it); returns whether the client connection stays open."""
        keep = request.version == "HTTP/1.1" and (request.header("connection") or "").lower() != "close"
        fault = self._decide(request)
        if fault == "reset_before":
            _reset(writer)
            return False
        if fault in _ERRORS:
            await self._send_error(writer, request, fault, keep)
            return keep
        if fault == "stall":
            await asyncio.sleep(self.policy.stall_s)
        if fault == "truncate_request":
            await self._forward(request, partial=True)
            _reset(writer)
            return False
        if fault == "short_body" and request.body and request.header("transfer-encoding") is None:
            request.body = request.body[: len(request.body) // 2]
            request.headers = [(k, str(len(request.body)) if k.lower() == "content-length" else v)
                               for k, v in request.headers]
        try:
            response = await self._forward(request)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
            with self._lock:
                self.upstream_errors += 1
            log.warning("fault proxy: upstream failed for %s %s: %r", request.method, request.target, e)
            await self._send_error(writer, request, "error_503", False, status=(502, "Bad Gateway"))
            return False
        assert response is not None
        if fault == "reset_after":
            _reset(writer)
            return False
        head = self._response_head(response, keep and fault != "truncate_response")
        if fault == "truncate_response":
            writer.write(head + response.body[: len(response.body) // 2] if response.body else head[: len(head) // 2])
            await writer.drain()
            writer.close()  # a clean FIN: the client sees the body end early, not a reset
            return False
        writer.write(head + response.body)
        await writer.drain()
        return keep

    async def _send_error(self, writer: asyncio.StreamWriter, request: _Request, fault: str, keep: bool,
                          status: tuple[int, str] | None = None) -> None:
        code, reason, s3_code, message = _ERRORS[fault]
        if status is not None:
            code, reason = status
            s3_code, message = "BadGateway", "The fault proxy could not reach the store."
        request_id = hashlib.sha256(f"{request.target}:{id(request)}".encode()).hexdigest()[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{s3_code}</Code><Message>{message}</Message>'
                f"<RequestId>{request_id}</RequestId></Error>").encode()
        if request.method == "HEAD":
            body = b""  # a HEAD response has no body; botocore reads the status alone
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                f"x-amz-request-id: {request_id}\r\n" + ("" if keep else "Connection: close\r\n") + "\r\n")
        writer.write(head.encode("latin-1") + body)
        await writer.drain()

    def _response_head(self, response: _Response, keep: bool) -> bytes:
        _, _, rest = response.status_line.partition(" ")  # our own version: the client talks to us
        headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP_BY_HOP]
        if response.eof_framed:
            headers.append(("Content-Length", str(len(response.body))))
        if not keep:
            headers.append(("Connection", "close"))
        lines = [f"HTTP/1.1 {rest}"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _forward(self, request: _Request, *, partial: bool = False) -> _Response | None:
        """Send the request upstream on a connection of its own; its response (None when `partial`)."""
        host, port = self.upstream
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=_MAX_HEAD),
                                                self.upstream_timeout_s)
        try:
            headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
            headers.append(("Connection", "close"))
            head = ("\r\n".join([f"{request.method} {request.target} {request.version}"]
                                + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n").encode("latin-1")
            body = request.body
            if partial:  # half the body, or half the head of a request without one
                writer.write(head + body[: len(body) // 2] if body else head[: len(head) // 2])
                await writer.drain()
                await asyncio.sleep(0.05)  # let the bytes leave before the reset
                _reset(writer)
                return None
            writer.write(head + body)
            await writer.drain()
            return await asyncio.wait_for(self._read_response(reader, request.method), self.upstream_timeout_s)
        finally:
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader, method: str) -> _Response:
        while True:
            status_line, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            code = int(status_line.split(" ", 2)[1])
            if not 100 <= code < 200:
                break  # informational responses (a 100 Continue) are the proxy's business, not the client's
        if method == "HEAD" or code in (204, 304):
            return _Response(status_line, headers, b"", eof_framed=False)
        body = await _read_body(reader, headers)
        if body is None:
            return _Response(status_line, headers, await reader.read(), eof_framed=True)
        return _Response(status_line, headers, body, eof_framed=False)


@contextlib.contextmanager
def through(proxy: FaultProxy, policy: FaultPolicy) -> Iterator[FaultProxy]:
    """AWS_ENDPOINT_URL at the proxy (this process, and the actors a job starts now), under `policy`;
    put back, with the default policy, on the way out."""
    import s3fs

    saved = os.environ["AWS_ENDPOINT_URL"]
    proxy.set_policy(policy)
    proxy.reset_counts()
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    s3fs.S3FileSystem.clear_instance_cache()  # cached filesystems keep the endpoint they were made with
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        s3fs.S3FileSystem.clear_instance_cache()
        proxy.set_policy(FaultPolicy())


__all__ = ["FaultProxy", "FaultPolicy", "Rule", "Event", "classify", "through", "FAULTS", "KINDS"]
