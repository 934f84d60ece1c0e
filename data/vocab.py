"""The vocabulary, stored exactly as im2txt's `word_counts.txt`.

File format: one `word count` per line, sorted by count descending (ties: `<S>`, `</S>`, then by word,
so builds are deterministic), lines joined by "\\n" with no newline after the last one (im2txt's own
writer). The id of a word is its line number (0-based). `<S>` and `</S>` are ordinary lines, counted once
per caption. `<UNK>` gets id = number of lines unless the file lists it. Loading also accepts a trailing
newline and CRLF line ends; saving always writes im2txt's form.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from base.atomic import atomic_write_text
from base.errors import InputError
from data.tokenizer import tokenize

START = "<S>"
END = "</S>"
UNK = "<UNK>"


class Vocabulary:
    """Word <-> id mapping with im2txt semantics.

    Attributes:
      words: list[str], index = id; length len(self) (includes `<UNK>` at `unk_id`).
      counts: list[int], the count of each listed word (len = number of file lines).
      start_id, end_id, unk_id: int ids of `<S>`, `</S>`, `<UNK>`.
    """

    def __init__(self, words: Sequence[str], counts: Sequence[int]):
        """words/counts: the file lines in order (without `<UNK>` unless the file lists it)."""
        if len(words) != len(counts):
            raise ValueError("words and counts differ in length")
        self.counts = [int(c) for c in counts]
        self.words = list(words)
        self._ids = {w: i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("a word is listed twice")
        for required in (START, END):
            if required not in self._ids:
                raise ValueError(f"the vocabulary lacks {required}")
        if UNK not in self._ids:
            self._ids[UNK] = len(self.words)
            self.words.append(UNK)
        self.start_id = self._ids[START]
        self.end_id = self._ids[END]
        self.unk_id = self._ids[UNK]

    # ---- construction -----------------------------------------------------------------------------------

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        """Count tokens of raw captions (training captions only) like im2txt's build_mscoco_data.py.

        Each caption adds one `<S>` and one `</S>`; words seen fewer than `min_count` times are dropped
        (`<S>`/`</S>` are always kept, even for fewer than `min_count` captions).
        """
        counter = Counter()
        n = 0
        for caption in captions:
            counter.update(tokenize(caption))
            n += 1
        counter[START] = counter[END] = n
        kept = [(w, c) for w, c in counter.items() if c >= min_count or w in (START, END)]
        rank = {START: 0, END: 1}  # among equal counts: <S>, </S>, then by word (im2txt puts <S> first)
        kept.sort(key=lambda wc: (-wc[1], rank.get(wc[0], 2), wc[0]))
        return cls([w for w, _ in kept], [c for _, c in kept])

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a word_counts.txt; InputError (naming the file and line) when it is missing or malformed."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"Vocabulary file {path} does not exist.") from None
        except UnicodeDecodeError as err:
            raise InputError(f"Vocabulary file {path} is not UTF-8 text (byte {err.start}).") from None
        except OSError as err:
            raise InputError(f"Vocabulary file {path} cannot be read: {err.strerror or err}.") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        words, counts = [], []
        for number, line in enumerate(lines, start=1):
            parts = line.rstrip("\r").split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1].isdigit():
                raise InputError(
                    f"Vocabulary file {path}, line {number}: expected 'word count', got {line!r}."
                )
            words.append(parts[0])
            counts.append(int(parts[1]))
        try:
            return cls(words, counts)
        except ValueError as err:
            raise InputError(f"Vocabulary file {path}: {err}.") from None

    def save(self, path: str | Path) -> Path:
        """Write im2txt's word_counts.txt atomically (temp file, fsync, rename); returns the path."""
        return atomic_write_text(path, "\n".join(f"{w} {c}" for w, c in zip(self.words, self.counts,
                                                                             strict=False)))

    # ---- lookup -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of ids: file lines + 1 for `<UNK>` unless listed."""
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def id(self, word: str) -> int:
        """Id of `word`; `unk_id` when unknown."""
        return self._ids.get(word, self.unk_id)

    def word(self, word_id: int) -> str:
        """Word of an id; `<UNK>` for ids >= len(self) (as im2txt: a model may have more logits)."""
        word_id = int(word_id)
        if word_id < 0:
            raise IndexError(f"negative word id {word_id}")
        return self.words[word_id] if word_id < len(self.words) else UNK

    def encode(self, caption: str) -> list[int]:
        """Raw caption -> list[int] ids: `<S>`, tokens (unknown -> `<UNK>`), `</S>`."""
        get, unk = self._ids.get, self.unk_id
        return [self.start_id] + [get(w, unk) for w in tokenize(caption)] + [self.end_id]

    def decode(self, ids: Iterable[int], strip: bool = True) -> str:
        """ids (ints or a 1-D int array) -> space-joined words.

        strip=True drops `<S>` and stops at the first `</S>` (what a caption shows); strip=False keeps all.
        """
        words = []
        for i in ids:
            i = int(i)
            if strip and i == self.start_id:
                continue
            if strip and i == self.end_id:
                break
            words.append(self.word(i))
        return " ".join(words)
