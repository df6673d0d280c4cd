"""The fault-injecting S3 proxy (tests/faults/s3_proxy.py): it forwards requests byte for byte, each
fault does on the wire what it says, only to the kind it is set for, counted, and the schedule is
a function of the seed. On the wire against a recording stand-in store; end to end with s3fs and
moto's server, where the client's retries absorb single faults."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time

import pytest

from tests.faults.s3_proxy import FAULTS, FaultPolicy, FaultProxy, Rule, classify

MiB = 2**20
OK_BODY = b"0123456789" * 10
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nConnection: close\r\n\r\n" + OK_BODY


class _Store:
    """A stand-in upstream on loopback: records each request as it arrived (raw bytes, and whether
    it arrived whole) and answers `response`, one connection at a time."""

    def __init__(self, response: bytes = OK) -> None:
        self.response = response
        self.received: list[tuple[bytes, bool]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)  # accept() polls, so that stop() need not wait on it
        self._stopping = threading.Event()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            with conn:
                raw, whole = _read_request(conn)
                self.received.append((raw, whole))
                if whole:
                    conn.sendall(self.response)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._sock.close()


def _read_request(conn: socket.socket) -> tuple[bytes, bool]:
    """One HTTP request's bytes (Content-Length or chunked), and whether it came whole."""
    buf = b""

    def more() -> bool:
        nonlocal buf
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return False
        buf += chunk
        return bool(chunk)

    while b"\r\n\r\n" not in buf:
        if not more():
            return buf, False
    head, _, _ = buf.partition(b"\r\n\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    start = len(head) + 4
    if headers.get(b"transfer-encoding") == b"chunked":
        while not buf.endswith(b"0\r\n\r\n"):  # the last chunk, no trailers (as http.client sends it)
            if not more():
                return buf, False
        return buf, True
    length = int(headers.get(b"content-length", b"0"))
    while len(buf) < start + length:
        if not more():
            return buf, False
    return buf, True


@pytest.fixture()
def store():
    s = _Store()
    yield s
    s.stop()


def _exchange(proxy: FaultProxy, method: str, target: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# --- classification and policy: pure ------------------------------------------------------------


@pytest.mark.parametrize("method, target, headers, kind", [
    ("GET", "/b/k/x.tar", {}, "GET"),
    ("GET", "/b?list-type=2&prefix=k%2F&delimiter=%2F", {}, "LIST"),
    ("GET", "/b", {}, "LIST"),
    ("GET", "/", {}, "LIST"),
    ("GET", "/b?uploads&prefix=k", {}, "LIST"),
    ("GET", "/b/k?uploadId=U", {}, "LIST"),
    ("GET", "/b?location", {}, "OTHER"),
    ("HEAD", "/b/k", {}, "HEAD"),
    ("HEAD", "/b", {}, "HEAD"),
    ("PUT", "/b/k", {}, "PUT"),
    ("PUT", "/b/k", {"x-amz-copy-source": "b/src"}, "COPY"),
    ("PUT", "/b/k?partNumber=2&uploadId=U", {}, "UPLOAD_PART"),
    ("PUT", "/b/k?partNumber=2&uploadId=U", {"x-amz-copy-source": "b/src"}, "COPY"),
    ("PUT", "/b", {}, "OTHER"),
    ("PUT", "/b/k?tagging", {}, "OTHER"),
    ("POST", "/b/k?uploads", {}, "CREATE_MPU"),
    ("POST", "/b/k?uploadId=U", {}, "COMPLETE_MPU"),
    ("POST", "/b?delete", {}, "DELETE"),
    ("DELETE", "/b/k", {}, "DELETE"),
    ("DELETE", "/b/k?uploadId=U", {}, "ABORT_MPU"),
    ("DELETE", "/b", {}, "OTHER"),
])
def test_requests_are_classified_by_what_they_do(method, target, headers, kind):
    assert classify(method, target, headers) == kind


def test_policy_rate_fault_mix_path_filter_and_limit():
    policy = FaultPolicy.uniform(0.1, seed=3)
    draws = [policy.decide("GET", n, "/b/k", 0) for n in range(20000)]
    hit = [d for d in draws if d is not None]
    assert 0.09 < len(hit) / len(draws) < 0.11
    mix = {f: hit.count(f) / len(hit) for f in FAULTS}
    assert set(mix) == set(FAULTS) and all(abs(share - 1 / len(FAULTS)) < 0.03 for share in mix.values())
    assert draws == [policy.decide("GET", n, "/b/k", 0) for n in range(20000)]  # a pure function
    other = FaultPolicy.uniform(0.1, seed=4)
    assert [other.decide("GET", n, "/b/k", 0) for n in range(20000)] != draws

    only = FaultPolicy({"PUT": Rule(1.0, ("error_500",), path=r"/tmp/", limit=2)})
    assert only.decide("PUT", 0, "/b/out/.latentcache/tmp/x.parquet", 0) == "error_500"
    assert only.decide("PUT", 1, "/b/out/x.parquet", 0) is None  # outside the path filter
    assert only.decide("PUT", 2, "/b/out/.latentcache/tmp/x.parquet", 2) is None  # limit reached
    assert only.decide("GET", 0, "/b/out/.latentcache/tmp/x.parquet", 0) is None  # another kind
    with pytest.raises(ValueError, match=r"faults \['nope'\] are not allowed"):
        Rule(0.5, ("nope",))
    with pytest.raises(ValueError, match=r"rule kinds \['PUTS'\] are not allowed"):
        FaultPolicy({"PUTS": Rule(0.5)})


# --- on the wire, against a recording stand-in store --------------------------------------------


def test_requests_are_forwarded_byte_for_byte_on_keep_alive_connections(store):
    with FaultProxy(store.url) as proxy:
        port = proxy.port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        sent = []
        for i in range(3):  # one client connection, three requests
            body = os.urandom(1000 + i)
            conn.request("PUT", f"/b/k{i}?x-id=PutObject", body=body,
                         headers={"x-amz-checksum-crc32": "AAAA", "Authorization": f"AWS4-HMAC-SHA256 sig{i}"})
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, OK_BODY)
            assert r.getheader("Connection") is None  # the store's "close" is not the client's business
            sent.append(body)
        conn.request("PUT", "/b/chunked", body=iter([b"abc", b"", b"defgh"]), encode_chunked=True)
        assert conn.getresponse().read() == OK_BODY
        conn.request("PUT", "/b/expect", body=b"x" * 5000, headers={"Expect": "100-continue"})
        assert conn.getresponse().read() == OK_BODY
        conn.close()
        assert proxy.requests() == {"PUT": 5} and proxy.counts() == {} and proxy.internal_errors == 0

    assert [whole for _, whole in store.received] == [True] * 5
    for (raw, _), body, i in zip(store.received, sent, range(3)):
        head, _, got = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == f"PUT /b/k{i}?x-id=PutObject HTTP/1.1".encode() and got == body
        assert f"Authorization: AWS4-HMAC-SHA256 sig{i}".encode() in lines and b"x-amz-checksum-crc32: AAAA" in lines
        assert f"Host: 127.0.0.1:{port}".encode() in lines  # the client's Host, as it signed it
        assert lines[-1] == b"Connection: close"
    chunked = store.received[3][0]
    assert chunked.endswith(b"\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n")  # the chunks as sent
    expect = store.received[4][0]
    expect_head = expect.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert not any(line.startswith(b"expect:") for line in expect_head) and expect.endswith(b"x" * 5000)


def test_an_upstream_response_without_framing_gets_a_content_length():
    store = _Store(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end")
    try:
        with FaultProxy(store.url) as proxy:
            status, headers, body = _exchange(proxy, "GET", "/b/k")
        assert (status, headers["content-length"], body) == (200, "10", b"to the end")
    finally:
        store.stop()


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_does_what_it_says_on_the_wire(store, fault):
    policy = FaultPolicy({"PUT": Rule(1.0, (fault,), limit=1), "GET": Rule(1.0, (fault,), limit=1)}, stall_s=0.3)
    body = bytes(range(256)) * 8
    with FaultProxy(store.url, policy) as proxy:
        t0 = time.monotonic()
        method, target = ("GET", "/b/k") if fault == "truncate_response" else ("PUT", "/b/k")
        try:
            result: object = _exchange(proxy, method, target, body=body if method == "PUT" else None)
        except (ConnectionError, http.client.HTTPException) as e:
            result = e
        elapsed = time.monotonic() - t0
        assert proxy.counts() == {(method, fault): 1}
        assert [(e.kind, e.method, e.path, e.fault) for e in proxy.events()] == [(method, method, "/b/k", fault)]
        # The rule's limit is spent: the next request of the kind passes.
        assert _exchange(proxy, method, target, body=body if method == "PUT" else None)[2] == OK_BODY
        assert proxy.internal_errors == 0

    reached = store.received[:-1]  # what the faulted request delivered to the store
    if fault == "reset_before":
        assert isinstance(result, ConnectionResetError) and reached == []
    elif fault == "reset_after":
        assert isinstance(result, ConnectionResetError) and reached == [(reached[0][0], True)]
    elif fault in ("error_500", "error_503", "slowdown"):
        code = {"error_500": "InternalError", "error_503": "ServiceUnavailable", "slowdown": "SlowDown"}[fault]
        status, headers, got = result  # type: ignore[misc]
        assert status == (500 if fault == "error_500" else 503) and reached == []
        assert f"<Code>{code}</Code>".encode() in got and headers["content-type"] == "application/xml"
    elif fault == "stall":
        assert result[2] == OK_BODY and elapsed >= 0.3 and len(reached) == 1  # type: ignore[index]
    elif fault == "truncate_response":
        assert isinstance(result, http.client.IncompleteRead)
        assert result.partial == OK_BODY[:50] and result.expected == 50
    elif fault == "truncate_request":
        assert isinstance(result, ConnectionResetError)
        (raw, whole), = reached
        assert not whole and raw.endswith(b"\r\n\r\n" + body[: len(body) // 2])
    elif fault == "short_body":
        assert result[2] == OK_BODY  # type: ignore[index]
        (raw, whole), = reached
        assert whole and raw.endswith(b"\r\n\r\n" + body[: len(body) // 2])
        assert f"Content-Length: {len(body) // 2}".encode() in raw
    else:
        pytest.fail(f"no check for fault {fault}")


def test_stop_closes_its_connections_and_thread_only(store):
    before = set(threading.enumerate())
    proxy = FaultProxy(store.url).start()
    port = proxy.port
    idle = socket.create_connection(("127.0.0.1", port))  # a keep-alive connection left open
    idle.sendall(b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).endswith(OK_BODY)
    proxy.stop()
    proxy.stop()  # idempotent
    idle.settimeout(5)
    assert idle.recv(10) == b""  # closed by the proxy, not left hanging
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert set(threading.enumerate()) == before
    assert store._thread.is_alive()  # the store is not the proxy's to stop


# --- end to end: s3fs through the proxy to moto -------------------------------------------------


@pytest.fixture(scope="module")
def moto_proxy(s3_server):
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"]) as proxy:
        yield proxy


@pytest.fixture()
def direct(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])


def _fs(proxy: FaultProxy):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=proxy.endpoint, skip_instance_cache=True, default_block_size=5 * MiB)


def _write_in_pieces(fs, path: str, data: bytes, piece: int = MiB) -> None:
    with fs.open(path, "wb") as f:
        for i in range(0, len(data), piece):
            f.write(data[i:i + piece])


def _body(direct, bucket: str, key: str) -> bytes:
    return direct.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.s3
def test_s3fs_traffic_passes_through_unchanged(moto_proxy, s3_bucket, direct):
    proxy, fs, b = moto_proxy, _fs(moto_proxy), s3_bucket
    proxy.set_policy(FaultPolicy())
    proxy.reset_counts()
    small, big = b"a small object", os.urandom(12 * MiB + 123)
    fs.pipe_file(f"{b}/d/small", small)
    _write_in_pieces(fs, f"{b}/d/big", big)
    assert _body(direct, b, "d/small") == small and _body(direct, b, "d/big") == big
    assert direct.head_object(Bucket=b, Key="d/big")["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB parts
    assert fs.cat_file(f"{b}/d/big") == big and fs.cat_file(f"{b}/d/small") == small
    assert fs.info(f"{b}/d/big")["size"] == len(big)
    assert fs.ls(f"{b}/d") == [f"{b}/d/big", f"{b}/d/small"]
    fs.mv(f"{b}/d/small", f"{b}/d/moved")
    assert _body(direct, b, "d/moved") == small
    fs.rm([f"{b}/d/big", f"{b}/d/moved"])
    assert direct.list_objects_v2(Bucket=b)["KeyCount"] == 0
    seen = proxy.requests()
    assert seen["UPLOAD_PART"] == 3 and seen["CREATE_MPU"] == seen["COMPLETE_MPU"] == 1
    assert {"GET", "HEAD", "PUT", "LIST", "COPY", "DELETE"} <= set(seen)
    assert proxy.counts() == {} and proxy.internal_errors == 0 and proxy.upstream_errors == 0


def _workload(fs, prefix: str) -> dict[str, bytes]:
    """Every request kind s3fs makes for a job, one after the other; returns what it read back."""
    small, big = b"s" * 3000, bytes(range(256)) * (24 * 1024 + 7)  # 6 MiB + 1792 B: two parts
    fs.pipe_file(f"{prefix}/small", small)
    _write_in_pieces(fs, f"{prefix}/big", big)
    fs.invalidate_cache()
    out = {"small": fs.cat_file(f"{prefix}/small"), "big_size": str(fs.info(f"{prefix}/big")["size"]).encode(),
           "ls": ",".join(fs.ls(prefix)).encode()}
    fs.copy(f"{prefix}/small", f"{prefix}/copy")
    fs.rm([f"{prefix}/small"])
    fs.invalidate_cache()
    out["after"] = ",".join(fs.ls(prefix)).encode()
    return out


@pytest.fixture(scope="module")
def baseline(moto_proxy, s3_server):
    """The workload's requests by kind, and what it reads, with no faults."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket="proxy-baseline")
    moto_proxy.set_policy(FaultPolicy())
    moto_proxy.reset_counts()
    out = _workload(_fs(moto_proxy), "proxy-baseline/w")
    return moto_proxy.requests(), out


# Every fault once, every kind of the workload once; the client's retries absorb each.
_KIND_FAULTS = [("GET", "truncate_response"), ("HEAD", "error_503"), ("PUT", "reset_after"),
                ("UPLOAD_PART", "truncate_request"), ("CREATE_MPU", "slowdown"), ("COMPLETE_MPU", "reset_after"),
                ("LIST", "error_500"), ("COPY", "reset_before"), ("DELETE", "stall"), ("PUT", "short_body")]


@pytest.mark.s3
@pytest.mark.parametrize("kind, fault", _KIND_FAULTS)
def test_a_fault_hits_only_its_kind_and_is_counted(moto_proxy, baseline, s3_bucket, direct, kind, fault):
    requests_before, expected = baseline
    proxy = moto_proxy
    proxy.set_policy(FaultPolicy({kind: Rule(1.0, (fault,), limit=1)}, stall_s=0.3))
    proxy.reset_counts()
    if fault == "short_body":
        # A store that loses bytes, silently: moto keeps half the body (and the checksum the client
        # sent for all of it) and answers 200. Only checking the size afterwards tells.
        _fs(proxy).pipe_file(f"{s3_bucket}/w/small", b"s" * 3000)
        assert direct.head_object(Bucket=s3_bucket, Key="w/small")["ContentLength"] == 1500
        assert proxy.counts() == {(kind, fault): 1} and proxy.requests() == {kind: 1}
        return
    got = _workload(_fs(proxy), f"{s3_bucket}/w")
    assert {k: v.replace(s3_bucket.encode(), b"B") for k, v in got.items()} == \
        {k: v.replace(b"proxy-baseline", b"B") for k, v in expected.items()}
    assert proxy.counts() == {(kind, fault): 1}
    retried = 0 if fault == "stall" else 1  # a failed request is sent again; a stalled one is not
    assert proxy.requests() == {**requests_before, kind: requests_before[kind] + retried}
    assert proxy.internal_errors == 0


@pytest.mark.s3
def test_the_same_seed_gives_the_same_faults(moto_proxy, s3_bucket):
    proxy = moto_proxy
    fast = ("reset_before", "reset_after", "error_500", "error_503", "truncate_response", "truncate_request")

    def run(seed: int, prefix: str) -> list[tuple]:
        proxy.set_policy(FaultPolicy.uniform(0.25, fast, seed=seed))
        proxy.reset_counts()
        _workload(_fs(proxy), f"{s3_bucket}/{prefix}")
        return [(e.n, e.kind, e.method, e.path.replace(prefix, "P"), e.fault) for e in proxy.events()]

    first, again, other = run(11, "one"), run(11, "two"), run(12, "three")
    assert len(first) >= 3 and first == again and other != first
    assert proxy.internal_errors == 0
