"""The fault-injecting S3 proxy: faithful forwarding, deterministic transient faults, denials."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import random
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit
from xml.etree import ElementTree

import pytest

from pipeline.io.storage import StorageError, open_filesystem, storage_errors
from tests.faultproxy import FAULT_KINDS, FaultProxy, fault_proxy  # noqa: F401
from tests.s3server import FAKE_AWS_ENV, s3_bucket, s3_client, s3_endpoint  # noqa: F401

MiB = 1 << 20


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def proxied_fs(proxy: FaultProxy, bucket: str):
    """The pipeline's own S3 filesystem (standard retries, 5 attempts) through the proxy."""
    fs, _ = open_filesystem(f"s3://{bucket}/", {"endpoint_url": proxy.url})
    return fs


def stored(endpoint: str, bucket: str, key: str) -> bytes:
    """An object as moto holds it, read past the proxy."""
    return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def chunk_encode(data: bytes, size: int, extension: bytes = b"", trailer: bytes = b"") -> bytes:
    out = bytearray()
    for start in range(0, len(data), size):
        chunk = data[start:start + size]
        out += b"%x%s\r\n%s\r\n" % (len(chunk), extension, chunk)
    return bytes(out + b"0\r\n" + trailer + b"\r\n")


# -- byte-exact forwarding, no faults ---------------------------------------------------------


def test_roundtrip_small_large_and_multipart(fault_proxy, s3_bucket, s3_endpoint):
    fs = proxied_fs(fault_proxy, s3_bucket)
    small, large, multi = payload(1, 1000), payload(2, 3 * MiB), payload(3, 12 * MiB)
    fs.pipe_file(f"{s3_bucket}/rt/small.bin", small)
    fs.pipe_file(f"{s3_bucket}/rt/empty.bin", b"")
    with fs.open(f"{s3_bucket}/rt/large.bin", "wb") as f:
        f.write(large)
    # Written in 1 MiB pieces with 5 MiB blocks: a multipart upload of parts 5 + 5 + 2 MiB.
    with fs.open(f"{s3_bucket}/rt/multi.bin", "wb", block_size=5 * MiB) as f:
        for start in range(0, len(multi), MiB):
            f.write(multi[start:start + MiB])

    expected = {"small.bin": small, "empty.bin": b"", "large.bin": large, "multi.bin": multi}
    for name, data in expected.items():
        assert fs.cat_file(f"{s3_bucket}/rt/{name}") == data, name
        assert stored(s3_endpoint, s3_bucket, f"rt/{name}") == data, name
    with fs.open(f"{s3_bucket}/rt/multi.bin", "rb", block_size=MiB) as f:
        f.seek(7 * MiB + 3)
        assert f.read(MiB) == multi[7 * MiB + 3:8 * MiB + 3]  # ranged GETs
    assert sorted(fs.ls(f"{s3_bucket}/rt/", detail=False)) == sorted(
        f"{s3_bucket}/rt/{name}" for name in expected)

    history = fault_proxy.history
    parts = [path for method, path, _ in history if method == "PUT" and "partNumber=" in path]
    assert len(parts) == 3
    assert any(method == "POST" and path.endswith("?uploads") for method, path, _ in history)
    stats = fault_proxy.stats()
    assert stats["faults"] == dict.fromkeys(FAULT_KINDS, 0) and stats["denied"] == 0
    assert stats["forwarded"] == stats["requests"] == len(history)


