"""evaluation/cider.py: CIDEr-D on token ids equals pycocoevalcap's Cider (corpus df) and a plain-Python
transcription of its formula (precomputed df); clipping, length penalty, empty and padded candidates."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocoevalcap.cider.cider import Cider

from evaluation.cider import CiderD, DocumentFrequency, ngram_keys, ngram_order
from evaluation.metrics import find_java


def _ngrams(words) -> Counter:
    return Counter(tuple(words[i: i + n]) for n in range(1, 5) for i in range(len(words) - n + 1))


def _python_df(references) -> Counter:
    """n-gram -> number of images (lists of references) containing it, as CiderScorer.compute_doc_freq."""
    return Counter(g for refs in references for g in {g for ref in refs for g in _ngrams(ref)})


def _python_cider(cand, refs, df, log_ref_len, sigma=6.0) -> float:
    """CiderScorer.compute_cider for one candidate, transcribed with a given df (n-gram -> count)."""
    def vec(words):
        v = [{} for _ in range(4)]
        for g, tf in _ngrams(words).items():
            v[len(g) - 1][g] = tf * (log_ref_len - math.log(max(1.0, df.get(g, 0))))
        return v, [math.sqrt(sum(x * x for x in d.values())) for d in v], max(len(words) - 1, 0)

    vh, nh, lh = vec(cand)
    total = 0.0
    for ref in refs:
        vr, nr, lr = vec(ref)
        for n in range(4):
            val = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vh[n].items())
            val = val / (nh[n] * nr[n]) if nh[n] and nr[n] else val
            total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
    return total / 4 / len(refs) * 10.0


def _pycoco(cands, refs) -> tuple[float, np.ndarray]:
    """pycocoevalcap's Cider on id lists written as words."""
    gts = {i: [" ".join(map(str, r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(map(str, c))] for i, c in enumerate(cands)}
    return Cider().compute_score(gts, res)


# ---- real COCO captions, PTB-tokenised ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco(shared_data):
    """200 COCO val2017 images, PTB-tokenised once: (candidates, references) as word lists. Candidates: a
    held-out reference, another image's caption, a truncated caption, or "..." (empty after PTB)."""
    if find_java() is None:
        pytest.skip("java is not on the PATH")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = json.loads((shared_data / "captions_val2017.json").read_text())
    caps: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    ids = sorted(caps)[:200]
    raw = {}
    for i, image_id in enumerate(ids):
        own, kind = caps[image_id], i % 4
        cand = [own[0], caps[ids[i - 1]][1], " ".join(own[0].split()[:4]), "..."][kind]
        raw[("cand", i)] = [{"caption": cand}]
        raw[("refs", i)] = [{"caption": c} for c in (own[1:] if kind in (0, 2) else own)]
    tok = PTBTokenizer().tokenize(raw)
    cands = [tok[("cand", i)][0].split() for i in range(len(ids))]
    refs = [[r.split() for r in tok[("refs", i)]] for i in range(len(ids))]
    return cands, refs


@pytest.mark.slow
def test_corpus_df_equals_pycocoevalcap_on_coco(coco):
    cands, refs = coco
    words = sorted({w for c in cands for w in c} | {w for rs in refs for r in rs for w in r})
    vocab = {w: i for i, w in enumerate(words)}
    ids = [[vocab[w] for w in c] for c in cands]
    ref_ids = [[[vocab[w] for w in r] for r in rs] for rs in refs]
    mean, per_image = Cider().compute_score({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
                                            {i: [" ".join(c)] for i, c in enumerate(cands)})
    ours = CiderD(ref_ids).score(np.arange(len(ids)), ids)
    assert ours.dtype == np.float64 and ours.shape == (len(ids),)
    np.testing.assert_allclose(ours, per_image, rtol=0, atol=1e-9)
    assert abs(ours.mean() - mean) < 1e-9
    assert ours[3::4].max() == 0.0 and ours[0::4].mean() > ours[1::4].mean()  # empty; own > other's caption


# ---- precomputed ("train") document frequencies ------------------------------------------------------------

TRAIN = [
    [[1, 2, 3, 4], [1, 2, 5], [6, 1, 2, 3, 7]],
    [[1, 8, 3], [1, 8, 3, 4, 9]],
    [[2, 3, 4, 4, 4], [10, 11]],
    [[1, 2, 3, 4, 5, 6, 7, 8, 9]],
    [[12, 3, 1, 2], [1, 2, 12]],
    [[5, 5, 6], [7, 6, 5]],
]
EVAL_REFS = [[[1, 2, 3, 13], [1, 2, 4]], [[8, 3, 9, 9], [14, 8, 3]], [[5, 6, 7, 1, 2]]]
EVAL_CANDS = [[1, 2, 3], [8, 3, 9, 9, 9, 3], [], [15, 2, 3, 4, 4], [5, 6, 7, 1, 2]]
EVAL_IMAGES = [0, 1, 2, 0, 2]


def test_train_df_equals_python_transcription():
    df = DocumentFrequency.from_references(TRAIN)
    assert df.num_images == 6 and df.log_ref_len == math.log(6)
    expected_df = _python_df(TRAIN)
    assert df.keys.size == len(expected_df) and df.counts.sum() == sum(expected_df.values())
    ours = CiderD(EVAL_REFS, df).score(np.array(EVAL_IMAGES), EVAL_CANDS)
    want = [_python_cider(c, EVAL_REFS[i], expected_df, math.log(6)) for c, i in zip(EVAL_CANDS, EVAL_IMAGES,
                                                                                      strict=True)]
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-12)
    assert ours[2] == 0.0 and ours[4] == pytest.approx(10.0)  # empty; identical to the only reference


def test_python_transcription_equals_pycocoevalcap():
    """The transcription used above is itself pycocoevalcap's formula (corpus df)."""
    _, per_image = _pycoco([EVAL_CANDS[i] for i in range(3)], EVAL_REFS)
    want = [_python_cider(EVAL_CANDS[i], EVAL_REFS[i], _python_df(EVAL_REFS), math.log(3)) for i in range(3)]
    np.testing.assert_allclose(per_image, want, rtol=0, atol=1e-12)


def test_identical_beats_random_and_penalties():
    df = DocumentFrequency.from_references(TRAIN)
    ref = [1, 8, 3, 4, 9]
    scorer = CiderD([[ref, ref, ref]], df)
    rng = np.random.default_rng(0)
    identical, rand, doubled = scorer.score([0, 0, 0], [ref, list(rng.integers(1, 16, 5)), ref + ref])
    assert identical == pytest.approx(10.0) and rand < identical
    assert doubled < identical  # length penalty: the caption repeated twice scores lower
    no_penalty = CiderD([[[1, 8]]], df, sigma=1e9)
    once, four_times = no_penalty.score([0, 0], [[8], [8, 8, 8, 8]])
    assert 0 < once and four_times == pytest.approx(once / 4)  # clipped to the reference count (unclipped: =)


# ---- candidates: empty, padded, lengths, end id ------------------------------------------------------------

def test_empty_and_padded_candidates():
    scorer = CiderD(EVAL_REFS, DocumentFrequency.from_references(TRAIN))
    end, width = 0, 9
    padded = np.random.default_rng(1).integers(1, 16, (len(EVAL_CANDS), width)).astype(np.int32)
    for row, cand in zip(padded, EVAL_CANDS, strict=True):
        row[: len(cand)], row[len(cand)] = cand, end  # junk after the end id
    want = scorer.score(EVAL_IMAGES, EVAL_CANDS)
    np.testing.assert_array_equal(scorer.score(np.array(EVAL_IMAGES), padded, end_id=end), want)
    lengths = np.array([len(c) for c in EVAL_CANDS])
    np.testing.assert_array_equal(scorer.score(EVAL_IMAGES, padded, lengths=lengths), want)
    with_end = [c + [end, 3] for c in EVAL_CANDS]
    np.testing.assert_array_equal(scorer.score(EVAL_IMAGES, with_end, end_id=end), want)
    assert scorer.score([1, 2], [[], []]).tolist() == [0.0, 0.0]
    assert scorer.score([1], np.full((1, 4), end), end_id=end).tolist() == [0.0]
    assert scorer.score([], []).shape == (0,)


def test_errors_keys_and_save_load(tmp_path):
    with pytest.raises(ValueError, match="no reference"):
        CiderD([[[1]], []])
    scorer = CiderD([[[1, 2]]])
    for bad in ([[-1]], [[65535]]):
        with pytest.raises(ValueError, match="token ids"):
            scorer.score([0], bad)
    with pytest.raises(ValueError, match="image indices"):
        scorer.score([1], [[1]])
    with pytest.raises(ValueError, match="padded"):
        scorer.score([0], [[1]], lengths=[1])
    keys, counts = ngram_keys([1, 2, 1, 2])
    assert dict(zip(keys.tolist(), counts.tolist(), strict=True)) == {
        2: 2, 3: 2, 2 | 3 << 16: 2, 3 | 2 << 16: 1, 2 | 3 << 16 | 2 << 32: 1, 3 | 2 << 16 | 3 << 32: 1,
        2 | 3 << 16 | 2 << 32 | 3 << 48: 1}
    assert ngram_order(keys).tolist() == [0, 0, 1, 1, 2, 2, 3]
    df = DocumentFrequency.from_references(TRAIN)
    loaded = DocumentFrequency.load(df.save(tmp_path / "df.npz"))
    assert loaded.num_images == 6 and np.array_equal(loaded.keys, df.keys)
    assert np.array_equal(loaded.counts, df.counts)


def test_from_captions_uses_vocab_ids():
    from data.vocab import Vocabulary

    captions = [["A dog runs.", "a dog is running"], ["Two cats sleep", "cats on a sofa"]]
    vocab = Vocabulary.build([c for refs in captions for c in refs], min_count=1)
    scorer = CiderD.from_captions(captions, vocab)
    ids = [vocab.id(w) for w in ["a", "dog", "runs", "."]]
    assert scorer.score([0, 1], [ids, ids]).tolist() == CiderD(
        [[[vocab.id(w) for w in c.lower().replace(".", " .").split()] for c in refs] for refs in captions]
    ).score([0, 1], [ids, ids]).tolist()


# ---- random corpora ----------------------------------------------------------------------------------------

_seq = st.lists(st.integers(0, 5), min_size=0, max_size=7)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=7), st.lists(_seq, max_size=3),
                          _seq), min_size=1, max_size=6),
       st.lists(st.lists(_seq, min_size=1, max_size=3), min_size=1, max_size=4))
def test_random_corpora(images, train):
    refs = [[first, *more] for first, more, _ in images]
    cands = [c for _, _, c in images]
    _, per_image = _pycoco(cands, refs)
    np.testing.assert_allclose(CiderD(refs).score(np.arange(len(refs)), cands), per_image, rtol=0, atol=1e-9)
    df = DocumentFrequency.from_references(train)
    want = [_python_cider(c, r, _python_df(train), math.log(len(train))) for c, r in zip(cands, refs,
                                                                                     strict=True)]
    np.testing.assert_allclose(CiderD(refs, df).score(np.arange(len(refs)), cands), want, rtol=0, atol=1e-9)
