"""Long documents: a text over the model's limit becomes chunks, each embedded exactly.

A document is tokenized once, with character offsets, to choose its windows in token space
(streamed in segments, so a 50 MB document never holds all its tokens at once). Each window
is then cut back out of the original text by those offsets (``text[char_start:char_end]``,
never found by searching) and tokenized on its own, exactly as ``Embedder.encode`` would
tokenize that chunk text: the chunk's vector is the chunk text's embedding. A window that
grows past the limit when re-tokenized on its own (a word cut at its start segments
differently) is shortened until it fits.

Windows:

- every chunk's model input (``<s>``, the task prefix, the chunk text, ``</s>``) has at most
  ``window`` tokens;
- consecutive chunks share ``overlap`` tokens of the document;
- a window ends after the last sentence end (``. ! ? 。 ！ ？ । ؟ …`` or a line break) in its last
  40%, else at the last token that fits;
- a boundary never falls between two tokens made from one character (NFKC expands some
  characters to several tokens), so no chunk splits a character; whitespace at a chunk's
  edges is left out, anything else between tokens (characters the normalizer drops) is kept.

A document that fits is one chunk: the whole text, char_start 0, char_end ``len(text)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .tokenize import TextTokenizer, add_prefix

LONG_TEXT = ("truncate", "chunk", "reject")
# The output columns of --long-text chunk beside the id, kept and embedding columns.
CHUNK_COLUMNS = ("chunk", "chunks", "char_start", "char_end", "tokens", "chunk_text")
DEFAULT_OVERLAP = 64
DEFAULT_MAX_CHUNKS = 1000
# A window ends at a sentence end found in its last SENTENCE_ZONE of tokens.
SENTENCE_ZONE = 0.4
# Marks that end a sentence where whitespace (or the text's end) follows them ("3.14",
# "www.example.com" and "a?b=1" do not end one)...
SPACED_ENDS = frozenset(".!?…‼⁇⁈⁉؟")
# ...and marks that end one wherever they are (scripts written without spaces).
UNSPACED_ENDS = frozenset("。！？।॥።፧။჻｡")
SENTENCE_ENDS = SPACED_ENDS | UNSPACED_ENDS
LINE_BREAKS = frozenset("\n\r\u2028\u2029\x0b\x0c\x85")
# Documents are tokenized for planning in segments of about this many characters, each cut
# at whitespace where there is some in its last SEGMENT_SLACK characters.
SEGMENT_CHARS = 1 << 17
SEGMENT_SLACK = 1 << 10


@dataclasses.dataclass(frozen=True)
class LongText:
    """What a run does with a text over the model's limit (``--long-text`` and its options)."""

    mode: str = "truncate"  # truncate | chunk | reject
    window: int = 512  # model input tokens per chunk, prefix and <s>/</s> included
    overlap: int = DEFAULT_OVERLAP
    max_chunks: int = DEFAULT_MAX_CHUNKS
    chunk_text: bool = False  # write each chunk's text beside its vector
    doc_vectors: bool = False  # also one vector per document, under _documents/

    @property
    def chunked(self) -> bool:
        return self.mode == "chunk"

    def identity(self) -> dict | None:
        """The settings that decide the output (None: truncation, what every run did before
        ``--long-text`` existed, so their outputs stay resumable)."""
        if self.mode == "truncate":
            return None
        if self.mode == "reject":
            return {"mode": "reject"}
        return dataclasses.asdict(self)


# The reject reason's kind (before its ":") for a document over --max-chunks.
OVER_MAX_CHUNKS = "document over --max-chunks"


class ChunkingError(ValueError):
    """Chunking options that cannot work (refused before any data is read)."""


