"""Text -> token ids: task prefixes, validation, truncation to the model's 512 tokens.

Uses the model directory's fast tokenizer (``tokenizer.json``, batch encoding in Rust). The
task prefix is plain text prepended before tokenisation and counts toward the 512 tokens
(model-spec section 4); truncation cuts the text and keeps ``</s>``.

A long text is cut to a safe number of characters before it is tokenized (a 1 MB text is not
tokenized whole to keep its first 512 tokens): at whitespace before ``16 x max_length``
characters, doubled until the cut text alone overflows the limit or the text is whole. Cuts
fall between words, which the tokenizer segments one by one, so the ids are those of the
whole text (one word of more than ~8,000 characters is cut inside).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from .model.config import MAX_SEQ_LEN

TASK_PREFIXES = {
    "document": "search_document: ",
    "query": "search_query: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}
# Token ids the model was trained with (XLM-R SentencePiece); a tokenizer that disagrees is
# not this model's tokenizer.
SPECIAL_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}

_SURROGATE = re.compile("[\ud800-\udfff]")
# Truncation tokenizes at most this many characters per token of the limit at first.
CUT_CHARS_PER_TOKEN = 16
_CUT_SLACK = 1024


class TokenizerError(ValueError):
    """The model directory has no usable tokenizer for this model."""


def task_prefix(task: str) -> str:
    """The text prefix of ``task`` (document, query, classification, clustering)."""
    try:
        return TASK_PREFIXES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASK_PREFIXES)}") from None


def add_prefix(text: str, prefix: str) -> str:
    """``prefix + text`` unless the text already starts with a known task prefix."""
    if any(text.startswith(p) for p in TASK_PREFIXES.values()):
        return text
    return prefix + text


def text_problem(text: Any) -> str | None:
    """Why ``text`` cannot be embedded, or ``None`` if it can.

    Empty and whitespace-only texts carry no content (the embedding would be the prefix's);
    lone surrogates are not Unicode scalar values and cannot be encoded as UTF-8.
    """
    if text is None:
        return "text is null"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not str"
    if not text.strip():
        return "text is empty or whitespace only"
    bad = _SURROGATE.search(text)
    if bad:
        return f"text has a lone surrogate: U+{ord(bad.group()):04X} at position {bad.start()}"
    return None


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
    """Token ids of ``N`` texts, flat: text ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # int32 [sum(lengths)]
    lengths: np.ndarray  # int32 [N], each including <s> and </s>
    truncated: np.ndarray  # bool [N]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths, dtype=np.int64)))

    def sequence(self, i: int) -> np.ndarray:
        o = self.offsets
        return self.ids[o[i] : o[i + 1]]


class TextTokenizer:
    """The fast tokenizer of a model directory, truncating to ``max_length`` tokens."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = MAX_SEQ_LEN) -> None:
        if not 3 <= max_length <= MAX_SEQ_LEN:
            raise ValueError(f"max_length must be in [3, {MAX_SEQ_LEN}], got {max_length}")
        for token, want in SPECIAL_IDS.items():
            got = tokenizer.token_to_id(token)
            if got != want:
                raise TokenizerError(f"tokenizer maps {token} to {got}, this model needs {want}")
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_length)
        self._tok = tokenizer
        self.max_length = max_length

    @classmethod
    def from_dir(cls, model_dir: str | Path, max_length: int = MAX_SEQ_LEN) -> "TextTokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer.json in model directory {str(model_dir)!r}; the encoder needs the "
                "model's fast tokenizer file (it is part of the hub repo)"
            )
        return cls(Tokenizer.from_file(str(path)), max_length)

    @classmethod
    def from_json(cls, text: str, max_length: int = MAX_SEQ_LEN) -> "TextTokenizer":
        """From the contents of a ``tokenizer.json`` (how Ray actors receive it: no model files)."""
        return cls(Tokenizer.from_str(text), max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def untruncated(self) -> Tokenizer:
        """A copy of the tokenizer that does not truncate (for chunking and counting)."""
        tok = Tokenizer.from_str(self._tok.to_str())
        tok.no_truncation()
        return tok

    def encode(self, texts: Sequence[str]) -> TokenizedBatch:
        """Tokenise already-prefixed, already-validated texts (see :func:`text_problem`)."""
        texts = list(texts)
        chars = CUT_CHARS_PER_TOKEN * self.max_length
        encodings = self._tok.encode_batch([cut_text(t, chars) for t in texts],
                                           add_special_tokens=True)
        for i, text in enumerate(texts):
            # Cut, yet within the limit: the cut may have dropped tokens that fit; cut later.
            limit = chars
            while len(text) > limit and not encodings[i].overflowing:
                limit *= 2
                encodings[i] = self._tok.encode(cut_text(text, limit), add_special_tokens=True)
        # ``Encoding.ids`` builds a new Python list at each read: read once, flattened once.
        ids_E = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids_E), np.int32, len(ids_E))
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), bool, len(encodings))
        ids = np.fromiter(itertools.chain.from_iterable(ids_E), np.int32, int(lengths.sum()))
        return TokenizedBatch(ids, lengths, truncated)


def cut_text(text: str, chars: int) -> str:
    """``text`` if it has at most ``chars`` characters, else a prefix of it ending at the last
    whitespace before ``chars`` (or at ``chars`` when there is none in the last 1,024)."""
    if len(text) <= chars:
        return text
    cut = max(text.rfind(c, max(0, chars - _CUT_SLACK), chars) for c in " \n\t\r")
    return text[:cut] if cut > 0 else text[:chars]