def test_aws_chunked_uploads_with_trailing_checksums(fault_proxy, s3_bucket, s3_endpoint,
                                                     monkeypatch):
    """botocore sends aws-chunked bodies with a trailing CRC32 only over https; make it think
    the proxy is https, so s3fs's uploads (a PUT and the parts of a multipart upload) arrive
    with ``Transfer-Encoding: chunked`` and moto must decode what the proxy forwarded."""
    import botocore.httpchecksum as httpchecksum

    if not hasattr(httpchecksum, "urlparse"):
        pytest.skip("this botocore decides on trailing checksums some other way")
    real_urlparse = httpchecksum.urlparse
    monkeypatch.setattr(httpchecksum, "urlparse", lambda url, *args: real_urlparse(
        url.replace("http://", "https://", 1), *args))
    fault_proxy.record_headers = True
    fs = proxied_fs(fault_proxy, s3_bucket)
    small, multi = payload(4, 300_000), payload(5, 12 * MiB)
    fs.pipe_file(f"{s3_bucket}/chunked/small.bin", small)
    with fs.open(f"{s3_bucket}/chunked/multi.bin", "wb", block_size=5 * MiB) as f:
        for start in range(0, len(multi), MiB):
            f.write(multi[start:start + MiB])

    assert stored(s3_endpoint, s3_bucket, "chunked/small.bin") == small
    assert stored(s3_endpoint, s3_bucket, "chunked/multi.bin") == multi
    assert fs.cat_file(f"{s3_bucket}/chunked/multi.bin") == multi
    assert fault_proxy.chunked == 4  # the PUT and three UploadParts
    puts = [dict((k.lower(), v) for k, v in headers)
            for method, _, headers in fault_proxy.forwarded_headers if method == "PUT"]
    assert len(puts) == 4
    for headers in puts:
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
        assert "aws-chunked" in headers["content-encoding"]
        assert headers["x-amz-trailer"].startswith("x-amz-checksum-")


def test_plain_http_chunked_body_reaches_moto(fault_proxy, s3_bucket, s3_endpoint):
    data = payload(6, 200_000)
    conn = connect(fault_proxy.url)
    conn.putrequest("PUT", f"/{s3_bucket}/raw/chunked.bin")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
    conn.endheaders()
    conn.send(chunk_encode(data, 65_000))
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    conn.putrequest("PUT", f"/{s3_bucket}/raw/again.bin")  # the same client connection
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
    conn.endheaders()
    conn.send(chunk_encode(data[:1000], 100))
    response = conn.getresponse()
    assert response.status == 200, response.read()
    conn.close()
    assert stored(s3_endpoint, s3_bucket, "raw/chunked.bin") == data
    assert stored(s3_endpoint, s3_bucket, "raw/again.bin") == data[:1000]
    assert fault_proxy.chunked == 2


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers with the raw request body it read and the Host and framing it saw."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_PUT(self) -> None:
        chunked = self.headers.get("Transfer-Encoding") == "chunked"
        length = int(self.headers["X-Raw-Length" if chunked else "Content-Length"])
        body = self.rfile.read(length)
        self.send_response(200)
        self.send_header("X-Seen-Host", self.headers["Host"])
        self.send_header("X-Seen-Transfer-Encoding", self.headers.get("Transfer-Encoding", ""))
        self.send_header("X-Seen-Expect", self.headers.get("Expect", ""))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # a chunked response, which the proxy re-frames
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(chunk_encode(b"hello, chunked world", 7))


@pytest.fixture
def echo_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_framing_host_and_trailers_forwarded_unchanged(echo_upstream):
    data = payload(7, 100_000)
    raw = chunk_encode(data, 30_000, extension=b";chunk-signature=abc",
                       trailer=b"x-amz-checksum-crc32: AAAAAA==\r\n")
    with FaultProxy(echo_upstream) as proxy:
        conn = connect(proxy.url)
        conn.putrequest("PUT", "/bkt/key?x=1", skip_accept_encoding=True)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Expect", "100-continue")
        conn.putheader("X-Raw-Length", str(len(raw)))
        conn.endheaders()
        conn.send(raw)
        response = conn.getresponse()
        assert response.status == 200 and response.read() == raw  # framing included
        assert response.getheader("X-Seen-Host") == f"127.0.0.1:{proxy.port}"
        assert response.getheader("X-Seen-Transfer-Encoding") == "chunked"
        assert response.getheader("X-Seen-Expect") == ""  # answered by the proxy itself
        # The body was consumed exactly: the connection goes on with a Content-Length body.
        conn.request("PUT", "/bkt/other", body=data[:5000])
        response = conn.getresponse()
        assert response.status == 200 and response.read() == data[:5000]
        conn.request("GET", "/bkt/anything")
        response = conn.getresponse()
        assert response.read() == b"hello, chunked world"
        assert response.getheader("Content-Length") == "20"
        conn.close()
        assert proxy.stats() | {"faults": None} == {
            "requests": 3, "forwarded": 3, "faults": None, "denied": 0, "chunked": 1,
            "bad_gateway": 0}


