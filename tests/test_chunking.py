"""Long documents (``pipeline/chunking.py`` and ``--long-text`` in the stages and the writer):
every chunk is a slice of the text found by the tokenizer's offsets, fits the window, and is
embedded exactly as ``Embedder.encode`` embeds that slice; together the chunks cover the
document; awkward scripts and characters never break a span. No Ray: the stages are called
directly, on the tiny random-weight model (``embedder`` and ``tokenizer_json`` are conftest's).
"""

from __future__ import annotations

import base64
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.chunking import Chunker, ChunkingError, LongText, SEGMENT_CHARS
from pipeline.io import schema as S
from pipeline.io.writers import OutputSpec, chunk_rows, split_rows
from pipeline.model.builder import sample_texts
from pipeline.stages.embed import EncodeStage, TokenizeStage
from pipeline.tokenize import TextTokenizer, cut_text
from tests.test_stages_embed import reader_table as stage_rows

PREFIX = "search_document: "
DIMS = (64, 32)


def long_documents() -> dict[str, str]:
    """A multilingual long-document corpus with the awkward inputs users have."""
    texts = sample_texts()
    rng = random.Random(7)
    prose = " ".join(rng.choice(texts) for _ in range(60))
    return {
        "prose": prose,
        "cjk": "東京都の人口は約千四百万人です。大阪は商業の町として知られている。" * 40
               + "日本語の文章には空白がありません！本当ですか？" * 30,
        "thai": "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ " * 80,
        "hindi": "यह एक वाक्य है। यह दूसरा वाक्य है। " * 80,
        "bidi": ("\u202bمرحبا بالعالم\u202c \u200fשלום עולם\u200e hello. " * 80),
        "emoji": ("👨\u200d👩\u200d👧\u200d👦 family 🇫🇷🇯🇵 flags 👍🏽👋🏿 tones e\u0301 n\u0303 "
                  "combining. ") * 60,
        "controls": ("line one\r\nline two\u2028line three\x00nul\ufeffbom\u200bzero width. "
                     * 60),
        "repeated": "The same sentence again. " * 200,
        "specials": ("literal <s> and </s> and search_query: inside the text. " * 60),
        "base64": base64.b64encode(bytes(rng.randrange(256) for _ in range(9_000))).decode(),
        "url": "https://example.com/" + "a1b2c3d4" * 1_000,
        "one_sentence": " ".join(["word"] * 3_000),
        "leading_query_prefix": "search_query: " + prose,
    }


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json) -> TextTokenizer:
    return TextTokenizer.from_json(tokenizer_json)


def check_chunks(chunker: Chunker, text: str, chunks) -> None:
    """The contract, for one document."""
    offsets = np.concatenate(([0], np.cumsum(chunks.lengths)))
    assert chunks.count >= 1 and (np.diff(chunks.starts) > 0).all(), "starts increase"
    covered = np.zeros(len(text), bool)
    for k in range(chunks.count):
        a, b = int(chunks.starts[k]), int(chunks.ends[k])
        assert 0 <= a < b <= len(text)
        piece = text[a:b]
        assert "\ufffd" not in piece or "\ufffd" in text
        ids = chunks.ids[offsets[k]:offsets[k + 1]].tolist()
        assert ids == chunker.model_input(piece), f"chunk {k}: ids are not its own text's"
        assert len(ids) <= chunker.window
        covered[a:b] = True
    missed = [i for i in np.flatnonzero(~covered) if not text[i].isspace()]
    assert not missed, f"characters in no chunk: {[text[i] for i in missed[:10]]}"


@pytest.mark.parametrize("window,overlap", [(512, 64), (96, 24), (40, 0)])
def test_every_chunk_is_its_slice_fits_and_the_chunks_cover_the_text(tokenizer, window,
                                                                     overlap):
    chunker = Chunker(tokenizer, PREFIX, window, overlap, max_chunks=10_000)
    for name, text in long_documents().items():
        chunks = chunker.chunk(text)
        assert not isinstance(chunks, str), name
        check_chunks(chunker, text, chunks)
        assert chunks.count > 1, f"{name} must need several chunks"
        assert (chunks.weights >= 0).all() and chunks.weights.sum() > 0


