"""``pipeline/stages/embed.py``: the tokenizer and encoder stages called directly (no Ray):
ids travel, rejects pass, values match ``Embedder.encode`` in any row order; and the nightly
reuse path (rows marked for reuse take the previous snapshot's vectors, untokenized and
unencoded). The tiny random-weight model, on CPU; ``embedder`` and ``tokenizer_json`` are
conftest's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io import schema as S
from pipeline.io.readers import ReadSpec, read_jsonl
from pipeline.model.builder import sample_texts
from pipeline.stages.embed import (EncodeStage, TokenizeEncodeStage, TokenizeStage,
                                   require_columns)
from tests.helpers import reader_rows, vector

DIMS = (64, 32)


@pytest.fixture(scope="module")
def encode_stage(tiny_model_dir) -> EncodeStage:
    return EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                       dims=DIMS, output_dtype="float32", max_tokens_per_batch=512)


def reader_table(ids, texts, rejects=None) -> pa.Table:
    n = len(ids)
    return pa.table({
        S.ID: pa.array(ids), S.TEXT: pa.array(texts, pa.string()),
        S.SOURCE: pa.array(["mem://a"] * n), S.ROW: pa.array(range(n), pa.int64()),
        S.FILE_ROWS: pa.nulls(n, pa.int64()),
        S.REJECT: pa.array(rejects or [None] * n, pa.string()),
        S.EXCERPT: pa.nulls(n, pa.string()),
    })


def vectors(table: pa.Table, width: int) -> np.ndarray:
    return np.stack(table[f"embedding_{width}"].to_numpy(zero_copy_only=False))


def test_tokenize_rejects_bad_rows_and_keeps_every_row(tokenizer_json):
    table = reader_table([1, 2, None, 4, 5], ["good text", "", "orphan", "   ", "also good"],
                         [None, None, None, None, "malformed JSON: x"])
    out = TokenizeStage(tokenizer_json, "query")(table)
    assert out.num_rows == 5 and S.TEXT not in out.column_names
    assert out[S.REJECT].to_pylist() == [
        None, "text is empty or whitespace only", "id is null",
        "text is empty or whitespace only", "malformed JSON: x"]
    lengths = out[S.NUM_TOKENS].to_pylist()
    assert lengths[0] > 2 and lengths[1:] == [0, 0, 0, 0]
    assert [len(t) for t in out[S.TOKENS].to_pylist()] == lengths
    assert out[S.EXCERPT].to_pylist()[2] == "orphan"
    assert out[S.ID].to_pylist() == [1, 2, None, 4, 5]


def test_tokenize_applies_the_task_prefix(tokenizer_json, embedder):
    out = TokenizeStage(tokenizer_json, "query")(reader_table([7], ["what is ray"]))
    want = embedder.tokenize(["what is ray"], task="query").ids.tolist()
    assert out[S.TOKENS].to_pylist()[0] == want
    other = embedder.tokenize(["what is ray"], task="document").ids.tolist()
    assert want != other


def test_stages_equal_embedder_encode_in_any_row_order(tokenizer_json, encode_stage, embedder):
    texts = sample_texts()
    ids = list(range(100, 100 + len(texts)))
    order = np.random.default_rng(0).permutation(len(texts))
    table = reader_table([ids[i] for i in order], [texts[i] for i in order])
    out = encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    want = embedder.encode(texts, task="document", dims=DIMS)
    got_ids = np.asarray(out[S.ID].to_pylist()) - 100
    for d in DIMS:
        np.testing.assert_allclose(vectors(out, d), want[d][got_ids], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(vectors(out, d), axis=1), 1.0, atol=1e-5)
    assert sorted(got_ids) == list(range(len(texts)))
    # Several budgeted batches ran (512-token budget), and their grid covers the tokens.
    assert (out[S.GRID_TOKENS].to_numpy() >= out[S.NUM_TOKENS].to_numpy()).all()
    assert len(set(out[S.BATCH_MAX].to_pylist())) > 1


def test_tokenize_encode_stage_equals_the_two_stages(tokenizer_json, encode_stage,
                                                    tiny_model_dir):
    # A CPU run's encoder actor: both stages in one (pipeline/plan.py TOKENIZE_IN_ENCODER).
    texts = sample_texts() + ["", "  "]
    table = reader_table(list(range(len(texts))), texts,
                         [None] * (len(texts) - 1) + ["malformed JSON: x"])
    fused = TokenizeEncodeStage({"tokenizer_json": tokenizer_json, "task": "query"},
                                model=str(tiny_model_dir), revision=None, device="cpu",
                                dtype="float32", dims=DIMS, output_dtype="float32",
                                max_tokens_per_batch=512)
    got = fused(table)
    want = encode_stage(TokenizeStage(tokenizer_json, "query")(table))
    assert got.column_names == want.column_names
    timings = {S.TOKENIZE_S, S.ENCODE_S, S.ENCODE_START, S.ENCODE_END}
    for name in set(got.column_names) - timings:  # ids, rejects, tokens, the vectors
        assert got[name].equals(want[name]), name
    assert got[S.REJECT].to_pylist()[-2:] == ["text is empty or whitespace only",
                                              "malformed JSON: x"]


def test_encode_passes_rejected_rows_with_null_embeddings(tokenizer_json, encode_stage):
    table = reader_table(["a", "b", "c"], ["first", None, "third"], [None, None, None])
    out = encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    assert out[S.REJECT].to_pylist() == [None, "text is null", None]
    for d in DIMS:
        assert out[f"embedding_{d}"].is_null().to_pylist() == [False, True, False]
        assert out[f"embedding_{d}"].type == pa.list_(pa.float32(), d)


def test_encode_of_an_all_rejected_window(tokenizer_json, encode_stage):
    table = reader_table([1, 2], ["", " "])
    out = encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    assert out[f"embedding_{DIMS[0]}"].null_count == 2


def test_float16_output(tokenizer_json, tiny_model_dir, embedder):
    stage = EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                        dims=(64,), output_dtype="float16", max_tokens_per_batch=None)
    out = stage(TokenizeStage(tokenizer_json, "document")(reader_table([1], ["half"])))
    assert out["embedding_64"].type == pa.list_(pa.float16(), 64)
    want = embedder.encode(["half"], dims=(64,))[64]
    # Cast on the device (torch) before the copy back: the very values numpy's cast gives.
    assert stage._engine_casts
    np.testing.assert_array_equal(vectors(out, 64), want.astype(np.float16))


def test_fingerprint_mismatch_is_refused(tiny_model_dir):
    from pipeline.model.sources import ModelSourceError

    with pytest.raises(ModelSourceError, match="differ from the ones the driver checked"):
        EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                    dims=DIMS, output_dtype="float32", max_tokens_per_batch=None,
                    fingerprint="sha256:not-this-one")


def test_stages_name_missing_columns(tokenizer_json, encode_stage):
    with pytest.raises(KeyError, match="tokenize needs columns"):
        TokenizeStage(tokenizer_json, "document")(pa.table({"x": [1]}))
    with pytest.raises(KeyError, match=r"encode needs columns \['__tokens'"):
        encode_stage(pa.table({"x": [1]}))
    require_columns(pa.table({"a": [1]}), ["a"], "any")


def test_reader_rejects_flow_to_the_end(tokenizer_json, encode_stage, tmp_path):
    import io

    data = b'{"id": 1, "text": "fine"}\n{"id": 2, "text": \n{"id": 3, "text": 5}\n'
    spec = ReadSpec("id", "text", (), pa.int64())
    (table,) = read_jsonl(io.BytesIO(data), "mem://x.jsonl", spec)
    out = encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    reasons = out[S.REJECT].to_pylist()
    assert reasons[0] is None
    assert reasons[1].startswith("malformed JSON") and reasons[2] == "text is int, not str"
    assert out[S.ROW].to_pylist() == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# The stages' reuse path (nightly: rows marked __reuse carry the previous vectors)


@pytest.fixture(scope="module")
def reuse_encode_stage(tiny_model_dir) -> EncodeStage:
    return EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                       dims=DIMS, output_dtype="float32", max_tokens_per_batch=None)


def reuse_table(reuse: list[bool], *, seeds=None, dtype="float32", null_prev=()) -> pa.Table:
    n = len(reuse)
    texts = sample_texts()[:n]
    table = reader_rows(list(range(100, 100 + n)), texts)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    table = table.append_column(S.REUSE, pa.array(reuse, pa.bool_()))
    for d in DIMS:
        prev = [vector(1000 + i, d, np_dtype) if reuse[i] and i not in null_prev else None
                for i in range(n)]
        # As the diff's shuffle delivers them: variable-size lists (Diff.prev_type).
        kind = pa.list_(S.embedding_type(d, dtype).value_type)
        table = table.append_column(S.prev_embedding(d), pa.array(prev, kind))
    return table


def test_a_reused_vector_of_another_width_is_refused(reuse_encode_stage, tokenizer_json):
    table = reuse_table([True, True])
    d = DIMS[0]
    ragged = pa.array([[0.5] * (d - 1), [0.5] * (d + 1)], pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index(S.prev_embedding(d)),
                             S.prev_embedding(d), ragged)
    with pytest.raises(ValueError, match=f"another width than {d}"):
        reuse_encode_stage(TokenizeStage(tokenizer_json, "document")(table))


def stage_vectors(out: pa.Table, width: int) -> list:
    return out[f"embedding_{width}"].to_pylist()


def test_reused_rows_are_not_tokenized_or_encoded(tokenizer_json, reuse_encode_stage):
    reuse = [False, True, False, True, True, False, False]
    table = reuse_table(reuse)
    tokenized = TokenizeStage(tokenizer_json, "document")(table)
    lengths = tokenized[S.NUM_TOKENS].to_pylist()
    assert [n == 0 for n in lengths] == reuse
    assert [len(t) for t in tokenized[S.TOKENS].to_pylist()] == lengths
    assert tokenized[S.REJECT].null_count == len(reuse)
    out = reuse_encode_stage(tokenized)
    assert not [c for c in out.column_names if c.startswith("__prev_")]
    plain = reuse_encode_stage(TokenizeStage(tokenizer_json, "document")(
        table.drop_columns([S.REUSE] + [S.prev_embedding(d) for d in DIMS])))
    for d in DIMS:
        got, fresh = stage_vectors(out, d), stage_vectors(plain, d)
        assert out.schema.field(f"embedding_{d}").type == S.embedding_type(d, "float32")
        for i, r in enumerate(reuse):
            if r:
                assert got[i] == vector(1000 + i, d)  # exactly, not re-normalised
            else:
                np.testing.assert_allclose(got[i], fresh[i], atol=1e-5, rtol=0)
    assert [g == 0 for g in out[S.GRID_TOKENS].to_pylist()] == reuse


def test_a_window_of_only_reused_rows(tokenizer_json, reuse_encode_stage):
    table = reuse_table([True, True, True])
    out = reuse_encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    for d in DIMS:
        assert stage_vectors(out, d) == [vector(1000 + i, d) for i in range(3)]


def test_reuse_flag_on_a_rejected_row_keeps_it_rejected(tokenizer_json, reuse_encode_stage):
    table = reuse_table([True, False])
    table = table.set_column(table.schema.get_field_index(S.REJECT), S.REJECT,
                             pa.array(["malformed JSON: x", None], pa.string()))
    out = reuse_encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    assert out[S.REJECT].to_pylist() == ["malformed JSON: x", None]
    for d in DIMS:
        assert out[f"embedding_{d}"].is_null().to_pylist() == [True, False]


def test_a_reused_row_without_a_previous_vector_raises(tokenizer_json, reuse_encode_stage):
    table = reuse_table([False, True, True], null_prev=(2,))
    with pytest.raises(ValueError, match="marked for reuse have no earlier embedding"):
        reuse_encode_stage(TokenizeStage(tokenizer_json, "document")(table))


def test_reuse_with_float16_output(tokenizer_json, tiny_model_dir):
    stage = EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                        dims=DIMS, output_dtype="float16", max_tokens_per_batch=None)
    table = reuse_table([True, False], dtype="float16")
    out = stage(TokenizeStage(tokenizer_json, "document")(table))
    for d in DIMS:
        assert out.schema.field(f"embedding_{d}").type == S.embedding_type(d, "float16")
        assert stage_vectors(out, d)[0] == vector(1000, d, np.float16)
        assert stage_vectors(out, d)[1] is not None