@dataclasses.dataclass(frozen=True)
class Chunks:
    """The chunks of one document, flat: chunk ``k`` is ``ids[offsets[k]:offsets[k+1]]``."""

    ids: np.ndarray  # int32 [sum(lengths)]: each chunk's model input, <s> ... </s>
    lengths: np.ndarray  # int32 [K]: model input tokens per chunk
    starts: np.ndarray  # int64 [K]: char_start (code points, inclusive)
    ends: np.ndarray  # int64 [K]: char_end (exclusive)
    weights: np.ndarray  # int32 [K]: document tokens each chunk adds beyond the overlap
    overlap_tokens: int = 0  # document tokens embedded twice (shared by consecutive chunks)
    truncated: int = 0  # chunks cut to the window (a single character longer than the window)

    @property
    def count(self) -> int:
        return len(self.lengths)


def prefix_tokens(tokenizer: Tokenizer, prefix: str) -> int:
    """Tokens the task prefix and ``<s>``/``</s>`` add to a chunk's model input."""
    probe = "x"
    with_prefix = len(tokenizer.encode(prefix + probe, add_special_tokens=True).ids)
    return with_prefix - len(tokenizer.encode(probe, add_special_tokens=False).ids)


def check_chunking(window: int, overlap: int, overhead: int, limit: int) -> None:
    """Refuse windows that cannot work: above the model's limit, no room for text after the
    prefix, or an overlap of half the window or more (every chunk would repeat the last)."""
    if not 1 <= window <= limit:
        raise ChunkingError(f"--chunk-tokens must be from 1 to the model's {limit} tokens, "
                            f"got {window}")
    room = window - overhead
    if room < 8:
        raise ChunkingError(
            f"--chunk-tokens {window} leaves {room} token(s) for text after the task prefix and "
            f"<s>/</s> ({overhead} tokens); use at least {overhead + 8}")
    if overlap < 0 or 2 * overlap >= room:
        raise ChunkingError(
            f"--chunk-overlap {overlap} must be at least 0 and less than half of the {room} text "
            f"tokens a {window}-token window holds after the prefix (at most {(room - 1) // 2})")