def _sigv4(method: str, path: str, headers: dict[str, str], secret: str) -> tuple[str, str]:
    """(signature sent, signature recomputed from the request's signed headers)."""
    match = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=[^/]+/(\d{8})/([^/]+)/([^/]+)/"
                         r"aws4_request, ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]+)",
                         headers["authorization"])
    assert match, headers["authorization"]
    date, region, service, signed, signature = match.groups()
    raw_path, _, query = path.partition("?")
    canonical_query = "&".join(sorted(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, v in parse_qsl(query, keep_blank_values=True)))
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n"
                                for name in signed.split(";"))
    canonical = "\n".join([method, raw_path, canonical_query, canonical_headers, signed,
                           headers["x-amz-content-sha256"]])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", headers["x-amz-date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return signature, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_sigv4_signatures_stay_valid_through_the_proxy(fault_proxy, s3_bucket, s3_endpoint):
    fault_proxy.record_headers = True
    fs = proxied_fs(fault_proxy, s3_bucket)
    fs.pipe_file(f"{s3_bucket}/sig/object.bin", b"signed")
    assert fs.cat_file(f"{s3_bucket}/sig/object.bin") == b"signed"
    fs.ls(f"{s3_bucket}/sig/", refresh=True)
    recorded = fault_proxy.forwarded_headers
    assert {method for method, _, _ in recorded} >= {"PUT", "GET"}
    secret = FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"]
    for method, path, header_list in recorded:
        headers = {name.lower(): value for name, value in header_list}
        # botocore signed the host it connected to, and that is the Host moto receives.
        assert headers["host"] == f"127.0.0.1:{fault_proxy.port}"
        sent, recomputed = _sigv4(method, path, headers, secret)
        assert sent == recomputed, (method, path)
        # The check has teeth: the same request signed for moto's own address differs.
        moved = headers | {"host": urlsplit(s3_endpoint).netloc}
        assert _sigv4(method, path, moved, secret)[1] != sent


# -- transient faults ------------------------------------------------------------------------


def test_fault_cycle_is_deterministic_and_transient(echo_upstream):
    with FaultProxy(echo_upstream, fail_every=2) as proxy:
        outcomes = []
        for i in range(1, 9):
            conn = connect(proxy.url)
            try:
                conn.request("PUT", f"/bkt/key-{i}", body=b"x")
                response = conn.getresponse()
                body = response.read()
                code = ElementTree.fromstring(body).findtext("Code") \
                    if response.status != 200 else None
                outcomes.append((response.status, code))
            except ConnectionResetError:  # http.client's RemoteDisconnected is one too
                outcomes.append(("reset", None))
            finally:
                conn.close()
        assert outcomes == [(200, None), (503, "SlowDown"), (200, None), (500, "InternalError"),
                            (200, None), ("reset", None), (200, None), (503, "SlowDown")]
        assert proxy.faults == {"503": 2, "500": 1, "reset": 1}

        # Denied requests are answered 403 and do not move the cycle on.
        proxy.configure(deny={"/private/"})
        statuses = []
        for path in ("/bkt/private/x", "/bkt/k9", "/bkt/private/y", "/bkt/k10"):
            conn = connect(proxy.url)
            conn.request("GET", path)
            response = conn.getresponse()
            statuses.append((response.status, ElementTree.fromstring(response.read()).findtext(
                "Code") if response.status != 200 else None))
            conn.close()
        assert statuses == [(403, "AccessDenied"), (200, None), (403, "AccessDenied"),
                            (500, "InternalError")]
        assert proxy.denied == 2

        # A faulted request's retry is never faulted, even where a fault falls due: the fault
        # waits for the next request.
        proxy.configure(fail_every=1, fault_kinds=("500",))
        proxy.reset_counters()
        statuses = []
        for key in ("a", "a", "b", "b", "b"):
            conn = connect(proxy.url)
            conn.request("PUT", f"/bkt/{key}", body=b"x")
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            conn.close()
        assert statuses == [500, 200, 500, 200, 500]
        assert proxy.stats()["forwarded"] == 2


