"""Per-document steps: Unicode repair, language ID, Gopher / C4 / FineWeb / code rules, PII, decontamination."""

import json

import pytest

from kiln.config import (C4Config, CodeQualityConfig, DecontaminateConfig, FineWebConfig, GopherQualityConfig,
                         GopherRepetitionConfig, LanguageConfig, PIIConfig)
from kiln.data.decontam import Decontaminate, build_index
from kiln.data.langid import LanguageFilter
from kiln.data.normalize import FixUnicode
from kiln.data.pii import CARD, EMAIL, IP, PHONE, ScrubPII, luhn_ok
from kiln.data.quality import C4Filter, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition
from kiln.data.records import Doc, Drop, run_steps

PARAGRAPHS = [
    "The history of the town goes back to the twelfth century, when a small group of farmers settled on the "
    "banks of the river. They built a mill and a church, and over the following years the village grew into a "
    "market town with a busy square.",
    "Trade with the surrounding villages brought wealth to the merchants, and many of the stone houses that "
    "still line the main street date from that period. The town hall was finished in 1620 and has been restored "
    "twice since then.",
    "In the nineteenth century the railway arrived, and with it came new industries. A brewery, a textile "
    "factory and a brick works employed hundreds of people, and the population doubled within a generation.",
    "Today the town is known for its annual music festival, which attracts visitors from all over the country. "
    "The old factory buildings have been turned into studios, shops and a small museum about local industry.",
]
GOOD = "\n\n".join(PARAGRAPHS)
PROSE_STEPS = [GopherQuality(GopherQualityConfig()), GopherRepetition(GopherRepetitionConfig()),
               C4Filter(C4Config()), FineWebQuality(FineWebConfig())]


def doc(text, kind="prose"):
    return Doc(text, "src", {"path": "x"}, kind=kind)


def reason(step, text, kind="prose"):
    out = step(doc(text, kind))
    return out.reason if isinstance(out, Drop) else None


# ---------------------------------------------------------------- unicode, language


def test_fix_unicode_repairs_mojibake_but_keeps_quotes_and_widths():
    out = FixUnicode()(doc("caf\u00c3\u00a9 \u201cquoted\u201d \uff21 &amp;"))
    assert out.text == "caf\u00e9 \u201cquoted\u201d \uff21 &amp;" and out.flags == ("unicode_fixed",)
    assert FixUnicode()(doc("plain ascii")).flags == ()


def test_language_keeps_english_drops_french_and_low_scores():
    f = LanguageFilter(LanguageConfig())
    assert reason(f, GOOD) is None
    assert reason(f, "Le petit village se trouve au bord de la rivière, et ses habitants vivent de la "
                     "pêche depuis des siècles.") == "language_fr"
    assert f.kinds == ("prose",)


def test_language_step_is_skipped_for_code():
    steps = [LanguageFilter(LanguageConfig(languages=["fr"]))]
    assert isinstance(run_steps(doc("def f(x):\n    return x\n", "code"), steps), Doc)
    assert isinstance(run_steps(doc(GOOD), steps), Drop)


# ---------------------------------------------------------------- prose quality rules


def test_good_english_passes_every_prose_rule():
    out = run_steps(doc(GOOD), PROSE_STEPS)
    assert isinstance(out, Doc) and out.text == GOOD


@pytest.mark.parametrize("text,want", [
    ("too short to be a document with the words", "gopher_short_doc"),
    (" ".join(["a"] * 120) + " the and", "gopher_below_avg_threshold"),
    (" ".join(["extraordinarily"] * 120) + " the and", "gopher_above_avg_threshold"),
    (GOOD + " #tag" * 60, "gopher_too_many_hashes"),
    (" ".join(["1234 5678 90"] * 50) + " the and of", "gopher_below_alpha_threshold"),
    (" ".join(["house garden river"] * 40), "gopher_enough_stop_words"),
    ("\n".join([f"- item {w} of the list and more" for w in range(60)]), "gopher_too_many_bullets"),
])
def test_gopher_quality_reasons(text, want):
    assert reason(GopherQuality(GopherQualityConfig()), text) == want