def test_consecutive_chunks_overlap_by_the_asked_tokens(tokenizer):
    chunker = Chunker(tokenizer, PREFIX, 128, 32, max_chunks=10_000)
    text = long_documents()["one_sentence"]  # no sentence end: windows of 128 tokens
    chunks = chunker.chunk(text)
    assert chunks.overlap_tokens == 32 * (chunks.count - 1)
    # Each chunk after the first starts 32 tokens before the previous one ends (as the text
    # between is tokenized on its own: +-1 at a word cut).
    raw = tokenizer.untruncated()
    for k in range(1, chunks.count):
        shared = text[chunks.starts[k]:chunks.ends[k - 1]]
        assert abs(len(raw.encode(shared, add_special_tokens=False).ids) - 32) <= 1


def test_windows_end_at_sentence_ends_when_there_is_one_in_the_last_part(tokenizer):
    chunker = Chunker(tokenizer, PREFIX, 96, 16, max_chunks=10_000)
    docs = long_documents()
    for name in ("hindi", "cjk", "repeated"):
        text = docs[name]
        chunks = chunker.chunk(text)
        for end in chunks.ends[:-1]:
            assert text[end - 1] in "。！？।.", f"{name}: a chunk ends at {text[end - 5:end]!r}"
    # Line breaks count as sentence ends.
    text = "\n".join(f"line {i} of a log without full stops" for i in range(200))
    chunks = chunker.chunk(text)
    assert all(text[e] == "\n" for e in chunks.ends[:-1])


def test_repeated_text_gets_the_offsets_of_each_occurrence(tokenizer):
    """Spans come from offsets, not from searching: the same sentence repeated gets the
    position of each copy."""
    chunker = Chunker(tokenizer, PREFIX, 40, 8, max_chunks=10_000)
    text = "Alpha beta gamma delta. " * 100
    chunks = chunker.chunk(text)
    assert len(set(chunks.starts.tolist())) == chunks.count
    assert chunks.ends[-1] == len(text.rstrip())


def test_a_document_that_fits_is_one_chunk_the_whole_text(tokenizer):
    chunker = Chunker(tokenizer, PREFIX, 512, 64)
    for text in ["short", "  padded text  ", sample_texts()[0]]:
        chunks = chunker.chunk(text)
        assert chunks.count == 1 and (chunks.starts[0], chunks.ends[0]) == (0, len(text))
        assert chunks.ids.tolist() == chunker.model_input(text)


def test_exactly_the_budget_and_one_over(tokenizer):
    chunker = Chunker(tokenizer, PREFIX, 512, 64)
    sentences = long_documents()["prose"] + " "
    by_length = {}
    base = sentences[:600].rsplit(" ", 1)[0]
    for k in range(0, 600):  # a text, then "a" words (one token each) to the exact length
        text = base + " a" * k
        n = len(chunker.model_input(text))
        by_length.setdefault(n, text)
        if n > 513:
            break
    for n in (511, 512, 513):
        assert n in by_length, sorted(by_length)[-5:]
        chunks = chunker.chunk(by_length[n])
        assert chunks.count == (1 if n <= 512 else 2), n
        check_chunks(chunker, by_length[n], chunks)


def test_a_character_longer_than_the_window_is_cut_and_counted(tokenizer):
    """NFKC expands U+FDFA to 18 characters (many tokens); a tiny window cannot hold one:
    the chunk is cut to the window, never split inside the character."""
    chunker = Chunker(tokenizer, PREFIX, 20, 2, max_chunks=10_000)
    text = "\ufdfa " * 3
    chunks = chunker.chunk(text)
    assert chunks.truncated >= 1 and (chunks.lengths <= 20).all()
    for a, b in zip(chunks.starts, chunks.ends):
        assert text[a:b].strip() == "\ufdfa"


def test_more_than_max_chunks_is_a_reason_found_early(tokenizer):
    chunker = Chunker(tokenizer, PREFIX, 64, 8, max_chunks=5)
    reason = chunker.chunk("word " * 4_000_000)  # 20 MB; stops after the 6th chunk
    assert reason == "document over --max-chunks: needs more than 5 chunks (20,000,000 characters)"


def test_refused_windows(tokenizer):
    with pytest.raises(ChunkingError, match="less than half"):
        Chunker(tokenizer, PREFIX, 512, 256)
    with pytest.raises(ChunkingError, match="leaves"):
        Chunker(tokenizer, PREFIX, 10, 0)
    with pytest.raises(ChunkingError, match="from 1 to the model's 512"):
        Chunker(tokenizer, PREFIX, 600, 0)


