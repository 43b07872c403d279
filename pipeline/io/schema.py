"""Column names inside the pipeline, and the output and rejects schemas users read.

Rows travel between stages as Arrow tables with the internal columns below (``__`` prefix,
which user column names may not use) beside the user's kept columns. The row id and its
origin (source file, row) travel with every row, so no stage relies on row order.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from ..config import embedding_column
from ..tokenize import text_problem

# Set by the reader.
ID = "__id"
TEXT = "__text"
SOURCE = "__source"  # the input file's URI
UNIT = "__unit"  # the unit of work: the file's URI, or a row-group slice of it (set on read)
ROW = "__row"  # 0-based row index in a Parquet file, 1-based line number in a JSONL file
FILE_ROWS = "__file_rows"  # rows in the source file (Parquet: every block; JSONL: last block)
FILE_ROWSUM = "__file_rowsum"  # the sum of the file's row numbers, set like FILE_ROWS
REJECT = "__reject"  # why the row cannot be embedded; null for a good row
EXCERPT = "__excerpt"  # a short excerpt of the raw value, for rejected rows
# Set by the tokenizer stage (TEXT is dropped there: token ids, not strings, go downstream).
TOKENS = "__tokens"  # list<int32>, empty for rejected rows
NUM_TOKENS = "__num_tokens"
TRUNCATED = "__truncated"
TOKENIZE_S = "__tokenize_s"  # this row's share of its tokenizer batch's wall time
# Set by the tokenizer stage with --long-text chunk (a row stays one document: its chunks'
# ids follow each other in TOKENS, NUM_TOKENS is their sum).
CHUNK_LENGTHS = "__chunk_lengths"  # list<int32>: model input tokens per chunk
CHAR_STARTS = "__char_starts"  # list<int64>: each chunk's char_start in the document's text
CHAR_ENDS = "__char_ends"  # list<int64>: char_end (exclusive)
CHUNK_WEIGHTS = "__chunk_weights"  # list<int32>: document tokens each adds beyond the overlap
CHUNK_TEXTS = "__chunk_texts"  # list<string>, with --keep-chunk-text
OVERLAP_TOKENS = "__overlap_tokens"  # document tokens shared by consecutive chunks
# Set by the encoder stage.
GRID_TOKENS = "__grid_tokens"  # attention slots the encoder computed this row at
BATCH_MAX = "__batch_max"  # the longest sequence of this row's encoder batch
ENCODE_S = "__encode_s"
ENCODE_START = "__encode_start"  # wall-clock (epoch) start and end of this row's encoder window
ENCODE_END = "__encode_end"

# Set by the nightly job's diff against the previous snapshot (pipeline/stages/diff.py).
HASH = "__hash"  # content hash of the prefixed text (the snapshot's content_hash column)
BUCKET = "__bucket"  # the id's hash bucket: rows of one id meet in one diff call
CHANGE = "__change"  # "new", "changed" or "unchanged" against the previous snapshot
REUSE = "__reuse"  # true: the previous snapshot's embeddings are reused, the row is not encoded
PREV_HASH = "__prev_hash"  # the previous snapshot's rows, read for the diff
SEEN = "__seen"  # ids a resumed snapshot committed earlier (checked for duplicates)


def doc_embedding(width: int) -> str:
    """A chunked document's vector of one width (``--doc-vectors``), set by the encoder."""
    return f"__doc_{width}"


def prev_embedding(width: int) -> str:
    """The previous snapshot's embedding of one width, carried to the encoder for reuse."""
    return f"__prev_{width}"


EXCERPT_CHARS = 200
METADATA_KEY = b"nomic_moe_pipeline"
NORMALIZATION = ("mean pooling over all tokens, then for each width the first d features "
                 "L2-normalised (every stored vector has unit norm)")

REJECTS_SCHEMA = pa.schema([
    ("id", pa.string()),  # the id as text (ids of any type share one rejects schema); null if none
    ("source", pa.string()),
    ("row", pa.int64()),
    ("reason", pa.string()),
    ("excerpt", pa.string()),
])


def excerpt(value: Any) -> str:
    """A short, printable excerpt of a raw value for the rejects output."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def reject_unembeddable(ids_null: list[bool], texts: list[Any], rejects: list[str | None],
                        excerpts: list[str | None], skip: list[bool] | None = None) -> list[int]:
    """The one rule for "can this row be embedded?", applied where rows are read (before the
    duplicate check), diffed (nightly) and tokenized: a row not rejected so far (nor marked in
    ``skip``) is rejected when its id is null or its text unusable
    (:func:`pipeline.tokenize.text_problem`). ``rejects`` and ``excerpts`` are updated in
    place; returns the indices of the embeddable rows."""
    good = []
    for i, text in enumerate(texts):
        if rejects[i] is not None or (skip is not None and skip[i]):
            continue
        reason = "id is null" if ids_null[i] else text_problem(text)
        if reason:
            rejects[i], excerpts[i] = reason, excerpt(text)
        else:
            good.append(i)
    return good


def embedding_type(width: int, output_dtype: str) -> pa.DataType:
    value = pa.float16() if output_dtype == "float16" else pa.float32()
    return pa.list_(value, width)


def output_metadata(*, model_id: str, revision: str | None, fingerprint: str, task: str,
                    prefix: str, dims: tuple[int, ...], output_dtype: str) -> dict[str, Any]:
    """What a consumer needs to trust the vectors; stored in every file's schema metadata."""
    return {
        "model_id": model_id, "revision": revision, "weights_fingerprint": fingerprint,
        "task": task, "prefix": prefix, "widths": list(dims),
        "columns": {str(d): embedding_column(d) for d in dims},
        "dtype": output_dtype, "normalization": NORMALIZATION,
    }


def encode_metadata(metadata: dict[str, Any]) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The pipeline metadata of an output file's schema (``KeyError`` if it has none)."""
    if not schema.metadata or METADATA_KEY not in schema.metadata:
        raise KeyError(f"schema has no {METADATA_KEY.decode()} metadata: not a pipeline output")
    return json.loads(schema.metadata[METADATA_KEY])
