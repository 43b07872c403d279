"""``pipeline/io/schema.py``: excerpts, the output metadata, the internal column names, and
the one "can this row be embedded?" rule (``reject_unembeddable``). Pure, no Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.io import schema as S
from pipeline.tokenize import text_problem


def test_excerpt():
    assert S.excerpt("short") == "short"
    assert S.excerpt(12) == "12"
    assert S.excerpt(b"\xff") == "b'\\xff'"
    assert S.excerpt("a\ud800b") == "a\\ud800b"  # a lone surrogate stays writable as UTF-8
    long = S.excerpt("x" * 500)
    assert long == "x" * S.EXCERPT_CHARS + "..."


def test_output_metadata_roundtrips_through_schema():
    meta = S.output_metadata(model_id="m", revision=None, fingerprint="f", task="document",
                             prefix="search_document: ", dims=(768, 256), output_dtype="float16")
    assert meta["widths"] == [768, 256]
    assert meta["columns"] == {"768": "embedding_768", "256": "embedding_256"}
    assert meta["dtype"] == "float16" and meta["normalization"] == S.NORMALIZATION
    schema = pa.schema([("id", pa.int64())]).with_metadata(S.encode_metadata(meta))
    assert S.read_metadata(schema) == meta


def test_read_metadata_other_metadata_is_key_error():
    with pytest.raises(KeyError):
        S.read_metadata(pa.schema([("id", pa.int64())]).with_metadata({b"pandas": b"{}"}))


def test_read_metadata_no_metadata_is_key_error():
    with pytest.raises(KeyError):
        S.read_metadata(pa.schema([("id", pa.int64())]))


def test_internal_names_are_prefixed_and_distinct():
    names = [S.ID, S.TEXT, S.SOURCE, S.ROW, S.FILE_ROWS, S.FILE_ROWSUM, S.REJECT, S.EXCERPT,
             S.TOKENS, S.NUM_TOKENS, S.TRUNCATED, S.TOKENIZE_S, S.GRID_TOKENS, S.BATCH_MAX,
             S.ENCODE_S, S.ENCODE_START, S.ENCODE_END]
    assert len(set(names)) == len(names) and all(n.startswith("__") for n in names)
    assert S.REJECTS_SCHEMA.names == ["id", "source", "row", "reason", "excerpt"]


# ---------------------------------------------------------------------------------------------
# reject_unembeddable: the one "can this row be embedded?" rule (reader, diff, tokenizer)


def judge(ids_null, texts, rejects=None, excerpts=None, skip=None):
    """``reject_unembeddable`` on fresh lists; returns (good indices, rejects, excerpts)."""
    rejects = list(rejects) if rejects is not None else [None] * len(texts)
    excerpts = list(excerpts) if excerpts is not None else [None] * len(texts)
    good = S.reject_unembeddable(list(ids_null), list(texts), rejects, excerpts, skip)
    return good, rejects, excerpts


def test_reject_unembeddable_keeps_good_rows_and_names_each_problem():
    texts = ["fine", "", "  \t\n ", None, 7, b"bytes", "lone \ud800 here", "also fine", "ok"]
    ids_null = [False] * 8 + [True]
    good, rejects, excerpts = judge(ids_null, texts)
    assert good == [0, 7]
    assert rejects == [None, "text is empty or whitespace only",
                       "text is empty or whitespace only", "text is null", "text is int, not str",
                       "text is bytes, not str",
                       "text has a lone surrogate: U+D800 at position 5", None, "id is null"]
    # The tokenizer's own rule, word for word, for every text problem.
    assert rejects[1:7] == [text_problem(t) for t in texts[1:7]]
    # Each rejected row keeps an excerpt of its raw text; good rows none.
    assert excerpts == [None, "", "  \t\n ", "None", "7", "b'bytes'", "lone \\ud800 here",
                        None, "ok"]


def test_reject_unembeddable_null_id_comes_before_a_bad_text():
    good, rejects, excerpts = judge([True, True], ["", None])
    assert good == [] and rejects == ["id is null", "id is null"]
    assert excerpts == ["", "None"]


def test_reject_unembeddable_long_text_excerpt_is_cut():
    _, rejects, excerpts = judge([True], ["x" * 1000])
    assert rejects == ["id is null"] and excerpts == ["x" * S.EXCERPT_CHARS + "..."]


def test_reject_unembeddable_leaves_rejected_and_skipped_rows_alone():
    texts = ["", "fine", None, "good", "   ", "also good"]
    before = ["malformed JSON: x", "duplicate id: first seen at row 1", None, None, None, None]
    excerpts_before = ["{x", "raw", None, None, None, None]
    skip = [False, False, True, True, False, False]  # e.g. rows whose vectors are reused
    good, rejects, excerpts = judge([False, True, True, False, False, False], texts, before,
                                    excerpts_before, skip)
    # Rows 0-1 keep their earlier reason and excerpt (row 1's null id is not judged again);
    # skipped rows 2-3 are neither rejected (row 2's null id and text) nor counted as good.
    assert rejects == ["malformed JSON: x", "duplicate id: first seen at row 1", None, None,
                       "text is empty or whitespace only", None]
    assert excerpts == ["{x", "raw", None, None, "   ", None]
    assert good == [5]


def test_reject_unembeddable_updates_the_lists_in_place_and_handles_nothing():
    rejects, excerpts = [None, None], [None, None]
    good = S.reject_unembeddable([False, False], ["a", ""], rejects, excerpts)
    assert good == [0] and rejects == [None, "text is empty or whitespace only"]
    assert excerpts == [None, ""]
    assert S.reject_unembeddable([], [], [], []) == []
    assert judge([False, False], ["a", "b"], skip=[False, False])[0] == [0, 1]