def test_gopher_repetition_reasons():
    r = GopherRepetition(GopherRepetitionConfig())
    assert reason(r, "\n".join(["the same line again and again"] * 10 + PARAGRAPHS)) == "dup_line_frac"
    assert reason(r, "\n\n".join([PARAGRAPHS[0]] * 3 + PARAGRAPHS[1:])) == "dup_para_frac"
    spam = " ".join(["buy the best shoes"] * 30) + " " + PARAGRAPHS[0]
    assert reason(r, spam).startswith(("top_", "duplicated_"))
    assert reason(r, GOOD) is None


def test_duplicated_ngram_share_matches_datatrove_walk():
    from kiln.data.quality import _dup_ngram_chars
    from kiln.data.words import _word_ids, words_of

    def walk(words, n):   # datatrove's find_all_duplicate, verbatim logic
        unique, rep, idx = set(), 0, 0
        while idx < len(words) - n + 1:
            gram = "".join(words[idx:idx + n])
            if gram in unique:
                rep += len(gram)
                idx += n
            else:
                unique.add(gram)
                idx += 1
        return rep

    for text in (GOOD, " ".join(["one two three four five six"] * 5) + " " + PARAGRAPHS[1]):
        words = words_of(text)
        ids, lens = _word_ids(words)
        for n in (5, 7, 10):
            ours = _dup_ngram_chars(ids, lens, n)
            theirs = walk(words, n)
            # ours counts joined-with-spaces characters; within the same n-grams, so within (n-1) per gram
            assert abs(ours - theirs) <= max(theirs, 1) * 0.35, (n, ours, theirs)
            assert (ours == 0) == (theirs == 0)


def test_c4_removes_lines_and_drops_documents():
    c4 = C4Filter(C4Config())
    menu = "Home | About | Contact\n" + GOOD + "\nThis site uses cookies to improve your experience."
    out = c4(doc(menu))
    assert isinstance(out, Doc) and "Home" not in out.text and "cookies" not in out.text
    assert out.flags == ("c4_lines_removed",)
    assert reason(c4, GOOD + "\nLorem ipsum dolor sit amet, consectetur.") == "lorem_ipsum"
    assert reason(c4, GOOD + "\nThe function returns {a: 1} to the caller.") == "curly_bracket"
    assert reason(c4, "One sentence only here.") == "too_few_sentences"


def test_fineweb_reasons():
    fw = FineWebQuality(FineWebConfig())
    assert reason(fw, GOOD) is None
    assert reason(fw, "\n".join(f"menu entry number {i} of the site" for i in range(30))) == "line_punct_ratio"
    assert reason(fw, "\n".join(f"Item {i}." for i in range(30))) == "short_line_ratio"
    assert reason(fw, GOOD + "\n" + PARAGRAPHS[0]) == "char_dup_ratio"


def test_code_rules_keep_code_and_drop_minified_and_data():
    cq = CodeQuality(CodeQualityConfig())
    code = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n"
    assert reason(cq, code, "code") is None
    assert reason(cq, "var a=1;" * 200, "code") == "max_line_length"
    assert reason(cq, "\n".join(["x = [" + "1, " * 40 + "]"] * 5), "code") == "avg_line_length"
    assert reason(cq, "\n".join(["-- == ++ ;; ** //"] * 20), "code") == "alnum_fraction"
    assert isinstance(run_steps(doc(code, "code"), PROSE_STEPS), Doc)   # prose rules skip code
    assert isinstance(run_steps(doc(code), PROSE_STEPS), Drop)          # and would drop it as prose


# ---------------------------------------------------------------- PII


def test_pii_placeholders_and_counts():
    text = ("Write to jane.roe@example.org or call +1 212-555-0147. The server at 8.8.8.8 answered, "
            "the router 192.168.1.1 and localhost 127.0.0.1 did not; v6 2001:4860:4860::8888 too. "
            "Card 4111 1111 1111 1111 was charged; 4111 1111 1111 1112 is not a card.")
    out = ScrubPII(PIIConfig())(doc(text))
    assert EMAIL in out.text and PHONE in out.text and CARD in out.text and out.text.count(IP) == 2
    for kept in ("192.168.1.1", "127.0.0.1", "4111 1111 1111 1112"):
        assert kept in out.text
    assert sorted(out.flags) == ["pii:credit_card", "pii:email", "pii:ip_address", "pii:ip_address",
                                 "pii:phone_number"]