class Chunker:
    """Cut documents into chunks of at most ``window`` model-input tokens (see module doc)."""

    def __init__(self, tokenizer: TextTokenizer, prefix: str, window: int,
                 overlap: int = DEFAULT_OVERLAP, max_chunks: int = DEFAULT_MAX_CHUNKS) -> None:
        self._tok = tokenizer.untruncated()
        self.prefix, self.window, self.overlap = prefix, window, overlap
        self.max_chunks = max_chunks
        self.overhead = prefix_tokens(self._tok, prefix)
        check_chunking(window, overlap, self.overhead, tokenizer.max_length)
        # Document tokens per window: re-tokenizing a chunk on its own rarely changes its
        # count by more than a token or two, and a window that grew is shortened.
        self.room = window - self.overhead

    def model_input(self, chunk_text: str) -> list[int]:
        """The ids ``Embedder.encode([chunk_text])`` embeds (prefix, ``<s>``, ``</s>``)."""
        return self._tok.encode(add_prefix(chunk_text, self.prefix), add_special_tokens=True).ids

    def count_tokens(self, text: str, exact_chars: int = 1 << 20) -> tuple[int, bool]:
        """``(tokens, exact)``: the model input length of ``text`` untruncated (exact up to
        ``exact_chars`` characters; beyond, counted by segments, bounded in memory)."""
        if len(text) <= exact_chars:
            return len(self.model_input(text)), True
        words = sum(len(st) for st, _, _ in _segments(self._tok, text))
        return words + self.overhead, False

    def chunk(self, text: str) -> Chunks | str:
        """The chunks of ``text`` (already validated), or why it cannot be chunked (more than
        ``max_chunks`` chunks)."""
        ids = self.model_input(text) if len(text) <= SEGMENT_CHARS else None
        if ids is not None and len(ids) <= self.window:
            n = len(ids)
            return Chunks(np.asarray(ids, np.int32), np.array([n], np.int32),
                          np.array([0], np.int64), np.array([len(text)], np.int64),
                          np.array([n], np.int32))
        return self.chunk_long(text)

    def chunk_long(self, text: str) -> Chunks | str:
        """:meth:`chunk` of a text known not to fit one window (no whole-text tokenization
        first)."""
        all_ids: list[np.ndarray] = []
        lengths, starts, ends, weights = [], [], [], []
        truncated = overlap = 0
        tokens = _TokenStream(self._tok, text)
        s, covered_tok, covered_char = 0, 0, 0  # window start; tokens and chars chunked so far
        while True:
            tokens.fill(s + self.room + 1)
            e = self._window_end(text, tokens, s)
            if e <= s:  # the first character alone is longer than the window: that character
                e = tokens.boundary_after(s + 1)
            while True:
                a, b = self._span(text, tokens, s, e, covered_char)
                ids = self.model_input(text[a:b]) if b > a else []
                excess = len(ids) - self.window
                if excess <= 0:
                    break
                shorter = self._window_end(text, tokens, s, upto=e - excess)
                if shorter <= s:  # one character is longer than the window
                    ids = ids[: self.window - 1] + ids[-1:]
                    truncated += 1
                    break
                e = shorter
            if b > a:
                all_ids.append(np.fromiter(ids, np.int32, len(ids)))
                lengths.append(len(ids))
                starts.append(a)
                ends.append(b)
                weights.append(max(0, e - max(s, covered_tok)))
                overlap += max(0, covered_tok - s)
                if len(lengths) > self.max_chunks:
                    return (f"{OVER_MAX_CHUNKS}: needs more than {self.max_chunks:,} chunks "
                            f"({len(text):,} characters)")
                covered_char = b
            covered_tok = max(covered_tok, e)
            if e >= tokens.total and tokens.done:
                break
            s = max(tokens.boundary_before(e - self.overlap, s + 1) or e, s + 1)
            tokens.drop_before(s)
        lengths_K = np.array(lengths, np.int32)
        return Chunks(np.concatenate(all_ids) if all_ids else np.zeros(0, np.int32), lengths_K,
                      np.array(starts, np.int64), np.array(ends, np.int64),
                      np.array(weights, np.int32), overlap, truncated)

    def _window_end(self, text: str, tokens: "_TokenStream", s: int,
                    upto: int | None = None) -> int:
        """The exclusive end token of the window starting at ``s`` (and ending by ``upto``):
        all the rest when it fits, else after the last sentence end in the window's last 40%,
        else at the last boundary (``s`` when there is none)."""
        last = min(s + self.room, tokens.total) if upto is None else upto
        if upto is None and last >= tokens.total and tokens.done:
            return tokens.total
        zone = max(s + math.ceil((1 - SENTENCE_ZONE) * self.room), s + 1)
        if last >= zone:
            ends = tokens.sentence_ends(zone, last)
            if len(ends):
                return int(ends[-1])
        return tokens.boundary_before(last, s + 1) or s

    @staticmethod
    def _span(text: str, tokens: "_TokenStream", s: int, e: int, covered: int) -> tuple[int, int]:
        """Characters of tokens ``[s, e)``, widened over dropped characters next to the chunks
        so far (and to the text's ends), without whitespace at either edge."""
        a, b = tokens.start(s), tokens.end(e - 1)
        if a > covered:
            a = covered
        if e >= tokens.total and tokens.done:
            b = len(text)
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        return a, b


