"""Nothing lost, nothing duplicated: killed drivers, killed actors, flaky S3, resumes.

Real processes throughout: a local Ray cluster started here, drivers run as subprocesses of
``python -m pipeline run`` connected to it (so one can be SIGKILLed), moto's S3 server on
127.0.0.1, and a fault-injecting proxy in front of it (``tests/faultproxy.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import Embedder
from pipeline.cli import main
from pipeline.model.builder import sample_texts
from pipeline.model.cpu import has_bf16_matmul
from tests.faultproxy import fault_proxy  # noqa: F401
from tests.helpers import ray_worker_pids, read_output, s3
from tests.s3server import s3_bucket, s3_client, s3_endpoint, upload_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]
DIMS = "64,32"




def corpus(shards: int, rows: int) -> dict[str, bytes]:
    texts = sample_texts()
    out = {}
    for s in range(shards):
        lines = [json.dumps({"id": s * rows + i, "text": f"{texts[(s + i) % len(texts)]} {s}.{i}"})
                 for i in range(rows)]
        out[f"shard-{s:02d}.jsonl"] = "\n".join(lines).encode()
    return out


def texts_by_id(files: dict[str, bytes]) -> dict[int, str]:
    rows = [json.loads(line) for data in files.values() for line in data.splitlines()]
    return {r["id"]: r["text"] for r in rows}


def command(input_uri: str, output_uri: str, model: Path, address: str, endpoint: str,
            *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--input", input_uri, "--output",
            output_uri, "--model", str(model), "--dims", DIMS, "--address", address,
            "--s3-endpoint", endpoint, "--progress", "off", *extra]


def start(cmd: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    return (tmp_path / f"{name}.log").read_text()


def check_exact(table: pa.Table, texts: dict[int, str], embedder: Embedder) -> None:
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(texts), "output ids must equal input ids"
    want = embedder.encode([texts[i] for i in ids], dims=(64, 32))
    for d in (64, 32):
        got = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want[d], atol=1e-5, rtol=0)


def manifests(fs, uri: str) -> list[str]:
    path = uri.removeprefix("s3://").rstrip("/") + "/_manifest"
    try:
        return [p for p in fs.ls(path, refresh=True) if "/unit-" in p]
    except FileNotFoundError:
        return []


def run_here(cmd: list[str], caplog) -> tuple[int, str]:
    """The same command in this process (connected to the module's cluster): its exit code
    and its log."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        code = main(cmd[3:])
    return code, caplog.text


def test_driver_killed_then_the_same_command_finishes_exactly(
        cluster, s3_endpoint, s3_bucket, fault_proxy, tiny_model_dir, embedder, tmp_path, caplog):
    files = corpus(shards=8, rows=20)
    upload_dir(s3_client(s3_endpoint), s3_bucket, "kill", files)
    out = f"s3://{s3_bucket}/kill-out/"
    # Slow storage, small writes: units commit one by one over several seconds.
    fault_proxy.delay_s = 0.03
    cmd = command(f"s3://{s3_bucket}/kill/", out, tiny_model_dir, cluster, fault_proxy.url,
                  "--window-rows", "16", "--rows-per-file", "8")
    fs = s3(s3_endpoint)
    proc = start(cmd, tmp_path, "first")
    deadline = time.monotonic() + 180
    while len(manifests(fs, out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    log = finish(proc, tmp_path, "first")
    committed = len(manifests(fs, out))
    assert proc.returncode == -signal.SIGKILL, log[-2000:]
    assert 2 <= committed < 8, f"the kill must land mid-run ({committed} units committed)"
    assert not fs.exists(out.removeprefix("s3://") + "_summary.json")

    time.sleep(2)  # the killed driver's tasks are gone with it
    # The same command again (in this process: a driver's start-up is not what is tested),
    # on the store itself: the slow storage was there to land the kill mid-run.
    cmd = [s3_endpoint if arg == fault_proxy.url else arg for arg in cmd]
    code, log = run_here(cmd, caplog)
    assert code == 0, log[-3000:]
    table, summary = read_output(fs, out)
    check_exact(table, texts_by_id(files), embedder)
    assert summary["reconciled"] and summary["rows_in"] == summary["rows_embedded"] == 160
    assert summary["units"]["resumed"] >= committed and summary["units"]["committed"] == 8
    assert f"{summary['units']['resumed']} of 8 unit(s) committed earlier are kept" in log

    # Once more: everything is committed, nothing is redone, the output is unchanged.
    code, log = run_here(cmd, caplog)
    assert code == 0, log[-3000:]
    again, summary3 = read_output(fs, out)
    assert summary3["units"]["resumed"] == 8 and summary3["rows_now"] == 0
    assert summary3["output_files"] == summary["output_files"]


def written(fs, uri: str) -> bool:
    path = uri.removeprefix("s3://").rstrip("/")
    try:
        return any("/part-" in p for p in fs.ls(path, refresh=True))
    except FileNotFoundError:
        return False


def encoder_pids(cluster: str) -> list[int]:
    """The encoder actors of this module's cluster."""
    return ray_worker_pids(cluster, b"EncodeStage)")  # (TokenizeEncodeStage on CPU)


def test_encoder_actor_killed_mid_run(cluster, s3_endpoint, s3_bucket, tiny_model_dir,
                                      embedder, tmp_path):
    files = corpus(shards=8, rows=30)
    upload_dir(s3_client(s3_endpoint), s3_bucket, "actor", files)
    out = f"s3://{s3_bucket}/actor-out/"
    # Windows of 2 rows keep the encoder busy for seconds (120 calls for the 240 rows), and
    # units commit as their rows are written, 25 at a time.
    cmd = command(f"s3://{s3_bucket}/actor/", out, tiny_model_dir, cluster, s3_endpoint,
                  "--window-rows", "2", "--rows-per-file", "25")
    fs = s3(s3_endpoint)
    proc = start(cmd, tmp_path, "run")
    deadline = time.monotonic() + 180
    victim, committed = None, 0
    while proc.poll() is None and time.monotonic() < deadline:
        actors = encoder_pids(cluster)
        committed = len(manifests(fs, out))
        if actors and written(fs, out):  # the actor has done work
            victim = actors[0]
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.05)
    log = finish(proc, tmp_path, "run")
    assert victim is not None, "the encoder actor was never seen mid-run"
    assert committed < 8, f"the kill must land with work left ({committed} of 8 committed)"
    assert proc.returncode == 0, log[-3000:]
    assert victim not in encoder_pids(cluster)
    table, summary = read_output(fs, out)
    check_exact(table, texts_by_id(files), embedder)
    assert summary["reconciled"] and summary["rows_embedded"] == 240


def test_transient_s3_faults_give_the_exact_output(cluster, s3_endpoint, s3_bucket, fault_proxy,
                                                   tiny_model_dir, embedder, caplog):
    files = corpus(shards=6, rows=30)
    files["bad.jsonl"] = b'{"id": 9000, "text": ""}\n{"id": 9001, "text": "fine"}\n{oops\n'
    upload_dir(s3_client(s3_endpoint), s3_bucket, "flaky", files)
    out = f"s3://{s3_bucket}/flaky-out/"
    fault_proxy.fail_every = 4  # 503 SlowDown, 500, connection reset, in turn
    cmd = command(f"s3://{s3_bucket}/flaky/", out, tiny_model_dir, cluster, fault_proxy.url,
                  "--rows-per-file", "16", "--max-reject-fraction", "0.5")
    code, log = run_here(cmd, caplog)
    assert code == 0, log[-3000:]
    assert all(fault_proxy.faults[kind] > 0 for kind in ("503", "500", "reset")), \
        fault_proxy.faults
    table, summary = read_output(s3(s3_endpoint), out)
    texts = texts_by_id({k: v for k, v in files.items() if k != "bad.jsonl"}) | {9001: "fine"}
    check_exact(table, texts, embedder)
    assert summary["rows_in"] == 183 and summary["rows_rejected"] == 2 and summary["reconciled"]
    assert summary["reject_reasons"] == {"malformed JSON": 1,
                                         "text is empty or whitespace only": 1}
    assert summary["model"]["dtype"] == "float32"  # --dtype auto on a CPU
    # ... and where the CPU multiplies bf16 natively, the log says what bf16 would give.
    assert ("--dtype bfloat16 is faster" in log) == has_bf16_matmul()


def test_a_permanent_s3_error_fails_the_run_naming_the_object(
        cluster, s3_endpoint, s3_bucket, fault_proxy, tiny_model_dir, capsys, caplog):
    upload_dir(s3_client(s3_endpoint), s3_bucket, "deny", corpus(shards=3, rows=5))
    fault_proxy.deny = {"/deny/shard-02.jsonl"}
    out = f"s3://{s3_bucket}/deny-out/"
    cmd = command(f"s3://{s3_bucket}/deny/", out, tiny_model_dir, cluster, fault_proxy.url)
    code, _ = run_here(cmd, caplog)
    err = capsys.readouterr().err  # what the command prints for the user
    assert code == 3, err[-3000:]
    (message,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"cannot read s3://{s3_bucket}/deny/shard-02.jsonl: permission denied" in message
    (hint,) = [line for line in err.splitlines() if "rerun the same command" in line]
    assert f"s3://{s3_bucket}/deny-out" in hint and "resume" in hint  # how to go on
    assert fault_proxy.denied >= 1
    # The shards that were readable are committed; a rerun once access is back finishes.
    fault_proxy.deny = set()
    code, log = run_here(cmd, caplog)
    assert code == 0, log[-3000:]
    summary = json.loads(s3(s3_endpoint).cat(out.removeprefix("s3://") + "_summary.json"))
    assert summary["rows_embedded"] == 15 and summary["units"]["committed"] == 3


# --- an adversarial corpus: every kind of bad input, counted and explained -------------------


def jsonl(*records) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in records)


def rejects_by_row(out: Path) -> dict[tuple[str, int], str]:
    table = pq.read_table(sorted((out / "_rejects").glob("part-*.parquet")))
    return {(Path(s).name, r): reason for s, r, reason in
            zip(table["source"].to_pylist(), table["row"].to_pylist(), table["reason"].to_pylist())}


def test_adversarial_jsonl_corpus_reconciles_with_the_right_reasons(cluster, tmp_path,
                                                                     tiny_model_dir, monkeypatch):
    import gzip

    from pipeline.cli import main

    # The files as one unit (as small files of a large input are grouped): each file's rows
    # keep their own names, numbers and duplicate rule; the unit commits once all are out.
    monkeypatch.setattr("pipeline.units.GROUPED_UNITS", 1)

    src = tmp_path / "in"
    src.mkdir()
    long_text = " ".join(["word"] * 3000)  # far over 512 tokens: truncated, embedded, counted
    (src / "a.jsonl").write_bytes(jsonl(
        {"id": 1, "text": "first", "lang": "en"},                  # line 1: good
        b'{"id": 2, "text": "unterminated',                       # 2: malformed JSON
        {"id": 3, "text": None, "lang": "en"},                     # 3: null text
        {"id": 4, "text": "", "lang": "en"},                       # 4: empty text
        {"id": 5, "text": " \t ", "lang": "en"},                   # 5: whitespace only
        {"id": 6, "text": 42, "lang": "en"},                       # 6: non-string text
        b'{"id": 7, "text": "caf\xe9"}',                           # 7: invalid UTF-8
        {"text": "no id"},                                         # 8: missing id
        {"id": None, "text": "null id"},                           # 9: null id
        {"id": 1, "text": "again", "lang": "en"},                  # 10: duplicate id
        {"id": 11, "text": long_text, "lang": "en"},               # 11: over-long, embedded
        b'{"id": 12, "text": "\\ud800"}',                          # 12: lone surrogate
        b"[1, 2, 3]",                                              # 13: not an object
        {"id": "13", "text": "string id", "lang": "en"},           # 14: id of another type
        {"id": 2 ** 70, "text": "huge id"},                        # 15: id out of int64 range
        {"id": 16, "text": "kept value of another type", "lang": 5},  # 16
        b"",                                                       # blank: not a row
        {"id": 17, "text": "last", "lang": "en"},                  # 18: good
    ))
    (src / "b.jsonl").write_bytes(b"")  # zero bytes
    # Another schema: keys in another order, an extra key, the kept column missing.
    # An id whose first row cannot be embedded: its second row is the one kept.
    (src / "c.jsonl").write_bytes(jsonl({"extra": [1], "text": "other schema", "id": 30},
                                        {"text": "no lang either", "id": 31, "more": {"a": 1}},
                                        {"id": 32, "text": ""},
                                        {"id": 32, "text": "the embeddable one"}))
    body = jsonl(*[{"id": 100 + i, "text": f"row {i} " + "filler " * 20} for i in range(3000)])
    packed = gzip.compress(body)
    (src / "d.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])  # cut short
    out = tmp_path / "out"
    code = main(["run", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
                 "--dims", "64", "--keep-columns", "lang", "--progress", "off",
                 "--max-reject-fraction", "1"])
    assert code == 0
    summary = json.loads((out / "_summary.json").read_text())
    rejects = rejects_by_row(out)
    expected = {
        2: "malformed JSON", 3: "text is null", 4: "text is empty or whitespace only",
        5: "text is empty or whitespace only", 6: "text is int, not str", 7: "invalid UTF-8",
        8: "id column 'id' is missing", 9: "id is null", 10: "duplicate id: first seen at row 1",
        12: "lone surrogate", 13: "line is a JSON list, not an object",
        14: "id is str, the shard's ids are int64", 15: "id out of range",
        16: "kept column 'lang': value is not string",
    }
    got = {row: reason for (name, row), reason in rejects.items() if name == "a.jsonl"}
    assert sorted(got) == sorted(expected)
    for row, reason in expected.items():
        assert got[row].startswith(reason), (row, got[row])
    (damaged,) = [(row, r) for (name, row), r in rejects.items() if name == "d.jsonl.gz"]
    assert damaged[1].startswith("damaged compressed data: ")
    readable = damaged[0] - 1  # every line before the damaged tail came out embedded
    assert 0 < readable < 3000
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert set(ids) == {1, 11, 17, 30, 31, 32} | set(range(100, 100 + readable))
    assert rejects[("c.jsonl", 3)] == "text is empty or whitespace only"
    assert {i: v for i, v in zip(ids, table["lang"].to_pylist()) if i in (30, 31)} == \
        {30: None, 31: None}
    assert summary["rows_in"] == 17 + 4 + readable + 1
    assert summary["rows_rejected"] == len(expected) + 2 == len(rejects)
    assert summary["rows_embedded"] + summary["rows_rejected"] == summary["rows_in"]
    assert summary["reconciled"] and summary["texts_truncated"] == 1
    assert summary["reject_reasons"]["text is empty or whitespace only"] == 3
    assert summary["units"] == {"total": 1, "committed": 1, "resumed": 0, "committed_now": 1}
    assert summary["input_files"] == 4  # the zero-byte shard included
    (manifest,) = (out / "_manifest").glob("unit-*.json")
    assert [Path(u).name for u in json.loads(manifest.read_text())["members"]] == \
        ["a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl.gz"]


def test_adversarial_parquet_shards_with_different_schemas(cluster, tmp_path, tiny_model_dir,
                                                           monkeypatch):
    from pipeline.cli import main

    monkeypatch.setattr("pipeline.units.GROUPED_UNITS", 3)  # units of 2 files (7 // 3)

    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "text": ["a", "b"],
                             "lang": ["en", "de"]}), src / "p1.parquet")  # settles the types
    pq.write_table(pa.table({"text": pa.array(["c", "d"], pa.large_string()),
                             "id": pa.array([3, 4], pa.int32()), "other": [1.5, 2.5]}),
                   src / "p2.parquet")  # int32 ids, large strings, no lang, an extra column
    pq.write_table(pa.table({"id": ["5", "x"], "text": ["e", "f"], "lang": [1, 2]}),
                   src / "p3.parquet")  # string ids ("x" does not convert), int lang
    pq.write_table(pa.table({"id": [6, 7], "body": ["g", "h"]}), src / "p4.parquet")  # no text
    (src / "p5.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")  # damaged
    (src / "p6.parquet").write_bytes(b"")  # zero bytes
    pq.write_table(pa.table({"id": [8, 8, 9], "text": ["i", "j", "k"], "lang": ["a", "b", "c"]}),
                   src / "p7.parquet")  # a duplicate id
    out = tmp_path / "out"
    assert main(["run", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
                 "--dims", "64", "--keep-columns", "lang", "--progress", "off",
                 "--max-reject-fraction", "1"]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("lang").type == pa.string()
    got = dict(zip(table["id"].to_pylist(), table["lang"].to_pylist()))
    assert got == {1: "en", 2: "de", 3: None, 4: None, 5: "1", 8: "a", 9: "c"}
    rejects = rejects_by_row(out)
    assert rejects[("p3.parquet", 1)].startswith("id: value of type string does not convert")
    assert rejects[("p4.parquet", 0)] == rejects[("p4.parquet", 1)] == \
        "the file has no column 'text'"
    assert rejects[("p5.parquet", 0)].startswith("damaged Parquet file")
    assert rejects[("p7.parquet", 1)].startswith("duplicate id: first seen at row 0")
    assert len(rejects) == 5
    assert summary["rows_in"] == 2 + 2 + 2 + 2 + 1 + 0 + 3 == 12
    assert summary["rows_embedded"] == 7 and summary["rows_rejected"] == 5
    assert summary["reconciled"] and summary["units"]["committed"] == 4
    assert summary["input_files"] == 7
    assert summary["files"]["output"] == len(list(out.glob("part-*.parquet"))) >= 3


def test_a_large_parquet_file_is_split_into_units_that_resume_apart(cluster, tmp_path,
                                                                    tiny_model_dir, embedder):
    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    texts = sample_texts()
    rows = {i: f"{texts[i % len(texts)]} #{i}" for i in range(400)}
    pq.write_table(pa.table({"id": list(rows), "text": list(rows.values())}),
                   src / "big.parquet", row_group_size=50)  # 8 row groups
    out = tmp_path / "out"
    argv = ["run", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
            "--dims", DIMS, "--progress", "off",
            "--unit-bytes", str((src / "big.parquet").stat().st_size // 4)]
    assert main(argv) == 0
    first = json.loads((out / "_summary.json").read_text())
    assert first["units"]["total"] >= 4 and first["reconciled"] and first["input_files"] == 1
    # Undo one slice's commit as if the run had died before it: its files are strays now.
    manifest = sorted((out / "_manifest").glob("unit-*.json"))[1]
    undone = json.loads(manifest.read_text())
    assert "#row-groups[" in undone["uri"]
    manifest.unlink()
    # The same output spelled another way ("//", "./"): the same files, nothing else redone.
    respelled = [str(tmp_path) + "//out/./" if a == str(out) else a for a in argv]
    assert main(respelled) == 0
    second = json.loads((out / "_summary.json").read_text())
    assert second["units"]["resumed"] == first["units"]["total"] - 1
    assert second["rows_now"] == undone["rows"]
    assert not any((out / f).exists() for f in undone["files"])  # swept, then written anew
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert sorted(Path(f).name for f in second["output_files"]) == \
        sorted(p.name for p in out.glob("part-*.parquet"))
    check_exact(table, rows, embedder)


def test_a_resume_keeps_the_column_types_of_the_output(cluster, tmp_path, tiny_model_dir):
    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    (src / "b.jsonl").write_bytes(jsonl({"id": 1, "text": "one", "lang": "en"},
                                        {"id": 2, "text": "two", "lang": "de"}))
    out = tmp_path / "out"
    argv = ["run", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
            "--dims", "64", "--keep-columns", "lang", "--progress", "off",
            "--max-reject-fraction", "1"]
    assert main(argv) == 0
    # A new first shard whose ids are strings and whose lang is a number: on a fresh output
    # it would settle other types; the resume keeps the output's and rejects what differs.
    (src / "a.jsonl").write_bytes(jsonl({"id": "x1", "text": "three", "lang": 7},
                                        {"id": 3, "text": "four", "lang": "fr"}))
    assert main(argv) == 0
    table = pq.read_table(out, schema=None)  # one schema across all part files
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("lang").type == pa.string()
    assert sorted(table["id"].to_pylist()) == [1, 2, 3]
    rejects = rejects_by_row(out)
    assert rejects == {("a.jsonl", 1): "id is str, the shard's ids are int64"}


def test_other_settings_are_refused_then_replaced_with_overwrite(cluster, tmp_path,
                                                                 tiny_model_dir, capsys):
    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(jsonl(*[{"id": i, "text": f"text {i}"} for i in range(10)]))
    out = tmp_path / "out"
    argv = ["run", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
            "--progress", "off"]
    assert main(argv + ["--dims", "64"]) == 0
    before = sorted(p.name for p in out.glob("part-*.parquet"))
    capsys.readouterr()
    assert main(argv + ["--dims", "32", "--task", "query"]) == 2
    err = capsys.readouterr().err
    assert "dims: [64] there, [32] now" in err and "task: 'document' there, 'query' now" in err
    assert sorted(p.name for p in out.glob("part-*.parquet")) == before  # nothing touched
    assert main(argv + ["--dims", "32", "--task", "query", "--overwrite"]) == 0
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.column_names == ["id", "embedding_32"] and table.num_rows == 10
    assert not set(before) & {p.name for p in out.glob("part-*.parquet")}
    assert json.loads((out / "_manifest" / "_run.json").read_text())["identity"]["dims"] == [32]
