"""Words of many languages and scripts, ranked by frequency: what the benchmark tokenizer's
vocabulary is built from (:func:`pipeline.model.builder.real_size_tokenizer`) and what the
benchmark texts are written with (``pipeline/bench/workload.py``).

Two sources, same shape (a :class:`Language` per language, most frequent word first):

* ``wordfreq`` (``pip install wordfreq``, a benchmark-only dependency): real words and
  frequencies of its ~40 languages, 12 scripts among them;
* ``synthetic``: pseudo-words of each script's letters and vowel signs, Zipf-ranked, short
  words first. Always used for the scripts wordfreq lacks (Thai, Georgian, Ethiopic, ...),
  and for every script where wordfreq is not installed (also what the tests use: no
  dependency, deterministic).

Either way there are 27 scripts, several written without spaces between words (Chinese,
Japanese, Thai, Lao, Khmer, Myanmar, Tibetan).
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata

import numpy as np

try:  # a benchmark-only dependency: without it the synthetic lexicon stands in
    import wordfreq
except ImportError:
    wordfreq = None

SOURCES = ("auto", "wordfreq", "synthetic")
WORDS_PER_LANGUAGE = 20_000
SYNTHETIC_WORDS = 10_000  # enough for a language's share of the vocabulary; made in ~1 s


@dataclasses.dataclass(frozen=True)
class Script:
    """How a synthetic language of one script is written."""

    code: str  # ISO 639-1-like code of the language it stands for
    script: str
    letters: str  # syllable-initial characters
    signs: str = ""  # vowel signs / second characters that follow a letter
    spaced: bool = True  # words separated by spaces
    stop: str = "."
    syllables: tuple[int, int] = (1, 4)


def _chars(*ranges: tuple[int, int], categories=("Lo", "Lu", "Ll")) -> str:
    return "".join(chr(c) for a, b in ranges for c in range(a, b + 1)
                   if unicodedata.category(chr(c)) in categories)


def _signs(a: int, b: int) -> str:
    return _chars((a, b), categories=("Mn", "Mc"))


# One synthetic language per script. Word-frequency data covers the first twelve scripts.
SCRIPTS = (
    Script("en", "Latin", "bcdfghjklmnprstvwyz", "aeiouaeiouy"),
    Script("ru", "Cyrillic", _chars((0x0431, 0x0448)), "аеиоуыюя"),
    Script("el", "Greek", _chars((0x03B2, 0x03C9)), "αεηιουω"),
    Script("ar", "Arabic", _chars((0x0628, 0x064A)), "اوي", stop="."),
    Script("he", "Hebrew", _chars((0x05D0, 0x05EA)), "וי"),
    Script("hi", "Devanagari", _chars((0x0915, 0x0939)), _signs(0x093E, 0x094C), stop="।"),
    Script("bn", "Bengali", _chars((0x0995, 0x09B9)), _signs(0x09BE, 0x09CC), stop="।"),
    Script("ta", "Tamil", _chars((0x0B95, 0x0BB9)), _signs(0x0BBE, 0x0BCC)),
    Script("zh", "Han", _chars((0x4E00, 0x62FF)), spaced=False, stop="。", syllables=(1, 3)),
    Script("ja", "Kana", _chars((0x3041, 0x3093), (0x30A1, 0x30F3)), _chars((0x4E00, 0x4FFF)),
           spaced=False, stop="。", syllables=(1, 3)),
    Script("ko", "Hangul", _chars((0xAC00, 0xB8FF)), syllables=(1, 3)),
    Script("ur", "Arabic (Urdu)", _chars((0x0628, 0x064A), (0x0679, 0x06D2)), "اوی", stop="۔"),
    Script("th", "Thai", _chars((0x0E01, 0x0E2E)), _signs(0x0E31, 0x0E3A) + "าะ", spaced=False,
           stop=" "),
    Script("lo", "Lao", _chars((0x0E81, 0x0EAE)), _signs(0x0EB1, 0x0EBC) + "າ", spaced=False,
           stop=" "),
    Script("km", "Khmer", _chars((0x1780, 0x17A2)), _signs(0x17B6, 0x17C5), spaced=False,
           stop="។"),
    Script("my", "Myanmar", _chars((0x1000, 0x1020)), _signs(0x102B, 0x1032), spaced=False,
           stop="။"),
    Script("bo", "Tibetan", _chars((0x0F40, 0x0F6C)), _signs(0x0F71, 0x0F7D), spaced=False,
           stop="།"),
    Script("ka", "Georgian", _chars((0x10D0, 0x10F0)), "აეიოუ"),
    Script("hy", "Armenian", _chars((0x0561, 0x0586)), "աեիոու", stop="։"),
    Script("am", "Ethiopic", _chars((0x1200, 0x1357)), stop="።", syllables=(1, 3)),
    Script("gu", "Gujarati", _chars((0x0A95, 0x0AB9)), _signs(0x0ABE, 0x0ACC)),
    Script("pa", "Gurmukhi", _chars((0x0A15, 0x0A39)), _signs(0x0A3E, 0x0A4C), stop="।"),
    Script("kn", "Kannada", _chars((0x0C95, 0x0CB9)), _signs(0x0CBE, 0x0CCC)),
    Script("ml", "Malayalam", _chars((0x0D15, 0x0D39)), _signs(0x0D3E, 0x0D4C)),
    Script("te", "Telugu", _chars((0x0C15, 0x0C39)), _signs(0x0C3E, 0x0C4C)),
    Script("si", "Sinhala", _chars((0x0D9A, 0x0DC6)), _signs(0x0DCF, 0x0DDF)),
    Script("or", "Oriya", _chars((0x0B15, 0x0B39)), _signs(0x0B3E, 0x0B4C), stop="।"),
)
SCRIPT_OF = {s.code: s for s in SCRIPTS}
# wordfreq's languages by script (its "small" lists); the rest of SCRIPTS stay synthetic.
WORDFREQ_SCRIPTS = {
    "Latin": ("en", "de", "fr", "es", "pt", "it", "nl", "pl", "tr", "vi", "id", "ms", "fil",
              "sv", "da", "nb", "fi", "hu", "cs", "sk", "sl", "ro", "ca", "lt", "lv", "is"),
    "Cyrillic": ("ru", "uk", "bg", "mk"), "Greek": ("el",), "Arabic": ("ar", "fa"),
    "Arabic (Urdu)": ("ur",), "Hebrew": ("he",), "Devanagari": ("hi",), "Bengali": ("bn",),
    "Tamil": ("ta",), "Han": ("zh",), "Kana": ("ja",), "Hangul": ("ko",),
}
UNSPACED = {"zh", "ja", "th", "lo", "km", "my", "bo"}


@dataclasses.dataclass(frozen=True)
class Language:
    """A language's words, most frequent first, and how it is written."""

    code: str
    script: str
    words: tuple[str, ...]
    freqs: np.ndarray  # float64 [len(words)], sums to 1
    spaced: bool
    stop: str
    source: str  # "wordfreq" or "synthetic"

    def draw(self, rng: np.random.Generator, k: int) -> list[str]:
        """``k`` words drawn by frequency."""
        cdf = self.__dict__.get("_cdf")
        if cdf is None:  # rng.choice(p=...) would redo this sum on every call
            cdf = np.cumsum(self.freqs)
            object.__setattr__(self, "_cdf", cdf)
        picks = np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right")
        return [self.words[i] for i in np.minimum(picks, len(self.words) - 1).tolist()]


