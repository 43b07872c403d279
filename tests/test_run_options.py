"""Each ``python -m pipeline run`` option reaches the stage or step that uses it.

One case per :class:`RunConfig` field: parse the command line, then look where the value must
arrive (the plan the graph is wired from, a stage built from that plan, or the step that uses
it). A final test fails when an option is added without a case here.
"""

from __future__ import annotations

import argparse
import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import add_run_arguments, config_from_args
from pipeline.config import RunConfig
from pipeline.io.storage import InputFile, OutputError, StorageError
from pipeline.model.sources import ModelSourceError
from pipeline.plan import Cluster, ModelInfo, RunPlan, local_cpus, plan_run
from pipeline.stages.embed import EncodeStage, TokenizeStage

CPU_CLUSTER = Cluster(cpus=8, gpus=0)
GPU_CLUSTER = Cluster(cpus=32, gpus=4)
FILES = [InputFile("s3://b/in/part-0.parquet", 10, "parquet", None)]


def parse(*extra: str, input="s3://b/in/", output="s3://b/out/", job="run") -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, job=job)
    return config_from_args(parser.parse_args(["--input", input, "--output", output, *extra]))


@pytest.fixture(scope="module")
def model_info(tiny_model_dir) -> ModelInfo:
    from pipeline.preflight import load_model_info

    return load_model_info(parse("--model", str(tiny_model_dir), "--dims", "64,32"))


def plan(model_info: ModelInfo, *extra: str, cluster: Cluster = CPU_CLUSTER) -> RunPlan:
    extra = extra if "--dims" in extra else (*extra, "--dims", "64,32")
    return plan_run(parse("--model", model_info.source, *extra), cluster, model_info, FILES, None)


def encode_stage(p: RunPlan) -> EncodeStage:
    return EncodeStage(**p.encode.kwargs)


# --- options that shape the plan and the stages built from it --------------------------------


def test_task(model_info):
    p = plan(model_info, "--task", "query")
    assert TokenizeStage(**p.tokenize.kwargs).prefix == "search_query: "
    assert p.output.metadata["prefix"] == "search_query: "


def test_dims(model_info):
    p = plan(model_info, "--dims", "48,16")
    assert encode_stage(p).dims == (48, 16) and p.output.dims == (48, 16)
    with pytest.raises(ValueError, match=r"\[1, 64\]"):
        plan(model_info, "--dims", "768")


def test_id_column(model_info):
    p = plan(model_info, "--id-column", "doc_id")
    assert p.read.id_column == "doc_id" and p.output.id_column == "doc_id"


def test_text_column(model_info):
    assert plan(model_info, "--text-column", "body").read.text_column == "body"


def test_keep_columns(model_info):
    p = plan(model_info, "--keep-columns", "lang, url")
    assert p.read.keep_columns == ("lang", "url") and p.output.keep_columns == ("lang", "url")


def test_output_dtype(model_info):
    p = plan(model_info, "--output-dtype", "float16")
    assert encode_stage(p).output_dtype == "float16" and p.output.output_dtype == "float16"


def test_device(model_info):
    p = plan(model_info, "--device", "cpu", cluster=GPU_CLUSTER)
    assert p.device == "cpu" and p.encode.num_gpus == 0 and p.encode.kwargs["device"] == "cpu"
    assert p.encode.env_vars == {"MALLOC_ARENA_MAX": "1"}
    assert plan(model_info, cluster=GPU_CLUSTER).encode.num_gpus == 1
    assert plan(model_info, cluster=GPU_CLUSTER).encode.env_vars == {}
    with pytest.raises(ValueError, match="no GPUs"):
        plan(model_info, "--device", "cuda")


def test_dtype(model_info):
    p = plan(model_info, "--dtype", "bfloat16")
    assert encode_stage(p).embedder.encoder.dtype == torch.bfloat16


def test_encoder_replicas(model_info):
    assert plan(model_info, "--encoder-replicas", "3").encode.actors == 3
    assert plan(model_info, cluster=GPU_CLUSTER).encode.actors == 4
    with pytest.raises(ValueError, match="needs 5 GPUs"):
        plan(model_info, "--encoder-replicas", "5", cluster=GPU_CLUSTER)