class _TokenStream:
    """The document's token offsets, tokenized a segment at a time, indexed globally; tokens
    before the current window are dropped. ``_sent[j]``: token ``j`` ends a sentence (it ends
    with a sentence-ending mark, or a line break follows it before the next token)."""

    def __init__(self, tokenizer: Tokenizer, text: str) -> None:
        self._segments = _segments(tokenizer, text)
        self.base = 0  # global index of self._st[0]
        self._st = np.zeros(0, np.int64)
        self._en = np.zeros(0, np.int64)
        self._sent = np.zeros(0, bool)
        self.done = False

    @property
    def total(self) -> int:
        """Tokens seen so far (global count)."""
        return self.base + len(self._st)

    def fill(self, upto: int) -> None:
        """Tokenize segments until ``upto`` tokens are known or the text ends."""
        while self.total < upto and not self.done:
            try:
                st, en, sent = next(self._segments)
            except StopIteration:
                self.done = True
                break
            self._st = np.concatenate([self._st, st])
            self._en = np.concatenate([self._en, en])
            self._sent = np.concatenate([self._sent, sent])

    def drop_before(self, i: int) -> None:
        keep = i - self.base
        if keep > 0:
            self._st, self._en, self._sent = self._st[keep:], self._en[keep:], self._sent[keep:]
            self.base = i

    def start(self, i: int) -> int:
        return int(self._st[i - self.base])

    def end(self, i: int) -> int:
        return int(self._en[i - self.base])

    def is_boundary(self, e: int) -> bool:
        """Whether a chunk may end before token ``e``: tokens ``e-1`` and ``e`` share no
        character (one character NFKC expands to several tokens stays whole)."""
        if e <= self.base or e >= self.total:
            return True
        return self.end(e - 1) <= self.start(e)

    def boundary_before(self, e: int, lowest: int) -> int | None:
        """The largest boundary ``<= e`` and ``>= lowest``, or None."""
        for i in range(min(e, self.total), lowest - 1, -1):
            if self.is_boundary(i):
                return i
        return None

    def boundary_after(self, e: int) -> int:
        """The smallest boundary ``>= e`` (tokenizing on as needed; the text's end at most)."""
        while True:
            for i in range(e, self.total):
                if self.is_boundary(i):
                    return i
            if self.done:
                return self.total
            self.fill(self.total + 1)

    def sentence_ends(self, lo: int, hi: int) -> np.ndarray:
        """Ends ``e`` in ``[lo, hi]`` (``hi < total``) after a sentence end, at a boundary."""
        e = np.arange(lo, hi + 1) - self.base
        ok = self._sent[e - 1] & (self._en[e - 1] <= self._st[e])
        return e[ok] + self.base


_SPACED_CODES = np.array(sorted(map(ord, SPACED_ENDS)), np.uint32)
_UNSPACED_CODES = np.array(sorted(map(ord, UNSPACED_ENDS)), np.uint32)
_SPACE_CODES = np.array([c for c in range(0x3000 + 1) if chr(c).isspace()], np.uint32)
_BREAK_CODES = np.array(sorted(map(ord, LINE_BREAKS)), np.uint32)


def _segments(tokenizer: Tokenizer, text: str) -> Iterator[tuple[np.ndarray, ...]]:
    """``(starts, ends, sentence_end)`` of ``text``'s tokens, a segment at a time (segments
    end at whitespace where possible, so words are tokenized whole)."""
    pos = 0
    while pos < len(text):
        end = min(len(text), pos + SEGMENT_CHARS)
        if end < len(text):
            cut = max(text.rfind(c, end - SEGMENT_SLACK, end) for c in " \n\t")
            if cut > pos:
                end = cut
        segment = text[pos:end]
        enc = tokenizer.encode(segment, add_special_tokens=False)
        # fromiter: ~10x faster than np.asarray on the list of (start, end) tuples.
        offsets = enc.offsets
        spans = np.fromiter(itertools.chain.from_iterable(offsets), np.int64,
                            2 * len(offsets)).reshape(-1, 2)
        st, en = spans[:, 0], spans[:, 1]
        codes = np.frombuffer(segment.encode("utf-32-le"), np.uint32)
        breaks = np.concatenate(([0], np.cumsum(np.isin(codes, _BREAK_CODES))))
        # A spaced mark ends a sentence before whitespace or at the text's end.
        after_space = np.append(np.isin(codes[1:], _SPACE_CODES),
                                end >= len(text) or text[end].isspace())
        marks = np.isin(codes, _UNSPACED_CODES) | (np.isin(codes, _SPACED_CODES) & after_space)
        following = np.append(st[1:], len(segment))
        sent = marks[np.maximum(en - 1, 0)] | (breaks[np.maximum(following, st)] > breaks[st])
        yield st + pos, en + pos, sent
        pos = end