def test_pipeline_filesystem_survives_every_kind_of_fault(fault_proxy, s3_bucket, s3_endpoint):
    fs = proxied_fs(fault_proxy, s3_bucket)
    fault_proxy.fail_every = 3
    objects = {f"{s3_bucket}/faulty/obj-{i:02d}.bin": payload(100 + i, 500 + 4099 * i)
               for i in range(40)}
    names = sorted(objects)
    # A few one at a time, the rest concurrently: botocore backs off up to 1 s before each
    # retry, so faults on sequential requests add up.
    for name in names[:5]:
        fs.pipe_file(name, objects[name])
    fs.pipe({name: objects[name] for name in names[5:]})

    fs.invalidate_cache()
    assert sorted(fs.find(f"{s3_bucket}/faulty/")) == names
    assert sorted(fs.ls(f"{s3_bucket}/faulty/", detail=False, refresh=True)) == names
    for name in names[:3]:
        assert fs.cat_file(name) == objects[name], name
    assert fs.cat(names) == objects
    with fs.open(names[-1], "rb") as f:
        assert f.read() == objects[names[-1]]
    for name in names[::7]:  # what moto holds, read past the proxy
        assert stored(s3_endpoint, s3_bucket, name.split("/", 1)[1]) == objects[name]

    stats = fault_proxy.stats()
    assert all(stats["faults"][kind] >= 3 for kind in FAULT_KINDS), stats
    assert stats["denied"] == stats["bad_gateway"] == 0
    assert stats["requests"] == stats["forwarded"] + sum(stats["faults"].values())
    # Every faulted request was retried by the client and then went through.
    history = fault_proxy.history
    for index, (method, path, outcome) in enumerate(history):
        if outcome in FAULT_KINDS:
            assert (method, path, "ok") in history[index + 1:], (method, path, outcome)


# -- permanent denials -----------------------------------------------------------------------


def test_denied_path_fails_fast_with_permission_error(fault_proxy, s3_bucket):
    fs = proxied_fs(fault_proxy, s3_bucket)
    fs.pipe_file(f"{s3_bucket}/open/ok.txt", b"ok")
    fs.pipe_file(f"{s3_bucket}/secret/data.txt", b"hidden")
    fault_proxy.configure(deny={"/secret/"}, fail_every=2)
    fs.invalidate_cache()

    started = time.monotonic()
    with pytest.raises(PermissionError):
        fs.cat_file(f"{s3_bucket}/secret/data.txt")
    with pytest.raises(PermissionError):
        with fs.open(f"{s3_bucket}/secret/data.txt", "rb") as f:
            f.read()
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{s3_bucket}/secret/new.txt", b"no")
    with pytest.raises(StorageError, match="permission denied"):
        with storage_errors(f"s3://{s3_bucket}/secret/data.txt", "read"):
            fs.cat_file(f"{s3_bucket}/secret/data.txt")
    assert time.monotonic() - started < 5
    assert fault_proxy.denied == 4  # one request each: a 403 is not retried
    # Other paths still work, faults and all; denials do not count towards fail_every.
    assert fs.cat_file(f"{s3_bucket}/open/ok.txt") == b"ok"
    assert fs.cat_file(f"{s3_bucket}/open/ok.txt") == b"ok"
    assert sum(fault_proxy.faults.values()) >= 1