def test_expert_parallel(model_info):
    p = plan(model_info, "--expert-parallel", "2")
    assert p.encode.ranks == 2 and p.encode.group
    # The graph gives each encode actor a group of 2 ranks as its engine.
    from pipeline.cluster.graph import encode_kwargs

    engine = encode_kwargs(p)["engine"]
    assert engine.func.__name__ == "RankGroup" and engine.args == (2,)
    # The coordinating actor holds nothing; each rank holds a CPU (and a GPU on CUDA).
    assert (p.encode.num_cpus, p.encode.rank_cpus, p.encode.rank_gpus) == (0.0, 1.0, 0.0)
    gpu = plan(model_info, "--expert-parallel", "2", cluster=GPU_CLUSTER)
    assert gpu.encode.actors == 2 and gpu.encode.held_gpus == 4  # 4 GPUs: 2 groups of 2
    assert gpu.tokenize.actors == 24  # 6 per GPU, one thread each
    assert gpu.tokenize.env_vars == {"RAYON_NUM_THREADS": "1"}
    assert plan(model_info).tokenize.env_vars == {}  # CPU: the tokenizer's own threads
    assert plan(model_info).encode.ranks == 1 and "engine" not in \
        encode_kwargs(plan(model_info))
    with pytest.raises(ValueError, match="divides the model's 4 experts"):
        plan(model_info, "--expert-parallel", "3")
    eight = dataclasses.replace(model_info, num_experts=8)
    with pytest.raises(ValueError, match="--expert-parallel 8 needs 8 GPUs"):
        plan_run(parse("--model", model_info.source, "--dims", "64,32", "--expert-parallel",
                       "8"), GPU_CLUSTER, eight, FILES, None)
    with pytest.raises(ValueError, match="--encoder-replicas 3 with --expert-parallel 2 "
                                         "needs 6 GPUs"):
        plan(model_info, "--expert-parallel", "2", "--encoder-replicas", "3",
             cluster=GPU_CLUSTER)
    # 1 tokenizer + 4 x 2 ranks would hold 9 of 8 CPUs: refused, naming the ranks.
    with pytest.raises(ValueError, match=r"4 x 2 expert-parallel rank\(s\) hold 9"):
        plan(model_info, "--expert-parallel", "2", "--encoder-replicas", "4")
    # A group's ranks share one node (STRICT_PACK): 2 one-GPU nodes cannot hold a group of 2.
    with pytest.raises(ValueError, match="needs 2 GPUs there; the largest node has 16 CPUs "
                                         "and 1 GPUs"):
        plan(model_info, "--expert-parallel", "2",
             cluster=Cluster(cpus=32, gpus=2, node_cpus=16, node_gpus=1))
    with pytest.raises(ValueError, match="positive integer"):
        parse("--expert-parallel", "0")


def test_tokenizer_actors(model_info):
    assert plan(model_info, "--tokenizer-actors", "6").tokenize.actors == 6
    # On CPU the encoder actors tokenize their own windows, unless tokenizer actors are asked
    # for; an expert-parallel replica's actor only coordinates, so it keeps one.
    assert plan(model_info).tokenize.actors == 0
    assert plan(model_info, "--expert-parallel", "2").tokenize.actors == 1
    assert plan(model_info, cluster=GPU_CLUSTER).tokenize.actors == 24
    assert local_cpus(parse(), gpus=0, cpu_count=2) == 3  # the encoder, a read, a write
    assert local_cpus(parse("--tokenizer-actors", "2"), gpus=0, cpu_count=2) == 5
    # The graph then runs both stages in the encoder actor, with the tokenizer's arguments.
    from pipeline.cluster.graph import embed_and_write

    class Recorder:  # a Dataset that records each map_batches call
        calls = []

        def map_batches(self, fn, **kwargs):
            self.calls.append((getattr(fn, "__name__", fn), kwargs))
            return self

    for p, stages in ((plan(model_info), ["TokenizeEncodeStage", "write_batch"]),
                      (plan(model_info, "--tokenizer-actors", "1"),
                       ["TokenizeStage", "EncodeStage", "write_batch"])):
        Recorder.calls = []
        embed_and_write(Recorder(), p)
        assert [name for name, _ in Recorder.calls] == stages
    fused = plan(model_info)
    Recorder.calls = []
    embed_and_write(Recorder(), fused)
    (name, kwargs), _ = Recorder.calls
    assert kwargs["fn_constructor_kwargs"]["tokenize"] == fused.tokenize.kwargs
    assert kwargs["batch_size"] == fused.encode.batch_rows
    assert kwargs["compute"].min_size == fused.encode.actors == 1
    # 7 tokenizers + 1 encoder would hold all 8 CPUs: reads and writes could never run.
    with pytest.raises(ValueError, match="leaving none for reading and writing"):
        plan(model_info, "--tokenizer-actors", "7")
    # With no tokenizer actor, the advice names only what can be lowered.
    with pytest.raises(ValueError, match=r"^1 encoder actor\(s\) hold 1 of the cluster's 1 "
                       r"CPUs.*; lower --encoder-replicas or --expert-parallel, or"):
        plan(model_info, cluster=Cluster(cpus=1, gpus=0))


