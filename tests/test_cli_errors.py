"""``python -m pipeline run`` fails fast and clearly, before Ray starts, on setup mistakes."""

from __future__ import annotations

import gzip
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.cli import main
from tests.s3server import closed_port_url, s3_bucket, s3_client, s3_endpoint  # noqa: F401

# A setup error must surface well before a run would have done any work.
FAST_S = 30


@pytest.fixture
def local_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), tmp_path / "in" / "p.parquet")
    return tmp_path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    start = time.monotonic()
    code = main(["run", "--progress", "off", *argv])
    elapsed = time.monotonic() - start
    assert elapsed < FAST_S, f"took {elapsed:.1f} s"
    assert not ray.is_initialized(), "Ray started before the setup error was found"
    return code, capsys.readouterr().err


def test_missing_input(capsys, tmp_path, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                        "--model", str(tiny_model_dir))
    assert code == 2 and "does not exist" in err and str(tmp_path / "nope") in err


def test_empty_input_prefix_on_s3(capsys, s3_bucket, tmp_path, tiny_model_dir):
    code, err = run_cli(capsys, "--input", f"s3://{s3_bucket}/nothing/", "--output",
                        str(tmp_path / "o"), "--model", str(tiny_model_dir))
    assert code == 2 and f"s3://{s3_bucket}/nothing" in err


def test_unknown_format(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.csv").write_text("id,text\n1,a\n")
    code, err = run_cli(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                        "--model", str(tiny_model_dir))
    assert code == 2 and "no known format" in err and "data.csv" in err


def test_missing_id_column(capsys, local_corpus, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "o"), "--model", str(tiny_model_dir),
                        "--id-column", "doc_id")
    assert code == 2 and "no column 'doc_id'" in err and "--id-column" in err


def test_missing_text_column_jsonl_gz(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"id": 1, "body": "x"}\n'))
    code, err = run_cli(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                        "--model", str(tiny_model_dir))
    assert code == 2 and "no column 'text'" in err and "--text-column" in err


def test_missing_kept_column(capsys, local_corpus, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "o"), "--model", str(tiny_model_dir),
                        "--keep-columns", "url")
    assert code == 2 and "no column 'url'" in err


def test_unreachable_endpoint(capsys, s3_endpoint, tmp_path, tiny_model_dir):
    url = closed_port_url()
    code, err = run_cli(capsys, "--input", "s3://bucket/in/", "--output", str(tmp_path / "o"),
                        "--model", str(tiny_model_dir), "--s3-endpoint", url)
    assert code == 2 and "cannot list s3://bucket/in" in err and "endpoint" in err


def test_unwritable_output(capsys, local_corpus, tiny_model_dir):
    blocker = local_corpus / "a-file"
    blocker.write_text("not a directory")
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(blocker / "out"), "--model", str(tiny_model_dir))
    assert code == 2 and "cannot write to output" in err and str(blocker / "out") in err


def test_output_bucket_missing(capsys, s3_bucket, local_corpus, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        "s3://no-such-bucket-here/out/", "--model", str(tiny_model_dir))
    assert code == 2 and "s3://no-such-bucket-here/out/" in err


def test_output_inside_input(capsys, local_corpus, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "in" / "emb"), "--model", str(tiny_model_dir))
    assert code == 2 and "inside the input" in err


def test_unreachable_model(capsys, s3_bucket, local_corpus):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "o"), "--model", f"s3://{s3_bucket}/no-model/")
    assert code == 2 and f"s3://{s3_bucket}/no-model" in err


def test_width_wider_than_the_model(capsys, local_corpus, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "o"), "--model", str(tiny_model_dir))
    assert code == 2 and "768" in err and "[1, 64]" in err


