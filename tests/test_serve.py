"""``pipeline/serve``: the OpenAI-compatible query service.

In process (no Ray): the request contract and its refusals, tokenizing as the batch job does,
pieces, the queue limit, the served model's id, and ``--expect-output`` against batch outputs
recorded by the batch job's own functions (one from other weights, one with another tokenizer).

On Ray (one service for the module, on 127.0.0.1): the unmodified ``openai`` client, every
error status with its envelope, 64 concurrent clients, the queue limit giving 429, the
documented metrics, the request logs, and (the last test) a stop that answers the requests in
flight. The model is
768 wide (2 layers, random weights, the tiny tokenizer), so the widths are the real model's
768/512/256.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import re
import shutil
import socket
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.io.storage import open_filesystem
from pipeline.model.builder import build_model_dir, sample_texts
from pipeline.model.config import EncoderConfig
from pipeline.preflight import load_model_info
from pipeline.serve.admission import Admission, QueueFull
from pipeline.serve.config import ServeConfig, config_from_strings
from pipeline.serve.identity import (ServedModel, check_expected_output, dtype_warning,
                                     load_served_model)
from pipeline.serve.inputs import QueryTokenizer, join_pieces, split_pieces, take_batch
from pipeline.serve.protocol import ApiError, embedding_response, parse_request
from pipeline.snapshots import publish
from pipeline.units import run_identity, write_identity

WIDE = EncoderConfig(vocab_size=1024, hidden_size=768, num_layers=2, num_heads=12, ffn_size=256,
                     num_experts=4, top_k=2)
WIDTHS = (768, 512, 256)
KEY = "test-key"
# The service's queue limit: the 64-client test's requests fit in it all at once. The queue
# test lowers it (as a user_config update does) so that no two of its requests fit together.
QUEUE_TOKENS = 65536
SMALL_QUEUE_TOKENS = 64
BODY_LIMIT = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def wide_model(out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A 768-wide random-weight model with the tiny model's tokenizer."""
    build_model_dir(out, cfg=WIDE, seed=seed, with_tokenizer=False)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The served model, one with other weights, one with another tokenizer."""
    root = tmp_path_factory.mktemp("serve-models")
    served = wide_model(root / "wide", tiny_model_dir)
    other = wide_model(root / "other-weights", tiny_model_dir, seed=1)
    retok = root / "other-tokenizer"
    shutil.copytree(served, retok)
    spec = json.loads((retok / "tokenizer.json").read_text())
    piece, score = spec["model"]["vocab"][10]
    spec["model"]["vocab"][10] = [piece, score - 1.0]  # same pieces, one score changed
    (retok / "tokenizer.json").write_text(json.dumps(spec))
    return {"wide": served, "other-weights": other, "other-tokenizer": retok}


def batch_output(out: Path, model: Path, dims=WIDTHS, dtype: str = "float32") -> Path:
    """An output folder holding what a batch run of ``model`` records (its _run.json)."""
    config = RunConfig(input="unused", output=str(out), model=str(model), dims=dims)
    identity = run_identity(config, dtype, load_model_info(config))
    fs, path = open_filesystem(str(out))
    write_identity(fs, path, identity)
    return out


@pytest.fixture(scope="module")
def wide_embedder(models):
    from pipeline import Embedder

    return Embedder.from_pretrained(models["wide"], device="cpu", dtype="float32")


def served_model(models) -> ServedModel:
    return load_served_model(ServeConfig(model=str(models["wide"]), dims=WIDTHS))


def texts_of(tokens: list[int], tokenizer: QueryTokenizer, offset: int = 0) -> list[str]:
    """Texts of the given token counts or just over (with the query prefix, <s> and </s>),
    from the bundled sample."""
    words = " ".join(sample_texts()).split()
    out = []
    for i, n in enumerate(tokens):
        start = (offset + 37 * i) % (len(words) - 600)

        def count(k: int) -> int:
            text = "search_query: " + " ".join(words[start:start + k])
            return int(tokenizer.tokenizer.encode([text]).lengths[0])

        lo, hi = 1, n
        while lo < hi:  # the fewest words reaching n tokens
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(mid) < n else (lo, mid)
        out.append(" ".join(words[start:start + lo]))
    return out


# ---------------------------------------------------------------------------------------------
# the contract, in process


@pytest.mark.parametrize("body, param, words", [
    ([1, 2], None, "JSON object"),
    ({"model": "m"}, "input", "required"),
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty list"),
    ({"input": ["a"] * 2049}, "input", "2049 strings"),
    ({"input": [1, 2, 3]}, "input", "token-id inputs are refused"),
    ({"input": [[1, 2], [3]]}, "input", "token-id inputs are refused"),
    ({"input": 5}, "input", "not a number"),
    ({"input": ["a", None]}, "input", "input[1] is null"),
    ({"input": "a", "dimensions": 100}, "dimensions", "offers [768, 512, 256]"),
    ({"input": "a", "dimensions": "256"}, "dimensions", "must be an integer, not a string"),
    ({"input": "a", "dimensions": True}, "dimensions", "must be an integer"),
    ({"input": ["a", 5]}, "input", "input[1] is a number, not a string"),  # not token ids
    ({"input": [["a"]]}, "input", "input[0] is a list, not a string"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'int8' is not one of"),
    ({"input": "a", "task": "search"}, "task", "'search' is not one of"),
    ({"input": "a", "dimension": 256}, "dimension", "unknown field"),
    ({"input": "a", "user": 5}, "user", "must be a string"),
])
def test_bad_requests_are_400_naming_the_field(body, param, words):
    with pytest.raises(ApiError) as caught:
        parse_request(body, WIDTHS, 2048)
    err = caught.value
    assert err.status == 400 and err.param == param and words in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_a_good_request_and_its_defaults():
    req = parse_request({"input": "hello", "model": "m"}, WIDTHS, 2048)
    assert (req.texts, req.width, req.encoding, req.task) == (("hello",), 768, "float", "query")
    req = parse_request({"input": ["a", "b"], "dimensions": 256, "encoding_format": "base64",
                         "task": "document", "user": "u1"}, WIDTHS, 2048)
    assert (req.texts, req.width, req.encoding, req.task, req.user) == (
        ("a", "b"), 256, "base64", "document", "u1")


def test_response_encodings_carry_the_same_float32_bits():
    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    as_float = embedding_response(vectors, "float", "m", 7)
    as_b64 = embedding_response(vectors, "base64", "m", 7)
    assert [d["index"] for d in as_float["data"]] == [0, 1, 2]
    assert as_float["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    for f, b, v in zip(as_float["data"], as_b64["data"], vectors):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), "<f4")
        from_json = np.asarray(json.loads(json.dumps(f["embedding"])), np.float32)
        assert decoded.tobytes() == v.tobytes() == from_json.tobytes()


def test_tokenizing_is_the_embedders_with_the_prefix_once(models, wide_embedder):
    tok = QueryTokenizer((models["wide"] / "tokenizer.json").read_text())
    texts = ("what is a mixture of experts?", "search_query: already prefixed", "zwei Wörter")
    for task in ("query", "document", "classification", "clustering"):
        ours, theirs = tok.tokenize(texts, task), wide_embedder.tokenize(texts, task)
        assert np.array_equal(ours.ids, theirs.ids)
        assert np.array_equal(ours.lengths, theirs.lengths)
    once = tok.tokenize(("search_query: x",), "query")
    assert once.lengths[0] == tok.tokenize(("x",), "query").lengths[0]


def test_over_long_texts_are_refused_unless_truncating(models):
    spec = (models["wide"] / "tokenizer.json").read_text()
    long_text = "word " * 2000
    with pytest.raises(ApiError) as caught:
        QueryTokenizer(spec).tokenize(("short", long_text), "query")
    err = caught.value
    assert err.status == 400 and err.code == "input_too_long"
    assert "input[1]" in err.message and "over the model's 512" in err.message
    count = int(err.message.split(" has ")[1].split(" tokens")[0])
    assert count > 2000
    batch = QueryTokenizer(spec, truncate=True).tokenize(("short", long_text), "query")
    assert batch.lengths[1] == 512 and batch.truncated[1]


def test_pieces_keep_order_within_the_budget(models):
    tok = QueryTokenizer((models["wide"] / "tokenizer.json").read_text())
    texts = tuple(texts_of([20, 300, 40, 500, 8, 250, 260], tok))
    batch = tok.tokenize(texts, "query")
    pieces = split_pieces(batch, 256, 600)
    assert all(p.tokens <= 600 for p in pieces) and len(pieces) > 2
    joined, rows = join_pieces(pieces)
    assert np.array_equal(joined.ids, batch.ids) and np.array_equal(joined.lengths, batch.lengths)
    assert rows[0][0] == 0 and rows[-1][1] == len(texts)
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_the_encoders_queue_takes_what_waits_up_to_the_budget(models):
    tok = QueryTokenizer((models["wide"] / "tokenizer.json").read_text())
    batch = tok.tokenize(tuple(texts_of([300, 100, 150, 40, 500], tok)), "query")
    pieces = split_pieces(batch, 256, 1)  # budget 1: one sequence a piece
    loop = asyncio.new_event_loop()
    futures = [loop.create_future() for _ in pieces]
    futures[2].cancel()  # its caller went away
    waiting = collections.deque(zip(pieces, futures))
    sizes = [p.tokens for p in pieces]
    first = take_batch(waiting, sizes[0] + sizes[1] + sizes[3])  # the 3rd is skipped
    assert [p.tokens for p, _ in first] == [sizes[0], sizes[1], sizes[3]]
    assert [p.tokens for p, _ in take_batch(waiting, 1)] == [sizes[4]]  # the first always
    assert not waiting and take_batch(waiting, 10_000) == []
    loop.close()


def test_queue_limit_and_retry_after():
    now = [0.0]
    queue = Admission(1000, clock=lambda: now[0])
    queue.admit(5000)  # alone: a request over the limit is taken when nothing waits
    with pytest.raises(QueueFull) as caught:
        queue.admit(1)
    assert caught.value.retry_after == 1  # no rate measured yet
    now[0] = 2.0
    queue.release(5000)
    queue.admit(600)
    queue.admit(400)
    with pytest.raises(QueueFull) as caught:
        queue.admit(1)
    # 5000 tokens answered in the 2 s since the first request: 2500/s; 1000 queued -> 1 s
    assert caught.value.retry_after == 1 and caught.value.queued == 1000
    now[0] = 2.5
    queue.max_tokens = 100_000
    queue.admit(20_000)
    queue.max_tokens = 21_000
    with pytest.raises(QueueFull) as caught:
        queue.admit(2000)
    assert caught.value.retry_after == 11  # 21,000 tokens at 5,000 / 2.5 s
    now[0] = 100.0
    assert queue.rate() == 0 and queue.retry_after() == 1  # nothing answered lately


def test_request_log_lines_leave_out_what_the_request_did_not_give():
    from pipeline.serve.app import request_log_line

    line = request_log_line(200, 0.0234, {"inputs": 2, "tokens": 31, "width": 256,
                                          "task": "query", "encoding": "base64", "user": None})
    assert line == ("embeddings status=200 ms=23.4 inputs=2 tokens=31 width=256 task=query "
                    "encoding=base64")
    assert request_log_line(401, 0.0, {}) == "embeddings status=401 ms=0.0"


def test_served_model_id_and_names(models):
    served = served_model(models)
    assert served.fingerprint.startswith("sha256:") and served.name == "wide"
    assert served.id == f"wide@{served.fingerprint[:19]}"
    for name in (None, served.id, "wide", f"wide@{served.fingerprint}"):
        assert served.accepts(name)
    for name in ("nomic-embed-text-v2-moe", "wide@sha256:000000000000", "text-embedding-3-small"):
        assert not served.accepts(name)


def test_options_from_strings_as_serve_run_gives_them():
    config = config_from_strings({"model": "m", "dims": "512,256", "truncate": "true",
                                  "max_queued_tokens": "100"})
    assert (config.dims, config.truncate, config.max_queued_tokens) == ((512, 256), True, 100)
    with pytest.raises(ValueError, match="unknown serve option"):
        config_from_strings({"dimz": "1"})
    with pytest.raises(ValueError, match="max_batch_tokens must be at least 512"):
        ServeConfig(max_batch_tokens=100)
    from pipeline.serve.app import app_builder

    # before any model is looked at; `serve run` has no --host/--port to point to
    with pytest.raises(ValueError, match="http_options of a Serve config file"):
        app_builder({"model": "nomic-ai/nomic-embed-text-v2-moe", "port": "8001"})


# ---------------------------------------------------------------------------------------------
# --expect-output, in process


def test_expect_output_accepts_the_same_weights_and_follows_latest(models, tmp_path):
    served = served_model(models)
    out = batch_output(tmp_path / "out", models["wide"])
    assert check_expected_output(str(out), served)["model_fingerprint"] == served.fingerprint
    root = tmp_path / "nightly"
    batch_output(root / "snapshot-20260101T000000Z", models["wide"], dims=(256,))
    fs, path = open_filesystem(str(root))
    publish(fs, path, "snapshot-20260101T000000Z")
    for uri in (root, root / "_LATEST"):
        identity = check_expected_output(str(uri), served)
        assert identity["dims"] == [256]
        assert identity["output"] == str(root / "snapshot-20260101T000000Z")  # what /ready shows


@pytest.mark.parametrize("other, words", [
    ("other-weights", "weights differ"),
    ("other-tokenizer", "tokenizer differs"),
])
def test_expect_output_refuses_other_weights_or_tokenizer(models, tmp_path, other, words):
    served = served_model(models)
    out = batch_output(tmp_path / "out", models[other])
    with pytest.raises(UserError) as caught:
        check_expected_output(str(out), served)
    message = str(caught.value)
    assert words in message and str(out) in message
    if other == "other-weights":
        assert served.fingerprint in message
        assert load_served_model(ServeConfig(model=str(models[other]), dims=WIDTHS)
                                 ).fingerprint in message
    else:
        assert "weights differ" not in message and served.tokenizer_sha256 in message


def test_expect_output_refuses_widths_not_offered_and_warns_on_dtype(models, tmp_path):
    served = load_served_model(ServeConfig(model=str(models["wide"]), dims=(512,)))
    out = batch_output(tmp_path / "out", models["wide"], dims=(768, 512))
    with pytest.raises(UserError, match=r"widths \[768\] of the output are not offered"):
        check_expected_output(str(out), served)
    with pytest.raises(UserError, match="no _manifest/_run.json"):
        check_expected_output(str(tmp_path / "nothing"), served)
    identity = {"dtype": "bfloat16"}
    assert "computed in bfloat16, this service computes in float32" in dtype_warning(
        identity, "float32")
    assert dtype_warning(identity, "bfloat16") is None


def test_the_command_refuses_a_mismatched_output_before_ray(models, tmp_path, capsys):
    import ray

    out = batch_output(tmp_path / "out", models["other-weights"])
    code = main(["serve", "--model", str(models["wide"]), "--expect-output", str(out)])
    assert code == 2 and not ray.is_initialized()
    err = capsys.readouterr().err
    assert "weights differ" in err and "--expect-output" in err
    assert main(["serve", "--dims", "768,768"]) == 2  # refused before the model is looked at


def test_the_command_names_dims_when_the_model_is_narrower(tiny_model_dir, capsys):
    import ray

    assert main(["serve", "--model", str(tiny_model_dir)]) == 2 and not ray.is_initialized()
    err = capsys.readouterr().err
    assert "--dims 768,512,256: width 768" in err and "is 64 wide" in err


def test_the_command_refuses_a_busy_port_before_ray(models, capsys):
    import ray

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--model", str(models["wide"]), "--port", str(port)])
    assert code == 2 and not ray.is_initialized()
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_port_a_stopped_service_left_in_time_wait_is_free_to_listen_on():
    """A service restarted right after a stop: its old connections sit in TIME-WAIT for a
    minute; the pre-start check binds as Serve's proxy does (SO_REUSEADDR) and lets it
    start, where a plain bind is refused."""
    import time

    from pipeline.serve.server import check_listen

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server's side closes first: its end goes to TIME-WAIT
        time.sleep(0.05)
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    check_listen("127.0.0.1", port)  # no error


# ---------------------------------------------------------------------------------------------
# the running service (Ray Serve)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_service(models, tmp_path_factory):
    """The service on 127.0.0.1, started once for the module, checked against a batch output
    of the same weights: ``(service, stop)``. The module's last test calls ``stop``; Serve
    and its Ray are shut down at the end in any case."""
    import ray

    from pipeline.serve.server import running

    out = batch_output(tmp_path_factory.mktemp("serve-out") / "out", models["wide"])
    config = ServeConfig(model=str(models["wide"]), dims=WIDTHS, port=free_port(),
                         expect_output=str(out), max_queued_tokens=QUEUE_TOKENS,
                         max_body_bytes=BODY_LIMIT, device="cpu", dtype="float32")
    with pytest.MonkeyPatch.context() as env, contextlib.ExitStack() as stack:
        # Ray's processes export metrics every second (default 10 s): the metrics test waits less.
        env.setenv("RAY_metrics_report_interval_ms", "1000")
        svc = stack.enter_context(running(config, api_key=KEY))
        yield svc, stack.close
    assert not ray.is_initialized()


@pytest.fixture
def service(running_service):
    return running_service[0]


def client(service, **kw):
    import openai

    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=0, **kw)


@pytest.mark.ray
def test_openai_client_gets_the_batch_jobs_vectors(service, wide_embedder):
    c = client(service)
    one = c.embeddings.create(model=service.served.id, input="what is a mixture of experts?",
                              encoding_format="float")
    want = wide_embedder.encode(["what is a mixture of experts?"], task="query", dims=WIDTHS)
    assert len(one.data) == 1 and one.model == service.served.id
    np.testing.assert_allclose(one.data[0].embedding, want[768][0], atol=1e-5)
    texts = ["erste Frage", "a second, longer question about packed batches?", "三つ目"]
    ids = wide_embedder.tokenize(texts, "query")
    for width in WIDTHS:
        got = c.embeddings.create(model="wide", input=texts, dimensions=width)  # base64 asked
        assert [d.index for d in got.data] == [0, 1, 2]
        vectors = np.asarray([d.embedding for d in got.data], np.float32)
        assert vectors.shape == (3, width)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(vectors, want_cut(wide_embedder, texts, width), atol=1e-5)
        assert got.usage.prompt_tokens == got.usage.total_tokens == int(ids.lengths.sum())
        as_float = c.embeddings.create(model="wide", input=texts, dimensions=width,
                                       encoding_format="float")
        floats = np.asarray([d.embedding for d in as_float.data], np.float32)
        assert floats.tobytes() == vectors.tobytes()  # base64 and float: the same bits
    doc = c.embeddings.create(model="wide", input=texts[:1], extra_body={"task": "document"},
                              encoding_format="float")
    np.testing.assert_allclose(doc.data[0].embedding, wide_embedder.encode(
        texts[:1], task="document", dims=(768,))[768][0], atol=1e-5)


def want_cut(embedder, texts, width):
    """What the batch job writes for ``width``: Embedder.encode's cut and re-normalised
    vectors (the same function as the job's encoder stage)."""
    return embedder.encode(texts, task="query", dims=(width,))[width]


@pytest.mark.ray
def test_models_health_ready_and_the_fingerprint_header(service):
    h = {"Authorization": f"Bearer {KEY}"}
    models = requests.get(f"{service.url}/v1/models", headers=h).json()["data"]
    assert [m["id"] for m in models] == [service.served.id]
    assert models[0]["weights_fingerprint"] == service.served.fingerprint
    assert models[0]["dimensions"] == list(WIDTHS) and models[0]["dtype"] == "float32"
    r = requests.post(f"{service.url}/v1/embeddings", headers=h, json={"input": "x"})
    assert r.headers["x-weights-fingerprint"] == service.served.fingerprint
    assert requests.get(f"{service.url}/health").json() == {"status": "ok"}
    ready = requests.get(f"{service.url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["expected_output"] and ready.json()["warnings"] == []


@pytest.mark.ray
def test_every_error_has_its_status_and_envelope(service):
    url, h = f"{service.url}/v1/embeddings", {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({}, {"input": "x"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer wrong"}, {"input": "x"}, 401, "invalid_api_key"),
        (h, {"input": ""}, 400, None),
        (h, {"input": []}, 400, None),
        (h, {"input": ["q"] * 2049}, 400, None),
        (h, {"input": "word " * 600}, 400, "input_too_long"),
        (h, {"input": "x", "dimensions": 300}, 400, None),
        (h, {"input": "x", "encoding_format": "ubinary"}, 400, None),
        (h, {"input": [[5, 6, 7]]}, 400, "token_ids_refused"),
        (h, {"input": "x", "model": "text-embedding-3-small"}, 404, "model_not_found"),
        (h, {"input": ["x" * 1000] * 1100}, 413, "request_too_large"),
    ]
    for headers, body, status, code in cases:
        r = requests.post(url, headers=headers, json=body, timeout=30)
        assert r.status_code == status, (body if len(str(body)) < 100 else status, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["code"] == code
    def streamed():  # no Content-Length: the body is refused once it passes the limit
        for _ in range(BODY_LIMIT // 65536 + 1):
            yield b" " * 65536

    r = requests.post(url, headers=h, data=streamed(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert f"is over {BODY_LIMIT} bytes" in r.json()["error"]["message"]
    r = requests.post(url, headers=h, data=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = requests.get(f"{service.url}/v1/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    import openai

    with pytest.raises(openai.NotFoundError, match="is not served here") as caught:
        client(service).embeddings.create(model="nomic-embed-text-v1", input="x")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service.url}/v1", api_key="nope", max_retries=0
                      ).embeddings.create(model="wide", input="x")


def mixed_requests(tok: QueryTokenizer, n: int = 64):
    """``n`` requests of 1-3 query-length texts (5-40 tokens; every 16th also a 120-token
    one), each at one of the widths."""
    rng = np.random.default_rng(0)
    requests = []
    for i in range(n):
        lengths = [int(x) for x in rng.integers(5, 41, int(rng.integers(1, 4)))]
        if i % 16 == 3:
            lengths.insert(1, 120)
        requests.append((texts_of(lengths, tok, offset=i * 11), WIDTHS[i % 3]))
    return requests


def expected_vectors(embedder, requests) -> list[np.ndarray]:
    """Each request's vectors as ``Embedder.encode`` gives them (one call per width)."""
    out = [None] * len(requests)
    for width in WIDTHS:
        mine = [i for i, (_, w) in enumerate(requests) if w == width]
        texts = [t for i in mine for t in requests[i][0]]
        vectors, start = want_cut(embedder, texts, width), 0
        for i in mine:
            out[i] = vectors[start:start + len(requests[i][0])]
            start += len(requests[i][0])
    return out


async def post_all(url: str, bodies: list[dict]) -> list[tuple[int, dict, dict]]:
    """All the bodies posted at once: ``(status, headers, json)`` of each, in order."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"},
                                     connector=aiohttp.TCPConnector(limit=128),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def post(body):
            async with session.post(url, json=body) as r:
                return r.status, dict(r.headers), await r.json()

        return await asyncio.gather(*(post(b) for b in bodies))


@pytest.mark.ray
def test_64_concurrent_clients_get_their_own_vectors_in_order(service, models, wide_embedder):
    tok = QueryTokenizer((models["wide"] / "tokenizer.json").read_text())
    requests_ = mixed_requests(tok)
    total = sum(int(tok.tokenize(tuple(t), "query").lengths.sum()) for t, _ in requests_)
    assert total < QUEUE_TOKENS  # all of them may be in flight at once
    bodies = [{"input": texts, "dimensions": w, "encoding_format": "base64"}
              for texts, w in requests_]
    before = service.encoder_stats()
    responses = asyncio.run(post_all(f"{service.url}/v1/embeddings", bodies))
    assert [status for status, _, _ in responses] == [200] * len(bodies)  # none lost
    after = service.encoder_stats()
    # the requests were batched together (the encoder's own queue), all of them encoded
    assert after["pieces"] - before["pieces"] == len(bodies)
    assert after["batches"] - before["batches"] < len(bodies)
    for (texts, _), want, (_, _, body) in zip(requests_, expected_vectors(wide_embedder,
                                                                          requests_), responses):
        data = body["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
        np.testing.assert_allclose(got, want, atol=1e-5)


def set_queue_limit(tokens: int) -> None:
    """The ingress's queue limit changed in place, as Serve does on a user_config update."""
    from ray import serve

    from pipeline.serve.app import APP_NAME, Limits

    limits = Limits(2048, BODY_LIMIT, tokens, False)
    serve.get_deployment_handle("Ingress", APP_NAME).reconfigure.remote(
        dataclasses.asdict(limits)).result()


@pytest.mark.ray
def test_a_full_queue_answers_429_at_once_not_a_hang(service, models, wide_embedder):
    tok = QueryTokenizer((models["wide"] / "tokenizer.json").read_text())
    texts = texts_of([30, 30, 30], tok)  # ~90 tokens: no two requests fit in the queue
    assert int(tok.tokenize(tuple(texts), "query").lengths.sum()) > SMALL_QUEUE_TOKENS
    want = want_cut(wide_embedder, texts, 256)
    set_queue_limit(SMALL_QUEUE_TOKENS)
    try:
        statuses = []
        for _ in range(5):  # a burst in which no two requests overlap is retried
            started = time.monotonic()
            responses = asyncio.run(post_all(f"{service.url}/v1/embeddings",
                                             [{"input": texts, "dimensions": 256}] * 16))
            assert time.monotonic() - started < 60
            statuses = [status for status, _, _ in responses]
            if 429 in statuses:
                break
    finally:
        set_queue_limit(QUEUE_TOKENS)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    for status, headers, body in responses:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "queue_full" and "retry after" in body["error"][
                "message"]
        else:
            np.testing.assert_allclose([d["embedding"] for d in body["data"]], want, atol=1e-5)


@pytest.mark.ray
def test_request_logs_hold_no_text(service):
    marker = "zebracorn-marker-text"
    r = requests.post(f"{service.url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                   json={"input": [marker, "x"], "user": "u-42"})
    assert r.status_code == 200
    logs = Path(service.logs_dir)  # this Ray's own logs (ray.init's address_info)
    time.sleep(0.5)  # the replica's log handler writes asynchronously
    text = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()
                   and p.suffix in (".log", ".out", ".err"))
    assert "embeddings status=200" in text and "inputs=2" in text and "user=u-42" in text
    assert marker not in text


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """The Prometheus text at ``url`` as ``(name, labels, value)`` samples."""
    samples = []
    for line in requests.get(url, timeout=10).text.splitlines():
        match = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
            samples.append((match[1], labels, float(match[3])))
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (over replicas and Ray's own labels)."""
    return sum(v for n, got, v in samples if n == name and labels.items() <= got.items())


def documented_metrics() -> list[str]:
    """The metric names docs/serve.md's table gives, as Prometheus shows them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `ray_embeddings_")]
    return sorted({name for row in rows for name in re.findall(r"`(ray_embeddings_\w+)`",
                                                               row.split("|")[1])})


@pytest.mark.ray
def test_the_documented_metrics_appear_and_move(service):
    names = documented_metrics()
    assert len(names) == 9 and service.metrics_url.endswith("/metrics")
    h = {"Authorization": f"Bearer {KEY}"}
    url = f"{service.url}/v1/embeddings"
    before = scrape(service.metrics_url)
    while True:  # the earlier tests' requests exported: two scrapes a second apart agree
        time.sleep(1.2)
        again = scrape(service.metrics_url)
        if total(again, "ray_embeddings_inputs_total") == total(before,
                                                               "ray_embeddings_inputs_total"):
            break
        before = again
    tokens = 0
    for body in ({"input": ["one question", "two"]}, {"input": "three", "dimensions": 256}):
        r = requests.post(url, headers=h, json=body, timeout=30)
        assert r.status_code == 200
        tokens += r.json()["usage"]["prompt_tokens"]
    assert requests.post(url, headers=h, json={"input": ""}, timeout=30).status_code == 400
    assert requests.get(f"{service.url}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{service.url}/v1/models/wide", headers=h, timeout=30).ok
    moves = {  # (name, labels): the least it must have moved by
        ("ray_embeddings_requests_total", ("200", "/v1/embeddings")): 2,
        ("ray_embeddings_requests_total", ("400", "/v1/embeddings")): 1,
        ("ray_embeddings_requests_total", ("401", "/v1/models")): 1,
        ("ray_embeddings_requests_total", ("200", "/v1/models/{model}")): 1,
        ("ray_embeddings_inputs_total", ()): 3,
        ("ray_embeddings_tokens_total", ()): tokens,
        ("ray_embeddings_latency_s_count", ("200",)): 2,
        ("ray_embeddings_latency_s_count", ("400",)): 1,
        ("ray_embeddings_batch_tokens_count", ()): 2,
        ("ray_embeddings_batch_requests_count", ()): 1,
        ("ray_embeddings_batch_s_count", ()): 1,
    }

    def moved(samples) -> dict:
        out = {}
        for name, tags in moves:
            labels = dict(zip(("status", "route"), tags))
            out[name, tags] = total(samples, name, **labels) - total(before, name, **labels)
        return out

    def shown_all(samples) -> bool:  # a gauge appears with the process's next export
        shown = {n for n, _, _ in samples}
        return all(name in shown or f"{name}_count" in shown for name in names)

    deadline = time.monotonic() + 40  # Ray exports each process's metrics every second here
    while True:
        after = scrape(service.metrics_url)
        got = moved(after)
        if all(got[k] >= v for k, v in moves.items()) and shown_all(after) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    short = {f"{name}{tags}": (got[name, tags], least)
             for (name, tags), least in moves.items() if got[name, tags] < least}
    assert not short, short  # (moved by, at least)
    assert got["ray_embeddings_inputs_total", ()] == 3  # exactly: what was embedded
    assert got["ray_embeddings_tokens_total", ()] == tokens
    shown = {n for n, _, _ in after}
    for name in names:  # a histogram shows as _bucket/_count/_sum
        assert name in shown or f"{name}_count" in shown, (name, sorted(
            n for n in shown if n.startswith("ray_embeddings")))
    assert total(after, "ray_embeddings_queued_tokens") == 0  # nothing in flight now
    assert total(after, "ray_embeddings_encoder_queue") == 0


@pytest.mark.ray
def test_stopping_answers_the_requests_in_flight(running_service):
    """The module's last test: it stops the service, as SIGINT/SIGTERM does, while a large
    request is being embedded; the request is answered (``serve.shutdown`` alone kills Serve's
    proxy at once, and the client got no answer)."""
    service, stop = running_service
    texts = [f"question {i}: how are the tokens of a long question routed to experts?"
             for i in range(600)]
    before = service.encoder_stats()["batches"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.post, f"{service.url}/v1/embeddings",
                             headers={"Authorization": f"Bearer {KEY}"},
                             json={"input": texts, "dimensions": 256}, timeout=120)
        deadline = time.monotonic() + 60
        while service.encoder_stats()["batches"] == before:  # its first batch is done
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert not answer.done()  # still in flight when the stop begins
        started = time.monotonic()
        stop()
        stopped_s = time.monotonic() - started
        r = answer.result()
    assert r.status_code == 200, r.text[:500]
    assert [d["index"] for d in r.json()["data"]] == list(range(len(texts)))
    assert stopped_s < 30