def test_max_tokens_per_batch(model_info):
    p = plan(model_info, "--max-tokens-per-batch", "2048")
    assert encode_stage(p).embedder.max_tokens_per_batch == 2048
    with pytest.raises(ValueError, match="at least 512"):
        parse("--max-tokens-per-batch", "100")


def test_window_rows(model_info):
    assert plan(model_info, "--window-rows", "300").encode.batch_rows == 300


def test_rows_per_file(model_info):
    assert plan(model_info, "--rows-per-file", "5000").rows_per_file == 5000
    assert plan(model_info, "--rows-per-file", "50000").rows_per_file == 50000


def test_a_cpu_write_batch_is_a_few_windows_so_units_commit_every_few_minutes(model_info):
    # ~128 MiB of vectors at 64/32 is ~300,000 rows: on CPU (~10 rows/s a node with the real
    # model) units would commit only when the input is done.
    by_bytes = plan(model_info, "--device", "cuda", cluster=GPU_CLUSTER).rows_per_file
    assert by_bytes == plan(model_info).output.rows_per_file() > 100_000
    assert plan(model_info).rows_per_file == 4 * 1024
    assert plan(model_info, "--window-rows", "300").rows_per_file == 1200
    assert plan(model_info, "--window-rows", "16").rows_per_file == 1024  # no tiny files
    assert plan(model_info, "--rows-per-file", "70").rows_per_file == 70  # as asked


def test_encoder_threads(model_info):
    before = torch.get_num_threads()
    try:
        encode_stage(plan(model_info, "--encoder-threads", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_s3_endpoint(model_info):
    p = plan(model_info, "--s3-endpoint", "http://127.0.0.1:9")
    assert p.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert p.encode.kwargs["storage_options"] == {"endpoint_url": "http://127.0.0.1:9"}


def test_s3_endpoint_reaches_the_input_listing():
    from pipeline.preflight import check_inputs
    from tests.s3server import closed_port_url

    url = closed_port_url()
    with pytest.raises(StorageError, match="cannot list s3://bucket/in"):
        check_inputs(parse("--s3-endpoint", url, input="s3://bucket/in/"))


def test_output(model_info):
    p = plan_run(parse("--model", model_info.source, "--dims", "64", output="s3://x/y/"),
                 CPU_CLUSTER, model_info, FILES, None)
    assert p.output_uri == "s3://x/y/"


# --- options used by the steps around the graph ------------------------------------------------


def test_input_and_format(tmp_path):
    from pipeline.preflight import check_inputs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.txt").write_text('{"id": 1, "text": "a"}\n')
    config = parse("--format", "jsonl", input=str(tmp_path / "in"), output=str(tmp_path / "o"))
    inputs = check_inputs(config)
    assert [f.format for f in inputs.files] == ["jsonl"] and inputs.id_type == pa.int64()
    with pytest.raises(ValueError, match="no known format"):
        check_inputs(parse(input=str(tmp_path / "in"), output=str(tmp_path / "o")))


def test_model(tiny_model_dir):
    from pipeline.preflight import load_model_info

    info = load_model_info(parse("--model", str(tiny_model_dir), "--dims", "64"))
    assert info.source == str(tiny_model_dir) and info.hidden_size == 64
    with pytest.raises(ModelSourceError, match="does not exist|not found|no such"):
        load_model_info(parse("--model", str(tiny_model_dir / "nope"), "--dims", "64"))


def test_revision(tiny_model_dir):
    from pipeline.preflight import load_model_info

    with pytest.raises(ModelSourceError, match="revision='v1' applies to hub repo ids only"):
        load_model_info(parse("--model", str(tiny_model_dir), "--revision", "v1"))


def test_overwrite(tmp_path, tiny_model_dir):
    from pipeline.jobs.run import run

    out = tmp_path / "out"
    out.mkdir()
    old = out / "part-0123456789abcdef-0123456789ab.parquet"  # named as the writer names them
    pq.write_table(pa.table({"id": [1]}), old)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), tmp_path / "in" / "a.parquet")
    # Files of a run without a manifest cannot be resumed: refused before Ray starts.
    with pytest.raises(OutputError, match="but no run manifest.*--overwrite deletes these files"):
        run(parse("--model", str(tiny_model_dir), "--dims", "64",
                  input=str(tmp_path / "in"), output=str(out)))
    # A mistake found after the output check (here: a width the model lacks) must not cost
    # the earlier run: deletion waits until every check has passed.
    with pytest.raises(ValueError, match=r"\[1, 64\]"):
        run(parse("--overwrite", "--model", str(tiny_model_dir), "--dims", "1024",
                  input=str(tmp_path / "in"), output=str(out)))
    assert old.exists()


