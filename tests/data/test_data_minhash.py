"""MinHash near-dedup against datasketch (the oracle), and recall / precision on injected near-duplicates."""

import random

import numpy as np
import pytest

from kiln.config import NearDedupConfig
from kiln.data.minhash import NearDedup, band_keys, shingles

datasketch = pytest.importorskip("datasketch")

CFG = NearDedupConfig()


def vocab_doc(rng, n_words=300):
    words = [f"w{rng.randrange(5000)}" for _ in range(n_words)]
    return words


def mutate(rng, words, rate):
    """Replace a share `rate` of words: Jaccard of 5-gram sets falls as the rate grows."""
    out = list(words)
    for i in rng.sample(range(len(out)), int(rate * len(out))):
        out[i] = f"x{rng.randrange(10**6)}"
    return out


def jaccard(a, b):
    sa, sb = set(shingles(" ".join(a), 5).tolist()), set(shingles(" ".join(b), 5).tolist())
    return len(sa & sb) / len(sa | sb)


def test_shingles_are_word_5grams():
    s = shingles("A b c d e f", 5)
    assert len(s) == 2 and len(shingles("a b c d e a b c d e", 5)) == 5   # distinct only
    assert len(shingles("one two", 5)) == 1 and len(shingles("", 5)) == 0


def test_lsh_candidates_agree_with_datasketch():
    """Same shingle sets: pairs datasketch's LSH (14 x 8) finds, we find too, within MinHash noise."""
    rng = random.Random(0)
    base = [vocab_doc(rng) for _ in range(40)]
    docs = base + [mutate(rng, d, rate) for d, rate in zip(base, [0.02, 0.05, 0.1, 0.3] * 10)]
    keys = band_keys([" ".join(d) for d in docs], CFG)
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    sketches = [_sketch(d) for d in docs]
    for i, m in enumerate(sketches):
        lsh.insert(str(i), m)
    ours = {(i, j) for i in range(40) for j in range(40, 80) if (keys[i] == keys[j]).any()}
    theirs = {(i, j) for i in range(40) for j in map(int, lsh.query(sketches[i])) if j >= 40}
    assert len(ours ^ theirs) <= 3, sorted(ours ^ theirs)   # independent hash functions: a few may differ
    assert ours and all(j == i + 40 for i, j in ours)       # no candidates among unrelated documents


def _sketch(words):
    m = datasketch.MinHash(num_perm=112, seed=1)
    m.update_batch([h.tobytes() for h in shingles(" ".join(words), 5)])
    return m


def test_recall_and_precision_on_injected_near_duplicates():
    rng = random.Random(1)
    base = [vocab_doc(rng) for _ in range(300)]
    # Edit rates far from the 0.8 boundary either way (MinHash LSH is a soft threshold: pairs at Jaccard
    # 0.6-0.8 are found with probability 0.1-0.9, neither a miss nor a false hit); 0.01 edits -> J ~ 0.9.
    variants = [(i, mutate(rng, base[i], rng.choice([0.005, 0.01, 0.02, 0.15, 0.3]))) for i in range(300)]
    docs = base + [v for _, v in variants]
    keys = band_keys([" ".join(d) for d in docs], CFG)
    nd = NearDedup(CFG.bands)
    for k in keys:
        nd.add(k)
    js = [jaccard(base[i], v) for i, v in variants]
    assert not any(0.5 < j < 0.8 for j in js)
    truth_dup = [j >= 0.8 for j in js]
    found = [not nd.keep(300 + n) for n in range(300)]
    tp = sum(t and f for t, f in zip(truth_dup, found))
    recall = tp / sum(truth_dup)
    precision = tp / max(sum(found), 1)
    assert sum(truth_dup) > 100 and recall >= 0.95 and precision >= 0.95, (recall, precision)
    assert all(nd.keep(i) for i in range(300))   # originals come first: each cluster keeps them


def test_union_find_joins_chains_and_keeps_the_first():
    nd = NearDedup(2)
    a, b, c = np.array([5, 1], np.uint64), np.array([5, 2], np.uint64), np.array([7, 2], np.uint64)
    for k in (c, a, b):   # c and a share nothing; b links them
        nd.add(k)
    assert [nd.keep(i) for i in range(3)] == [True, False, False] and nd.clusters() == 1
    nd.add(np.zeros(2, np.uint64))   # no signature: never linked
    assert nd.keep(3)


def test_word_ngram_hashes_equal_a_plain_fold_over_rensas_word_hashes():
    import rensa

    from kiln.data.ngrams import ngram_hashes, word_hashes
    words = "The quick Brown fox ΟΔΟΣ jumps over İstanbul".split()
    plain = [int(h) for h in rensa.RMinHash.hash_token_sets([[w.lower() for w in words]])[0]]
    assert word_hashes(words).tolist() == plain
    for n in (1, 3, 8):
        want = []
        for i in range(len(words) - n + 1):
            key = 0
            for h in plain[i:i + n]:
                key = ((key ^ h) * 0x100000001B3) % 2**64
            want.append(key)
        assert ngram_hashes(word_hashes(words), n).tolist() == want
    assert len(ngram_hashes(word_hashes(words), 9)) == 0


def test_minhash_shingles_are_the_ngrams_decontamination_matches():
    # One definition of words and their n-grams: a text near-dedup sees as 5-grams is the text decontamination
    # looks up, even where lower-casing the whole text would split a word ("İ" -> "i" + a combining dot).
    from kiln.data.decontam import benchmark_ngrams
    text = "Die Brücke in İstanbul verbindet Europa und Asien seit vielen Jahren"
    assert set(shingles(text, 5).tolist()) == set(benchmark_ngrams(text, 5).tolist())
    assert len(shingles(text, 5)) == len(text.split()) - 4