def zipf(n: int) -> np.ndarray:
    """Zipf-Mandelbrot rank frequencies ``1 / (rank + 2.7)``, normalised (natural text's shape)."""
    f = 1.0 / (np.arange(n) + 2.7)
    return f / f.sum()


def synthetic_language(script: Script, n: int = SYNTHETIC_WORDS, seed: int = 0) -> Language:
    """``n`` distinct pseudo-words of ``script``, shorter ones more frequent."""
    rng = np.random.default_rng([seed, ord(script.code[0]), ord(script.code[1])])
    letters = np.array(list(script.letters))
    signs = np.array(list(script.signs) or [""])
    lo, hi = script.syllables
    words: dict[str, float] = {}
    while len(words) < n:  # drawn in blocks, joined row by row (a loop per character is slow)
        m = 2 * (n - len(words))
        count = rng.integers(lo, hi + 1, m)
        first = letters[rng.integers(len(letters), size=(m, hi))]
        second = np.where(rng.random((m, hi)) < (0.7 if script.signs else 0.0),
                          signs[rng.integers(len(signs), size=(m, hi))], "")
        grid = np.stack([first, second], axis=2).reshape(m, 2 * hi)
        grid[np.arange(2 * hi)[None, :] >= 2 * count[:, None]] = ""
        drawn = unicodedata.normalize("NFKC", "\n".join(map("".join, grid.tolist())))
        # rank key: short words are the frequent ones, noise so that lengths interleave
        for word, noise in zip(drawn.split("\n"), rng.normal(0, 1.5, m).tolist()):
            words.setdefault(word, len(word) + noise)
            if len(words) == n:
                break
    ranked = tuple(sorted(words, key=words.__getitem__))
    return Language(script.code, script.script, ranked, zipf(n), script.spaced, script.stop,
                    "synthetic")


def wordfreq_language(code: str, script: str, n: int = WORDS_PER_LANGUAGE) -> Language:
    """wordfreq's ``n`` most frequent words of ``code`` (NFKC, no spaces or digits)."""
    words, freqs = [], []
    for word, freq in wordfreq.get_frequency_dict(code, wordlist="small").items():
        word = unicodedata.normalize("NFKC", word)
        if word and not any(c.isspace() or c.isdigit() for c in word):
            words.append(word)
            freqs.append(freq)
        if len(words) == n:
            break
    f = np.asarray(freqs, np.float64)
    shape = SCRIPT_OF[[s.code for s in SCRIPTS if s.script == script][0]]
    return Language(code, script, tuple(words), f / f.sum(), code not in UNSPACED, shape.stop,
                    "wordfreq")


def has_wordfreq() -> bool:
    return wordfreq is not None


def resolve_source(source: str) -> str:
    """``auto`` is ``wordfreq`` where it is installed, else ``synthetic``."""
    if source not in SOURCES:
        raise ValueError(f"unknown lexicon source {source!r}; choose one of {SOURCES}")
    if source == "auto":
        return "wordfreq" if has_wordfreq() else "synthetic"
    if source == "wordfreq" and not has_wordfreq():
        raise ValueError("lexicon source 'wordfreq' needs the wordfreq package "
                         "(pip install wordfreq); or choose 'synthetic'")
    return source


@functools.cache
def languages(source: str = "auto") -> tuple[Language, ...]:
    """Every language of the lexicon: wordfreq's (when the source is wordfreq) and a synthetic
    one for each script it lacks; with ``synthetic``, one synthetic language per script."""
    source = resolve_source(source)
    if source == "synthetic":
        return tuple(synthetic_language(s) for s in SCRIPTS)
    out = [wordfreq_language(code, script)
           for script, codes in WORDFREQ_SCRIPTS.items() for code in codes]
    covered = set(WORDFREQ_SCRIPTS)
    out += [synthetic_language(s) for s in SCRIPTS if s.script not in covered]
    return tuple(out)