def test_count_tokens_exact_and_by_segments(tokenizer):
    chunker = Chunker(tokenizer, PREFIX, 512, 64)
    text = "counted words here " * 3_000
    count, exact = chunker.count_tokens(text)
    assert exact and count == len(chunker.model_input(text))
    approx, exact = chunker.count_tokens(text, exact_chars=1_000)
    assert not exact and abs(approx - count) <= 2


# ---------------------------------------------------------------------------------------------
# Truncation of a huge text tokenizes a safe prefix of it


def test_truncation_of_a_huge_text_equals_truncating_it_whole(tokenizer):
    whole = TextTokenizer(tokenizer.untruncated())  # truncates the full text
    docs = list(long_documents().values())
    docs += [" " * 100_000 + "late words", "\x00" * 20_000 + " then text " * 600,
             "x" * 30_000, " ".join(sample_texts()) * 20]
    prefixed = [PREFIX + d for d in docs]
    cut, full = tokenizer.encode(prefixed), whole.encode(prefixed)
    for i, doc in enumerate(docs):
        if " " in doc[: 8192] or len(doc) <= 8192:  # one word of > 8k chars is cut inside
            assert cut.sequence(i).tolist() == full.sequence(i).tolist(), i
        assert cut.truncated[i] == full.truncated[i]
    assert cut_text("abc def", 5) == "abc" and cut_text("abcdef", 3) == "abc"


# ---------------------------------------------------------------------------------------------
# The stages and the writer in chunk mode


@pytest.fixture(scope="module")
def chunk_encoder(tiny_model_dir):
    # One thread: two OpenMP threads on a busy 2-core machine took 10-30x longer here.
    before = torch.get_num_threads()
    yield EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                      dims=DIMS, output_dtype="float32", max_tokens_per_batch=2048,
                      doc_vectors=True, threads=1)
    torch.set_num_threads(before)  # the process's other tests keep theirs


def reader_table(ids, texts) -> pa.Table:
    table = stage_rows(ids, texts)
    return table.append_column(S.FILE_ROWSUM, pa.nulls(table.num_rows, pa.int64()))


def chunk_spec(long_text: LongText) -> OutputSpec:
    return OutputSpec("id", (), DIMS, "float32", {}, long_text=long_text)


def embedded_chunks(tokenizer_json, encoder, texts, long_text, batch_rows=None):
    table = reader_table(list(range(len(texts))), texts)
    tokenized = TokenizeStage(tokenizer_json, "document", long_text)(table)
    step = batch_rows or len(texts)
    parts = [encoder(tokenized.slice(i, step)) for i in range(0, len(texts), step)]
    return pa.concat_tables(parts)


