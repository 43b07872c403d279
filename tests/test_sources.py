"""Model sources: local dirs, fsspec URIs (a real moto S3 endpoint), hub ids offline."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.model import load_encoder
from pipeline.model import sources
from pipeline.model.sources import (
    DEFAULT_MODEL,
    MANIFEST,
    ModelSourceError,
    describe_source,
    resolve_model,
    resolve_model_dir,
    source_kind,
    weights_fingerprint,
)
from tests.s3server import s3_bucket, s3_endpoint  # noqa: F401
from tests.s3server import closed_port_url, s3_client, upload_dir

TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "Unigram", "vocab": []}}).encode()
PICKLE = b"\x80\x04\x95 not a real pickle, must never be downloaded"


@pytest.fixture
def model_files(parity_fixture_dir: Path) -> dict[str, bytes]:
    """A remote model folder: the tiny fixture's config + weights, a tokenizer, and a pickle."""
    return {
        "config.json": (parity_fixture_dir / "config.json").read_bytes(),
        "model.safetensors": (parity_fixture_dir / "model.safetensors").read_bytes(),
        "tokenizer.json": TOKENIZER,
        "pytorch_model.bin": PICKLE,
    }


def _file_ids(directory: Path) -> dict[str, tuple[int, int]]:
    # Inode and mtime change when a file is written again: a cheap "was it re-downloaded?" probe.
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


# --- local ---------------------------------------------------------------------------------


def test_local_dir_is_returned_resolved(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    want = (tmp_path / "m").resolve()
    assert resolve_model_dir("./m") == want
    assert resolve_model_dir("m") == want  # exists, so a path even without "./"
    assert resolve_model_dir(tmp_path / "m") == want
    assert resolve_model_dir(f"file://{tmp_path}/m") == want
    resolved = resolve_model("./m")
    assert resolved.describe() == {"model_id": str(want), "revision": None, "kind": "local"}
    assert describe_source("./m") == resolved.describe()


@pytest.mark.parametrize("source", ["/nonexistent-dir/model", "./no-such-model", "../no-such",
                                    "~/no-such-model-dir-xyz", "file:///nonexistent-dir/model"])
def test_missing_local_path_names_it(source):
    with pytest.raises(ModelSourceError, match="does not exist") as err:
        resolve_model_dir(source)
    assert source.removeprefix("file://").lstrip("~./") in str(err.value)


def test_partially_existing_path_is_local_not_hub(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert source_kind("models/nomic") == "local"
    with pytest.raises(ModelSourceError, match="'models/nomic' does not exist"):
        resolve_model_dir("models/nomic")


def test_file_is_not_a_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model_dir(tmp_path / "config.json")


def test_revision_is_refused_for_local_dirs(tmp_path):
    with pytest.raises(ModelSourceError, match="revision='v1' applies to hub repo ids only"):
        resolve_model_dir(tmp_path, revision="v1")


# --- hub -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a/b/c/d", "not a repo!!", "org/", "-org/name",
                                 "org/na--me", "org/../x", ""])