def earlier_run(out, corpus, model_dir, **changes) -> dict:
    """Write the manifest of an earlier run at ``out``: its identity, changed by ``changes``."""
    from pipeline.config import RunConfig
    from pipeline.io.storage import open_filesystem
    from pipeline.preflight import load_model_info
    from pipeline.units import run_identity
    from pipeline.units import write_identity

    config = RunConfig(input=str(corpus / "in"), output=str(out), model=str(model_dir),
                       dims=(64,))
    identity = run_identity(config, None, load_model_info(config)) | changes
    fs, path = open_filesystem(str(out))
    write_identity(fs, path, identity)
    return identity


def test_output_of_a_run_with_other_settings(capsys, local_corpus, tiny_model_dir):
    out = local_corpus / "o"
    earlier_run(out, local_corpus, tiny_model_dir, dims=[32], task="query")
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output", str(out),
                        "--model", str(tiny_model_dir), "--dims", "64")
    assert code == 2 and "other settings" in err and "--overwrite" in err
    assert "task: 'query' there, 'document' now" in err and "dims: [32] there, [64] now" in err
    assert (out / "_manifest" / "_run.json").exists()  # refused, nothing deleted


def test_a_nightly_root_is_refused_as_a_runs_output(capsys, local_corpus, tiny_model_dir):
    """A run's files beside a nightly job's snapshots would stop its next night."""
    out = local_corpus / "snapshots"
    (out / "snapshot-20261207T000000Z").mkdir(parents=True)
    (out / "_LATEST").write_text("snapshot-20261207T000000Z\n")
    for extra in ((), ("--overwrite",)):
        code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output", str(out),
                            "--model", str(tiny_model_dir), "--dims", "64", *extra)
        assert code == 2 and "holds _LATEST" in err and "nightly" in err
    # enrich too (its summary and rejects there would stop the night as well)
    assert main(["enrich", "--input", str(local_corpus / "in"), "--output", str(out),
                 "--model", str(tiny_model_dir), "--dims", "64", "--progress", "off"]) == 2
    assert "holds _LATEST" in capsys.readouterr().err and not ray.is_initialized()
    assert sorted(p.name for p in out.iterdir()) == ["_LATEST", "snapshot-20261207T000000Z"]


def test_another_tools_part_files_are_refused_even_with_overwrite(capsys, local_corpus,
                                                                   tiny_model_dir):
    out = local_corpus / "spark"
    out.mkdir()
    spark = out / "part-00000-1a2b-c000.snappy.parquet"
    pq.write_table(pa.table({"id": [1]}), spark)
    for extra in ((), ("--overwrite",)):
        code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output", str(out),
                            "--model", str(tiny_model_dir), "--dims", "64", *extra)
        assert code == 2 and "did not write (e.g. part-00000-1a2b-c000.snappy.parquet)" in err
    assert spark.exists()


def test_pipeline_files_without_a_manifest(capsys, local_corpus, tiny_model_dir):
    out = local_corpus / "o"
    out.mkdir()
    pq.write_table(pa.table({"id": [1]}), out / "part-0123456789abcdef-0123456789ab.parquet")
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output", str(out),
                        "--model", str(tiny_model_dir), "--dims", "64")
    assert code == 2 and "but no run manifest" in err and "--overwrite" in err
    # Named: the user sees what --overwrite deletes.
    assert "e.g. part-0123456789abcdef-0123456789ab.parquet" in err


@pytest.mark.parametrize("extra,message", [
    (("--chunk-overlap", "256"), "less than half"),
    (("--chunk-tokens", "12"), "leaves"),
    (("--chunk-tokens", "600"), "at most the model's 512"),
])
def test_chunk_windows_that_cannot_work(capsys, local_corpus, tiny_model_dir, extra, message):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "o"), "--model", str(tiny_model_dir),
                        "--dims", "64", "--long-text", "chunk", *extra)
    assert code == 2 and message in err


def test_chunk_options_without_chunk_mode(capsys, local_corpus, tiny_model_dir):
    code, err = run_cli(capsys, "--input", str(local_corpus / "in"), "--output",
                        str(local_corpus / "o"), "--model", str(tiny_model_dir),
                        "--doc-vectors")
    assert code == 2 and "--doc-vectors applies to --long-text chunk only" in err