def test_chunk_vectors_equal_embedder_encode_of_the_chunk_text(tokenizer_json, chunk_encoder,
                                                               embedder):
    long_text = LongText("chunk", 96, 24, 10_000, chunk_text=True, doc_vectors=True)
    docs = long_documents()
    texts = [docs[n][:2500] for n in ("prose", "cjk", "emoji", "specials",
                                       "leading_query_prefix")]
    texts += ["a short one", "", "fits: " + sample_texts()[1]]
    encoded = embedded_chunks(tokenizer_json, chunk_encoder, texts, long_text)
    embedded, rejects, stats = split_rows(encoded, chunk_spec(long_text))
    assert rejects["reason"].to_pylist() == ["text is empty or whitespace only"]
    rows = embedded.to_pydict()
    assert rows["chunk_text"] == [texts[i][a:b] for i, a, b in
                                  zip(rows["id"], rows["char_start"], rows["char_end"])]
    for doc in set(rows["id"]):
        mine = [k for k, i in enumerate(rows["id"]) if i == doc]
        assert [rows["chunk"][k] for k in mine] == list(range(len(mine)))
        assert {rows["chunks"][k] for k in mine} == {len(mine)}
    want = embedder.encode(rows["chunk_text"], dims=DIMS)
    for d in DIMS:
        got = np.array(rows[f"embedding_{d}"], np.float32)
        np.testing.assert_allclose(got, want[d], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    short = rows["id"].index(5)
    assert (rows["char_start"][short], rows["char_end"][short]) == (0, len(texts[5]))
    assert stats["chunks"] == embedded.num_rows and stats["rows_embedded"] == len(texts) - 1
    assert stats["chunks_max"] == max(rows["chunks"])
    assert stats["docs_chunked"] == 5 and stats["overlap_tokens"] > 0


def test_document_vectors_are_the_weighted_mean_of_pooled_chunks(tokenizer_json, chunk_encoder,
                                                                 embedder):
    long_text = LongText("chunk", 96, 24, 10_000, chunk_text=True, doc_vectors=True)
    text = long_documents()["prose"][:3000]
    encoded = embedded_chunks(tokenizer_json, chunk_encoder, [text], long_text)
    chunker = Chunker(TextTokenizer.from_json(tokenizer_json), PREFIX, 96, 24)
    chunks = chunker.chunk(text)
    pieces = [text[a:b] for a, b in zip(chunks.starts, chunks.ends)]
    pooled = embedder.embed_tokenized(embedder.tokenize(pieces), DIMS, pooled=True)[0]
    mean = (pooled * chunks.weights[:, None]).sum(0) / chunks.weights.sum()
    for d in DIMS:
        want = mean[:d] / np.linalg.norm(mean[:d])
        got = np.array(encoded[S.doc_embedding(d)].to_pylist()[0], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunks_are_the_same_in_any_batching(tokenizer_json, chunk_encoder):
    """As actors see it: one window or many small ones give the same rows and vectors."""
    long_text = LongText("chunk", 96, 24, 10_000)
    texts = [d[:2000] for d in list(long_documents().values())[:6]] + ["tiny", "also tiny"]
    one = chunk_rows(embedded_chunks(tokenizer_json, chunk_encoder, texts, long_text),
                     chunk_spec(long_text))
    many = chunk_rows(embedded_chunks(tokenizer_json, chunk_encoder, texts, long_text, 3),
                      chunk_spec(long_text))
    assert one.drop_columns([f"embedding_{d}" for d in DIMS]).equals(
        many.drop_columns([f"embedding_{d}" for d in DIMS]))
    for d in DIMS:
        np.testing.assert_allclose(np.array(one[f"embedding_{d}"].to_pylist()),
                                   np.array(many[f"embedding_{d}"].to_pylist()), atol=1e-6)


def test_reject_mode_names_the_token_count(tokenizer_json, chunk_encoder):
    text = long_documents()["prose"]
    tokenized = TokenizeStage(tokenizer_json, "document", LongText("reject"))(
        reader_table([1, 2], [text, "fits"]))
    reasons = tokenized[S.REJECT].to_pylist()
    count = len(Chunker(TextTokenizer.from_json(tokenizer_json), PREFIX, 512, 64)
                .model_input(text))
    assert reasons[0] == (f"text over the model's 512-token limit: {count:,} tokens with the "
                          "task prefix (--long-text reject)") and reasons[1] is None
    assert tokenized[S.TRUNCATED].to_pylist() == [False, False]


def test_more_than_max_chunks_goes_to_rejects_with_the_reason(tokenizer_json, chunk_encoder):
    long_text = LongText("chunk", 96, 24, 3)
    texts = [long_documents()["prose"], "fits", "x " * (SEGMENT_CHARS // 2 + 10)]
    encoded = embedded_chunks(tokenizer_json, chunk_encoder, texts, long_text)
    embedded, rejects, stats = split_rows(encoded, chunk_spec(long_text))
    assert rejects["row"].to_pylist() == [0, 2]
    assert all(r.startswith("document over --max-chunks: needs more than 3 chunks")
               for r in rejects["reason"].to_pylist())
    assert embedded["id"].to_pylist() == [1] and stats["rows"] == 3


def test_sentence_ends_survive_a_shortened_window_and_a_dot_needs_a_space_after_it(tokenizer):
    # A window that re-tokenizes one token too long goes back to the previous sentence end.
    text = ("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。カタカナとひらがなを"
            "混ぜる！") * 50
    chunks = Chunker(tokenizer, PREFIX, 128, 16, max_chunks=10_000).chunk(text)
    assert all(text[e - 1] in "。！" for e in chunks.ends[:-1])
    # "3.14", "www.example.com" and "a?b=1" end no sentence; "here. " does.
    text = "Pi is 3.14 and www.example.com/a?b=1 is here. " * 40
    chunks = Chunker(tokenizer, PREFIX, 64, 8, max_chunks=10_000).chunk(text)
    ends = [e for e in chunks.ends[:-1] if text[e - 1] in ".?"]
    assert len(ends) > 10 and all(text[e - 5:e] == "here." for e in ends)
