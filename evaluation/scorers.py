"""showtell's own BLEU-1..4, ROUGE-L and CIDEr: pycocoevalcap's numbers without pycocoevalcap.

`evaluation.metrics.score_captions` uses these when pycocoevalcap (the "eval" extra) is not installed, so a
plain `pip install showtell` still prints the COCO caption metrics. Each function takes the tokenized
captions COCOEvalCap hands its scorers: `gts` image_id -> [reference str], `res` image_id -> [one result str]
(same keys), and returns (corpus score, per-image scores in `gts` key order), transcribing coco-caption:

- BLEU (`Bleu(4)`, `BleuScorer.compute_score(option="closest")`): corpus-level, i.e. clipped n-gram matches
  and candidate n-grams summed over all images before the ratio; the reference length of each image is the
  one closest to the candidate's (the shorter on a tie); brevity penalty exp(1 - r/c) when c < r; the
  smoothing constants 1e-15 (numerator) and 1e-9 (denominator). Per-image scores are the same formula on
  one image. Words are `str.split()` tokens.
- ROUGE-L (`Rouge`): per image, the longest common subsequence with each reference; precision and recall
  are the maxima over references; F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; corpus = mean over images.
  Words are `str.split(" ")` tokens, as there.
- CIDEr (`Cider`): `evaluation.cider.CiderD` with the scored images' own document frequencies (it equals
  pycocoevalcap's to 1e-9); corpus = mean over images.

METEOR and SPICE are not here: they are Java programs shipped inside pycocoevalcap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np

from base.errors import InputError
from evaluation.cider import MAX_ID, CiderD

BLEU_N = 4
ROUGE_BETA = 1.2
_SMALL, _TINY = 1e-9, 1e-15  # BleuScorer's smoothing: denominator, numerator


def _ngram_counts(words: list[str], n: int) -> Counter:
    """n-gram (tuple of 1..n words) -> occurrences in `words` (BleuScorer's precook)."""
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _bleu_stats(test: str, refs: list[str], n: int) -> tuple[int, int, list[int], list[int]]:
    """One image: (candidate length, closest reference length, candidate n-grams [n], clipped matches [n])."""
    words = test.split()
    max_counts: dict = {}
    lengths = []
    for ref in refs:
        ref_words = ref.split()
        lengths.append(len(ref_words))
        for gram, count in _ngram_counts(ref_words, n).items():
            max_counts[gram] = max(max_counts.get(gram, 0), count)
    testlen = len(words)
    reflen = min((abs(length - testlen), length) for length in lengths)[1]
    guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
    correct = [0] * n
    for gram, count in _ngram_counts(words, n).items():
        correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
    return testlen, reflen, guess, correct


def _bleu_from_stats(testlen: int, reflen: int, guess: list[int], correct: list[int]) -> list[float]:
    """BLEU-1..n (float list [n]) from summed statistics, with BleuScorer's smoothing and brevity penalty."""
    scores, product = [], 1.0
    for k in range(len(guess)):
        product *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(gts: Mapping, res: Mapping, n: int = BLEU_N) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n (float list [n]) and per-image BLEU-k (n lists of float [images], gts order)."""
    per_image: list[list[float]] = [[] for _ in range(n)]
    total_test = total_ref = 0
    total_guess, total_correct = [0] * n, [0] * n
    for image_id, refs in gts.items():
        testlen, reflen, guess, correct = _bleu_stats(res[image_id][0], refs, n)
        total_test, total_ref = total_test + testlen, total_ref + reflen
        total_guess = [a + b for a, b in zip(total_guess, guess, strict=True)]
        total_correct = [a + b for a, b in zip(total_correct, correct, strict=True)]
        for k, score in enumerate(_bleu_from_stats(testlen, reflen, guess, correct)):
            per_image[k].append(score)
    return _bleu_from_stats(total_test, total_ref, total_guess, total_correct), per_image


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_image(candidate: str, refs: list[str], beta: float = ROUGE_BETA) -> float:
    """coco-caption's ROUGE-L of one candidate against its references (best precision and best recall)."""
    tokens = candidate.split(" ")
    precisions, recalls = [], []
    for ref in refs:
        ref_tokens = ref.split(" ")
        lcs = lcs_length(ref_tokens, tokens)
        precisions.append(lcs / float(len(tokens)))
        recalls.append(lcs / float(len(ref_tokens)))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta**2) * p * r) / float(r + beta**2 * p)


def rouge_l(gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
    """Corpus ROUGE-L (mean over images) and per-image ROUGE-L (float64 [images], gts order)."""
    scores = np.array([rouge_l_image(res[image_id][0], refs) for image_id, refs in gts.items()])
    return float(np.mean(scores)), scores


def cider(gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
    """Corpus CIDEr (mean over images) and per-image CIDEr (float64 [images], gts order), df of these refs.

    InputError when the captions hold more distinct words than evaluation.cider's ids allow (65535).
    """
    words: dict[str, int] = {}
    refs = [[[words.setdefault(w, len(words)) for w in r.split()] for r in gts[k]] for k in gts]
    cands = [[words.setdefault(w, len(words)) for w in res[k][0].split()] for k in gts]
    if len(words) > MAX_ID + 1:
        raise InputError(f"the captions hold {len(words)} distinct words; showtell's CIDEr counts up to "
                         f"{MAX_ID + 1}: install pycocoevalcap (pip install 'showtell[eval]').")
    scores = CiderD(refs).score(np.arange(len(cands)), cands)
    return float(np.mean(scores)), scores


def score_tokenized(gts: Mapping, res: Mapping) -> dict[str, tuple[float, list[float]]]:
    """COCOEvalCap metric name -> (corpus score, per-image scores in gts order) for Bleu_1..4, ROUGE_L,
    CIDEr on tokenized captions (gts image_id -> [str], res image_id -> [str], one result per image)."""
    if gts.keys() != res.keys() or any(len(res[k]) != 1 or not gts[k] for k in gts):
        raise ValueError("gts and res need the same images, one result and at least one reference each")
    corpus, per_image = bleu(gts, res)
    out = {f"Bleu_{k + 1}": (corpus[k], per_image[k]) for k in range(BLEU_N)}
    for name, scorer in (("ROUGE_L", rouge_l), ("CIDEr", cider)):
        score, scores = scorer(gts, res)
        out[name] = (score, [float(s) for s in scores])
    return out
