"""COCO-caption's tokenization of captions before scoring: Stanford's PTBTokenizer through java, or without
java a fallback made to look like its output.

Both return what COCOEvalCap's `PTBTokenizer.tokenize` returns: image_id -> [lower-cased captions, tokens
joined by single spaces, PTB_PUNCTUATIONS removed]. The input is COCOEvalCap's too:
image_id -> [{"caption": str}]. Neither needs pycocoevalcap itself (ptb_tokenize needs its jar's path).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from data.tokenizer import tokenize

PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
# The tokens COCOEvalCap's PTBTokenizer removes after tokenizing (pycocoevalcap.tokenizer's PUNCTUATIONS).
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# The fallback tokenizer maps brackets as PTB does (PTB's -LRB- is lower-cased, so COCO keeps "-lrb-").
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def ptb_tokenize(captions_for_image: Mapping, java: str, jar: Path) -> dict:
    """PTBTokenizer.tokenize() of pycocoevalcap, run from a private temp dir: image_id -> [tokenized str]."""
    image_ids = [k for k, v in captions_for_image.items() for _ in range(len(v))]
    sentences = "\n".join(c["caption"].replace("\n", " ") for v in captions_for_image.values() for c in v)
    with tempfile.TemporaryDirectory(prefix="showtell-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes(sentences.encode())
        proc = subprocess.run([java, "-cp", str(jar), PTB_CLASS, "-preserveLines", "-lowerCase", str(path)],
                              capture_output=True, check=True)
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(image_ids):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(image_ids)} captions")
    drop = PTB_PUNCTUATIONS
    out: dict = {}
    for k, line in zip(image_ids, lines[: len(image_ids)], strict=True):
        out.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in drop))
    return out


def fallback_tokenize(captions_for_image: Mapping) -> dict:
    """Without java: data.tokenizer.tokenize, brackets as PTB's -lrb- etc., PTB's punctuation list removed."""
    drop = PTB_PUNCTUATIONS | {'"'}
    out: dict = {}
    for k, caps in captions_for_image.items():
        out[k] = [" ".join(_PTB_BRACKETS.get(w, w) for w in tokenize(c["caption"].replace("\n", " "))
                           if w not in drop) for c in caps]
    return out