def test_on_duplicate(model_info):
    assert plan(model_info).read.dedupe is True
    assert plan(model_info, "--on-duplicate", "keep-all").read.dedupe is False


def write_records(*records: dict):
    """What the graph's write stage yields, through JSON as the records travel (``consume``
    only iterates)."""
    import json

    return [json.loads(json.dumps(r)) for r in records]


def unit_record(uri: str, rows: int, rejected: int) -> dict:
    from pipeline.units import unit_key

    return {"unit": unit_key(uri), "source": uri, "rows": rows, "row_sum": rows * (rows - 1) // 2,
            "file_rows": rows, "file_rowsum": rows * (rows - 1) // 2, "rows_embedded": rows - rejected,
            "rows_rejected": rejected, "first_reject": [0, "text is null"] if rejected else None,
            "files": []}


def tracker_for(*uris: str):
    from pipeline.units import Tracker

    committed = []
    return Tracker([InputFile(u, 1, "jsonl", None) for u in uris], committed.append), committed


def test_on_bad_rows():
    from pipeline.errors import RunFailed
    from pipeline.jobs.run import consume

    tracker, committed = tracker_for("a.jsonl", "b.jsonl")
    records = write_records(unit_record("a.jsonl", 5, 0), unit_record("b.jsonl", 5, 1))
    consume(records, tracker, parse("--max-reject-fraction", "1"))
    assert len(committed) == 2
    tracker, committed = tracker_for("a.jsonl", "b.jsonl")
    with pytest.raises(RunFailed, match="row 0 of b.jsonl was rejected .*: text is null"):
        consume(records, tracker, parse("--on-bad-rows", "fail"))
    assert [u["uri"] for u in committed] == ["a.jsonl"]  # the good unit before it committed