def test_malformed_hub_ids_are_refused(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that no component of `bad` exists as a path
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(bad)
    message = str(err.value)
    assert repr(bad) in message or "empty" in message or "does not exist" in message


def test_valid_hub_ids_are_hub_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for repo_id in (DEFAULT_MODEL, "org/name.v2", "A1/b_c-d"):
        assert source_kind(repo_id) == "hub"
    assert describe_source(DEFAULT_MODEL, "main") == {
        "model_id": DEFAULT_MODEL, "revision": "main", "kind": "hub"}


def _assert_points_at_local_copy(message: str) -> None:
    assert "could not reach the Hugging Face Hub at " in message
    assert f"download {DEFAULT_MODEL} --local-dir DIR" in message
    assert "pass that directory" in message


def test_hub_offline_fails_fast_with_how_to(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set it only afterwards, the way a
    # runtime environment may, and keep any escaping request on this machine.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(DEFAULT_MODEL, cache_dir=tmp_path / "hf")
    assert time.monotonic() - start < 10
    _assert_points_at_local_copy(str(err.value))
    assert "(HF_HUB_OFFLINE is set)" in str(err.value)


def test_hub_unreachable_endpoint_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline mode would short-circuit before any connection; make sure the network is tried.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    endpoint = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as err:
        resolve_model_dir(DEFAULT_MODEL, revision="main", cache_dir=tmp_path / "hf")
    assert time.monotonic() - start < 30
    _assert_points_at_local_copy(str(err.value))
    assert f"at {endpoint} for" in str(err.value) and "ConnectError" in str(err.value)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's HTTP API for one repo, ``org/model`` (files in ``REPO``), plus error cases.

    Serves what snapshot_download asks for: repo_info, the file tree, HEAD and GET of files.
    """

    REPO: dict[str, bytes] = {}
    ERRORS = {"org/missing": (404, "RepoNotFound"), "org/gated": (403, "GatedRepo"),
              "org/model/revision/nope": (404, "RevisionNotFound"), "org/down": (503, None)}

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET(body=False)

    def do_GET(self, body: bool = True):  # noqa: N802
        path = self.path.split("?")[0]
        api = path.removeprefix("/api/models/")
        if api == "org/slow":
            time.sleep(3)
        if api in ("org/model", "org/model/revision/main"):
            return self._send(200, json.dumps({"id": "org/model", "sha": COMMIT}).encode(), body)
        if api == f"org/model/tree/{COMMIT}":
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in self.REPO.items()]
            return self._send(200, json.dumps(tree).encode(), body)
        name = path.removeprefix(f"/org/model/resolve/{COMMIT}/")
        if name in self.REPO:
            data = self.REPO[name]
            return self._send(200, data, body, {"X-Repo-Commit": COMMIT,
                                                "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
        status, code = self.ERRORS.get(api, (500, None))
        self._send(status, b"", body, {"X-Error-Code": code} if code else {})

    def _send(self, status: int, data: bytes, body: bool, headers: dict | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch, model_files):
    import huggingface_hub.constants

    monkeypatch.setattr(_FakeHub, "REPO", model_files)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo_id, revision, expected", [
    ("org/missing", None, "hub repo 'org/missing' was not found"),
    ("org/gated", None, "hub repo 'org/gated' is gated"),
    ("org/model", "nope", "revision 'nope' does not exist in hub repo 'org/model'"),
    ("org/down", None, "could not reach the Hugging Face Hub at .*HfHubHTTPError.*503"),
])
def test_hub_errors_are_explained(fake_hub, tmp_path, repo_id, revision, expected):
    with pytest.raises(ModelSourceError, match=expected):
        resolve_model_dir(repo_id, revision=revision, cache_dir=tmp_path)


def test_hub_download_skips_pickles_then_works_offline(fake_hub, model_files, tmp_path,
                                                      monkeypatch):
    resolved = resolve_model("org/model", cache_dir=tmp_path)
    assert resolved.revision == COMMIT and resolved.kind == "hub"
    local = resolved.local_dir
    assert sorted(p.name for p in local.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert (local / "model.safetensors").read_bytes() == model_files["model.safetensors"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hugging Face cache now serves it
    again = resolve_model("org/model", cache_dir=tmp_path)
    assert (again.local_dir, again.revision) == (local, COMMIT)
    assert isinstance(load_encoder(local), torch.nn.Module)


def test_hub_metadata_call_is_bounded(fake_hub, tmp_path, monkeypatch):
    # huggingface_hub sends repo_info with no timeout; a stalled Hub must not hang the job.
    monkeypatch.setattr(sources, "HUB_METADATA_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="could not reach the Hugging Face Hub.*Timeout"):
        resolve_model_dir("org/slow", cache_dir=tmp_path)
    assert time.monotonic() - start < 2.5


# --- fsspec: a real S3 endpoint (moto) reached through AWS_ENDPOINT_URL only ---------------


def test_s3_model_is_downloaded_once_and_refreshed(s3_bucket, s3_endpoint, model_files,
                                                   tmp_path):
    client = s3_client(s3_endpoint)
    upload_dir(client, s3_bucket, "models/nomic-v2", model_files)
    uri = f"s3://{s3_bucket}/models/nomic-v2/"
    cache = tmp_path / "cache"

    resolved = resolve_model(uri, cache_dir=cache)
    local = resolved.local_dir
    assert local.parent == cache and local.is_dir()
    assert resolved.describe() == {"model_id": uri.rstrip("/"), "revision": None,
                                   "kind": "fsspec"}
    assert sorted(p.name for p in local.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", MANIFEST])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (local / name).read_bytes() == model_files[name], name
    assert not (local / "pytorch_model.bin").exists()
    manifest = json.loads((local / MANIFEST).read_text())
    assert manifest["uri"] == uri.rstrip("/")
    assert manifest["files"]["model.safetensors"]["size"] == len(model_files["model.safetensors"])
    assert manifest["files"]["model.safetensors"]["version"]  # the S3 ETag
    assert not [p for p in cache.iterdir() if p.name.endswith((".partial", ".stale"))]

    before = _file_ids(local)
    assert resolve_model_dir(uri.rstrip("/"), cache_dir=cache) == local  # same cache entry
    assert _file_ids(local) == before, "an unchanged remote must not be downloaded again"

    # Same size, new bytes: only the ETag tells them apart.
    changed = TOKENIZER.replace(b"Unigram", b"unigram")
    assert len(changed) == len(TOKENIZER)
    upload_dir(client, s3_bucket, "models/nomic-v2", {"tokenizer.json": changed})
    assert resolve_model_dir(uri, cache_dir=cache) == local
    assert (local / "tokenizer.json").read_bytes() == changed
    assert _file_ids(local)["model.safetensors"] != before["model.safetensors"]

    encoder = load_encoder(local)
    assert isinstance(encoder, torch.nn.Module)


def test_s3_cache_root_from_env(s3_bucket, s3_endpoint, model_files, tmp_path, monkeypatch):
    upload_dir(s3_client(s3_endpoint), s3_bucket, "m", model_files)
    monkeypatch.setenv("NOMIC_PIPELINE_CACHE", str(tmp_path / "envcache"))
    local = resolve_model_dir(f"s3://{s3_bucket}/m")
    assert local.parent == tmp_path / "envcache"


def test_s3_local_tampering_triggers_download(s3_bucket, s3_endpoint, model_files, tmp_path):
    upload_dir(s3_client(s3_endpoint), s3_bucket, "m", model_files)
    uri = f"s3://{s3_bucket}/m"
    local = resolve_model_dir(uri, cache_dir=tmp_path)
    (local / "model.safetensors").write_bytes(b"truncated")
    assert resolve_model_dir(uri, cache_dir=tmp_path) == local
    assert (local / "model.safetensors").read_bytes() == model_files["model.safetensors"]


def test_s3_prefix_without_config_names_uri(s3_bucket, s3_endpoint, model_files, tmp_path):
    upload_dir(s3_client(s3_endpoint), s3_bucket, "noconfig",
               {"model.safetensors": model_files["model.safetensors"]})
    uri = f"s3://{s3_bucket}/noconfig/"
    with pytest.raises(ModelSourceError, match="has no config.json") as err:
        resolve_model_dir(uri, cache_dir=tmp_path)
    assert f"s3://{s3_bucket}/noconfig" in str(err.value)
    assert not list(tmp_path.glob("noconfig-*"))


def test_s3_missing_prefix_and_bucket_name_uri(s3_bucket, tmp_path):
    missing_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    for uri in (f"s3://{s3_bucket}/no/such/prefix", f"s3://{missing_bucket}/m"):
        with pytest.raises(ModelSourceError) as err:
            resolve_model_dir(uri, cache_dir=tmp_path)
        assert uri in str(err.value)


def test_s3_unreachable_endpoint_fails_fast(s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    uri = "s3://some-bucket/models/nomic-v2"
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="EndpointConnectionError") as err:
        resolve_model_dir(uri, cache_dir=tmp_path)
    # A refused connection takes ~10 s with botocore's default retries, ~1-2 s with our bounds.
    assert time.monotonic() - start < 6
    assert uri in str(err.value)


# --- fsspec: in-memory filesystem for the failure paths -------------------------------------


@pytest.fixture
def memory_uri():
    root = f"/models-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    fsspec.filesystem("memory").rm(root, recursive=True)


def _put(uri: str, files: dict[str, bytes]) -> None:
    fs = fsspec.filesystem("memory")
    for name, data in files.items():
        fs.pipe(f"{uri.removeprefix('memory://')}/{name}", data)


def test_pickle_only_prefix_is_refused(memory_uri, tmp_path):
    _put(memory_uri, {"config.json": b"{}", "pytorch_model.bin": PICKLE})
    with pytest.raises(ModelSourceError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        resolve_model_dir(memory_uri, cache_dir=tmp_path)


def test_interrupted_download_leaves_no_complete_dir(memory_uri, model_files, tmp_path,
                                                     monkeypatch):
    _put(memory_uri, model_files)

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_sha256_file", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(memory_uri, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    local = resolve_model_dir(memory_uri, cache_dir=tmp_path)
    assert (local / "model.safetensors").read_bytes() == model_files["model.safetensors"]


def test_s3_bounds_merge_with_user_options():
    options = sources._storage_options("s3", {"config_kwargs": {"region_name": "eu-west-1"},
                                              "anon": True})
    assert options["anon"] is True and options["skip_instance_cache"] is True
    assert options["config_kwargs"]["region_name"] == "eu-west-1"
    assert options["config_kwargs"]["connect_timeout"] == sources.S3_CONNECT_TIMEOUT_S
    assert sources._storage_options("memory", {}) == {"skip_instance_cache": True}


# --- fingerprint ---------------------------------------------------------------------------


def test_weights_fingerprint_tracks_every_byte(parity_fixture_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(parity_fixture_dir / name, tmp_path / name)
    first = weights_fingerprint(tmp_path)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert weights_fingerprint(tmp_path) == first
    (tmp_path / "notes.txt").write_text("not a weight file")
    assert weights_fingerprint(tmp_path) == first

    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(tmp_path) != first
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(tmp_path) == first
    os.utime(weights, ns=(0, 0))  # metadata is not content
    assert weights_fingerprint(tmp_path) == first


@pytest.mark.parametrize("error, expected", [
    (PermissionError("AccessDenied"), "permission denied"),
    (FileNotFoundError("bucket/x"), "no such bucket or prefix"),
    (ConnectionResetError("reset by peer"), "ConnectionResetError: reset by peer"),
])
def test_backend_errors_name_uri_and_cause(error, expected):
    with pytest.raises(ModelSourceError, match=expected) as err:
        with sources._remote_errors("s3://b/x", "list"):
            raise error
    assert "s3://b/x" in str(err.value) and err.value.__cause__ is error


def test_unknown_protocol_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="foo://bucket/x.*Protocol not known"):
        resolve_model_dir("foo://bucket/x", cache_dir=tmp_path)