def test_pii_code_keeps_numbers_and_short_v6_like_tokens():
    code = "TIMEOUT = 2125550147\nx = a::b\nADDR = '10.0.0.1'\n"
    out = ScrubPII(PIIConfig())(doc(code, "code"))
    assert out.text == code and out.flags == ()


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005") and not luhn_ok("4111111111111112")


# ---------------------------------------------------------------- decontamination


@pytest.fixture
def bench_index(tmp_path):
    q = {"question": "Which planet in the solar system has the largest number of known moons orbiting it today",
         "choices": ["Saturn", "Mars"], "answer": 0}
    (tmp_path / "bench.jsonl").write_text(json.dumps(q) + "\n")
    cfg = DecontaminateConfig(benchmarks=[str(tmp_path / "bench.jsonl")])
    return cfg, str(build_index(cfg, tmp_path / "ngrams.npy"))


def test_decontaminate_drops_a_document_quoting_a_benchmark(bench_index):
    cfg, index = bench_index
    leaked = GOOD + "\nQuiz: which planet in the Solar System has the largest number of known moons orbiting it?"
    assert reason(Decontaminate(cfg, index), leaked) == "contaminated"
    assert reason(Decontaminate(cfg, index), GOOD) is None


def test_decontaminate_excise_cuts_only_the_overlap(bench_index):
    cfg, index = bench_index
    cfg.action = "excise"
    leaked = "Before. Which planet in the solar system has the largest number of known moons orbiting it today? After."
    out = Decontaminate(cfg, index)(doc(leaked))
    assert out.text == "Before. ? After." and out.flags == ("excised",)


def test_bad_benchmark_file_names_file_and_line(tmp_path):
    from kiln.config import ConfigError
    (tmp_path / "b.jsonl").write_text('{"q": "fine"}\n{broken\n')
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].*b.jsonl:2"):
        build_index(DecontaminateConfig(benchmarks=[str(tmp_path / "b.jsonl")]), tmp_path / "i.npy")


# ---------------------------------------------------------------- fast paths against the plain definitions


LANG_SAMPLES = [
    "", " ", "1234 5678", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "Der schnelle braune Fuchs springt.",
    "Le renard brun rapide saute par-dessus le chien paresseux.", "El zorro marrón rápido salta.",
    "敏捷的棕色狐狸跳过了懒狗。" * 3, "Быстрая коричневая лиса прыгает через ленивую собаку.", "ab",
    "def f(x):\n    return x ** 2  # square\n", "e\u0301t\u00e9 na\u00efve caf\u00e9 \U0001F600 \ud800",
]


def test_language_id_equals_py3langid():
    from kiln.data.langid import identifier, reference_identifier
    fast, ref = identifier(), reference_identifier()
    texts = LANG_SAMPLES + [GOOD, *PARAGRAPHS, GOOD * 20]
    for text in texts:
        assert fast.classify(text) == ref.classify(text), text[:40]


def test_ngram_shares_equal_np_unique_definitions():
    import numpy as np

    from kiln.data.quality import _dup_ngram_chars, _ngram_chars, _ngram_keys, _top_ngram_chars
    from kiln.data.words import _word_ids

    def top_ref(ids, lens, n):
        keys = _ngram_keys(ids, n)
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        return int(_ngram_chars(lens, n)[first[top]]) * int(counts[top])

    def dup_ref(ids, lens, n):
        keys = _ngram_keys(ids, n)
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        total, next_free = 0, -1
        for i in np.flatnonzero(first[inverse] < np.arange(len(keys))).tolist():
            if i >= next_free:
                total, next_free = total + int(_ngram_chars(lens, n)[i]), i + n
        return total

    rng = np.random.default_rng(0)
    for trial in range(30):
        words = [str(w) for w in rng.integers(0, 3 + trial, size=int(rng.integers(10, 300)))]
        ids, lens = _word_ids(words)
        for n in (2, 3, 4):
            assert _top_ngram_chars(ids, lens, n) == top_ref(ids, lens, n)
        for n in range(5, 11):
            assert _dup_ngram_chars(ids, lens, n) == dup_ref(ids, lens, n)