def test_max_reject_fraction():
    from pipeline.errors import RunFailed
    from pipeline.jobs.run import EARLY_REJECT_CHECK_ROWS, consume

    n = EARLY_REJECT_CHECK_ROWS
    records = write_records(unit_record("a.jsonl", n, n // 5))  # 20% rejected
    with pytest.raises(RunFailed, match="rejected, more than --max-reject-fraction 0.1"):
        consume(records, tracker_for("a.jsonl")[0], parse())
    consume(records, tracker_for("a.jsonl")[0], parse("--max-reject-fraction", "0.25"))
    with pytest.raises(ValueError, match="from 0 to 1"):
        parse("--max-reject-fraction", "1.5")


def test_unit_bytes(tmp_path):
    from pipeline.preflight import check_inputs

    (tmp_path / "in").mkdir()
    table = pa.table({"id": list(range(4000)), "text": [f"text {i}" for i in range(4000)]})
    pq.write_table(table, tmp_path / "in" / "big.parquet", row_group_size=500)  # 8 row groups
    size = (tmp_path / "in" / "big.parquet").stat().st_size
    whole = check_inputs(parse(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert [f.row_groups for f in whole.files] == [None]
    split = check_inputs(parse("--unit-bytes", str(size // 4), input=str(tmp_path / "in"),
                               output=str(tmp_path / "out")))
    slices = [f.row_groups for f in split.files]
    assert len(slices) >= 4 and slices[0][0] == 0 and slices[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, no overlap
    assert split.files[0].unit.endswith(f"big.parquet#row-groups[0:{slices[0][1]}]")


def test_address(monkeypatch):
    import ray

    from pipeline.cluster import session

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert session.init_ray(parse("--address", "ray://head:10001"))
    assert seen["address"] == "ray://head:10001"


def test_progress():
    from ray.data import DataContext

    from pipeline.cluster.session import configure_progress

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        configure_progress(parse("--progress", "on").progress)
        assert ctx.enable_progress_bars is True
        configure_progress(parse("--progress", "off").progress)
        assert ctx.enable_progress_bars is False
    finally:
        ctx.enable_progress_bars = before


# --- options of one job ----------------------------------------------------------------------


def test_keep_snapshots(tmp_path):
    import fsspec

    from pipeline.snapshots import prune

    assert parse("--keep-snapshots", "2", job="nightly").keep_snapshots == 2
    with pytest.raises(SystemExit):  # an option of nightly only
        parse("--keep-snapshots", "2")
    names = [f"snapshot-20260101T00000{k}Z" for k in range(4)]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "_summary.json").write_text("{}")
    gone = prune(fsspec.filesystem("file"), str(tmp_path), names[-1],
                 parse("--keep-snapshots", "2", job="nightly").keep_snapshots)
    assert gone == names[:2] and sorted(p.name for p in tmp_path.iterdir()) == names[2:]


def test_iceberg_catalog(tmp_path, monkeypatch):
    from pipeline.jobs.enrich import open_catalog

    monkeypatch.setenv("HOME", str(tmp_path))
    config = parse("--iceberg-catalog", "lake", "--iceberg-warehouse", str(tmp_path / "wh"),
                   job="enrich")
    assert open_catalog(config).name == "lake"
    with pytest.raises(SystemExit):  # an option of enrich only
        parse("--iceberg-catalog", "lake")


def test_iceberg_catalog_uri(tmp_path, monkeypatch):
    from pipeline.jobs.enrich import open_catalog

    monkeypatch.setenv("HOME", str(tmp_path))
    db = tmp_path / "elsewhere.db"
    config = parse("--iceberg-catalog-uri", f"sqlite:///{db}", "--iceberg-warehouse",
                   str(tmp_path / "wh"), job="enrich")
    catalog = open_catalog(config)
    catalog.create_namespace("lake")
    assert db.is_file() and catalog.properties["uri"] == f"sqlite:///{db}"


def test_iceberg_warehouse(tmp_path, monkeypatch):
    from pipeline.jobs.enrich import open_catalog

    monkeypatch.setenv("HOME", str(tmp_path))
    catalog = open_catalog(parse("--iceberg-warehouse", str(tmp_path / "wh"), job="enrich"))
    catalog.create_namespace("lake")
    assert (tmp_path / "wh" / "catalog.db").is_file()
    assert catalog.properties["warehouse"].endswith(str(tmp_path / "wh"))


def test_long_text(model_info, tiny_model_dir):
    p = plan(model_info, "--long-text", "reject")
    stage = TokenizeStage(**p.tokenize.kwargs)
    assert stage.long_text.mode == "reject" and stage.chunker is not None
    assert p.output.long_text.mode == "reject"
    assert TokenizeStage(**plan(model_info).tokenize.kwargs).chunker is None
    with pytest.raises(SystemExit):
        parse("--long-text", "split")
    for clash in (("--keep-columns", "tokens"), ("--id-column", "chunk")):
        with pytest.raises(ValueError, match="clash with the chunk columns"):
            parse("--long-text", "chunk", *clash)


def test_chunk_tokens(model_info):
    p = plan(model_info, "--long-text", "chunk", "--chunk-tokens", "128", "--chunk-overlap", "16")
    assert TokenizeStage(**p.tokenize.kwargs).chunker.window == 128
    assert p.output.long_text.window == 128 and p.output.metadata["chunks"]["window"] == 128
    with pytest.raises(ValueError, match="--chunk-tokens applies to --long-text chunk only"):
        parse("--chunk-tokens", "128")
    with pytest.raises(ValueError, match="--chunk-tokens, --doc-vectors apply to --long-text"):
        parse("--chunk-tokens", "128", "--doc-vectors")
    with pytest.raises(ValueError, match="at most the model's 512"):
        parse("--long-text", "chunk", "--chunk-tokens", "513")


def test_chunk_overlap(model_info, tiny_model_dir):
    from pipeline.preflight import load_model_info

    p = plan(model_info, "--long-text", "chunk", "--chunk-overlap", "10")
    assert TokenizeStage(**p.tokenize.kwargs).chunker.overlap == 10
    # Half the window or more, or a window with no room after the prefix: refused by the
    # pre-flight, which knows the tokenizer's prefix length (before Ray starts).
    for extra in (("--chunk-overlap", "256"), ("--chunk-tokens", "12")):
        with pytest.raises(ValueError, match="--chunk-"):
            load_model_info(parse("--model", str(tiny_model_dir), "--dims", "64,32",
                                  "--long-text", "chunk", *extra))


def test_max_chunks(model_info):
    p = plan(model_info, "--long-text", "chunk", "--max-chunks", "7")
    assert TokenizeStage(**p.tokenize.kwargs).chunker.max_chunks == 7


def test_keep_chunk_text(model_info):
    p = plan(model_info, "--long-text", "chunk", "--keep-chunk-text")
    assert p.output.long_text.chunk_text and p.tokenize.kwargs["long_text"].chunk_text


def test_doc_vectors(model_info):
    from pipeline.stages.diff import plan_diff
    from pipeline.units import run_identity

    p = plan(model_info, "--long-text", "chunk", "--doc-vectors")
    assert p.output.long_text.doc_vectors and encode_stage(p).doc_vectors
    # nightly takes it: its diff reads the previous snapshot's document vectors for reuse.
    config = parse("--model", model_info.source, "--dims", "64,32", "--long-text", "chunk",
                   "--doc-vectors", job="nightly")
    identity = run_identity(config, "float32", model_info)
    documents = (("s3://b/out/snapshot-1/_documents/part-a.parquet", 10),)
    diff = plan_diff(identity=identity, read=p.read, previous_identity=identity,
                     previous_files=(), previous_documents=documents, todo_bytes=0,
                     seen_files=(), cpus=1)
    assert diff.reuse_documents and diff.previous_documents == documents
    with pytest.raises(SystemExit):  # enrich always appends them: not an option there
        parse("--long-text", "chunk", "--doc-vectors", job="enrich")


def test_gguf_expert_bias(model_info):
    p = plan(model_info, "--gguf-expert-bias", "/data/bias.safetensors")
    assert p.encode.kwargs["gguf_expert_bias"] == "/data/bias.safetensors"
    assert plan(model_info).encode.kwargs["gguf_expert_bias"] == "zero"


def test_every_option_has_a_test_here():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    tested |= {"input", "format"}  # test_input_and_format
    missing = [f.name for f in dataclasses.fields(RunConfig) if f.name not in tested]
    assert not missing, f"options without a test that they reach their stage: {missing}"


def test_bad_option_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--dims", "a,b")
    assert "comma-separated list of integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reserved prefix"):
        RunConfig(input="a", output="b", keep_columns=("__x",))
    with pytest.raises(ValueError, match="id column"):
        RunConfig(input="a", output="b", keep_columns=("id",))
    with pytest.raises(ValueError, match="repeat a width"):
        RunConfig(input="a", output="b", dims=(64, 64))
    with pytest.raises(ValueError, match="positive integer"):
        RunConfig(input="a", output="b", window_rows=0)
