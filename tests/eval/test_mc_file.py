"""A user's multiple-choice JSONL file: every bad line quarantined and named, the good ones scored as MMLU is."""

import json

import pytest

import evalkit
from kiln.eval.choice import evaluate_choices
from kiln.eval.choice_chat import evaluate_choices_generative, generative_prompt
from kiln.eval.mc_file import evaluate_mc_file, read_mc_file
from kiln.eval.scoring import Scorer

GOOD = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1, "subject": "arithmetic", "id": "q1"},
    {"question": "What is 3 + 3?", "choices": ["6", "7", "8", "9"], "answer": "A", "subject": "arithmetic"},
    {"question": "What is 1 + 1?", "choices": [1, 2, 3], "answer": "b", "subject": "arithmetic"},
    {"question": "The capital of France?", "choices": ["London", "Paris", "Rome", "Oslo"], "answer": "Paris"},
    {"question": "Pick the letter", "choices": ["A", "B", "C"], "answer": "C", "extra": "ignored"},
    {"question": "The capital of Italy?", "choices": ["London", "Paris", "Rome", "Oslo"], "answer": 2,
     "subject": None},
]
GOOD_ANSWERS = [1, 0, 1, 1, 2, 2]


def bad_lines():
    """(raw line, key at fault, reason)."""
    return [
        (b'{"question": "x", "choices": ["a", "b"], "answer": 0', None, "invalid_json"),
        (b'{"question": "caf\xe9", "choices": ["a", "b"], "answer": 0}', None, "invalid_utf8"),
        (b'["question", "choices"]', None, "not_an_object"),
        (b'{"question": "x", "answer": 0}', "choices", "missing_key"),
        (b'{"question": "x", "choices": ["a", "b"]}', "answer", "missing_key"),
        (b'{"question": "x", "choices": ["a"], "answer": 0}', "choices", "too_few_choices"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": 2}', "answer", "answer_out_of_range"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": -1}', "answer", "answer_out_of_range"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": "D"}', "answer", "answer_out_of_range"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": "c"}', "answer", "answer_out_of_range"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": "zebra"}', "answer", "answer_not_a_choice"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": "1"}', "answer", "answer_not_a_choice"),
        (b'{"question": "x", "choices": ["B", "A"], "answer": "A"}', "answer", "answer_ambiguous"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": true}', "answer", "bad_type"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": 1.0}', "answer", "bad_type"),
        (b'{"question": "x", "choices": ["a", null], "answer": 0}', "choices[1]", "bad_type"),
        (b'{"question": "x", "choices": ["a", " "], "answer": 0}', "choices[1]", "empty"),
        (b'{"question": "x", "choices": "a b", "answer": 0}', "choices", "bad_type"),
        (b'{"question": 5, "choices": ["a", "b"], "answer": 0}', "question", "bad_type"),
        (b'{"question": "  ", "choices": ["a", "b"], "answer": 0}', "question", "empty"),
        (b'{"question": "x", "choices": ["a", "b"], "answer": 0, "subject": 3}', "subject", "bad_type"),
    ]


def write_file(tmp_path):
    """GOOD and bad lines interleaved, with blank lines; returns the path and {line: (key, reason)}."""
    lines, where = [], {}
    good = [json.dumps(g).encode() for g in GOOD]
    for i, (raw, key, reason) in enumerate(bad_lines()):
        if i < len(good):
            lines.append(good[i])
        lines.append(raw)
        where[len(lines)] = (key, reason)
        if i == 3:
            lines.append(b"   ")
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    return path, where


@pytest.fixture(scope="module")
def scorer():
    tok = evalkit.tokenizer()
    return Scorer(evalkit.model(tok.vocab_size, max_seq_len=256), tok, batch_size=4)


def test_bad_lines_are_counted_named_and_skipped(tmp_path):
    path, where = write_file(tmp_path)
    mc = read_mc_file(path)
    assert [it["answer"] for it in mc.items] == GOOD_ANSWERS
    assert mc.lines == len(GOOD) + len(where) == len(mc.items) + len(mc.quarantined)   # the blank line not counted
    assert {b.line: (b.key, b.reason) for b in mc.quarantined} == where
    first = mc.quarantined[0]
    assert str(first).startswith(f"{path}:2: invalid JSON at column")
    assert str(mc.quarantined[3]) == f"{path}:8: choices: missing (each line needs question, choices and answer)"
    report = mc.report()
    assert report["quarantined"] == len(where) and report["quarantined_by_reason"]["answer_out_of_range"] == 4
    assert report["quarantine"][0]["line"] == 2
    # numbers as choices become their text; a null subject is none; an id is carried
    assert mc.items[2]["choices"] == ["1", "2", "3"] and mc.items[5]["subject"] == "" and mc.items[0]["id"] == "q1"


def test_answer_as_index_letter_or_text_all_work(tmp_path):
    rows = [{"question": "Which is red?", "choices": ["grass", "blood", "sky"], "answer": a}
            for a in (1, "B", "b", "blood")]
    path = tmp_path / "same.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [it["answer"] for it in read_mc_file(path).items] == [1, 1, 1, 1]


@pytest.mark.parametrize("fmt, k", [("letter", 0), ("cloze", 1)])
def test_result_equals_evaluate_choices_on_the_same_items(tmp_path, scorer, fmt, k):
    path, where = write_file(tmp_path)
    res = evaluate_mc_file(scorer, path, fmt=fmt, k=k)
    ref = evaluate_choices(scorer, read_mc_file(path).items, fmt, k)
    def head(r):
        return r.format, r.shots, r.n, r.acc, r.acc_norm
    assert head(res) == head(ref)
    assert res.per_item == ref.per_item and res.n == len(GOOD)
    row = res.summary()
    assert row["file"] == str(path) and row["lines"] == len(GOOD) + len(where) and row["quarantined"] == len(where)
    assert "quarantine" not in row and "per_item" not in row


class Replying:
    """A chat scorer that answers from a table (question -> reply)."""

    chat = True

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate_many(self, prompts, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append({"prompts": list(prompts), "stop": tuple(stop), "max_new_tokens": max_new_tokens})
        return [[next(r for q, r in self.replies.items() if f"\n\n{q}\n" in p or p.endswith(q))] for p in prompts]


def test_letter_generative_reads_the_letter_from_a_reply(tmp_path):
    path, _ = write_file(tmp_path)
    replies = {"What is 2 + 2?": "The answer is (B).", "What is 3 + 3?": "A", "What is 1 + 1?": "C. 3",
               "The capital of France?": "Paris", "Pick the letter": "Hmm, I am not sure.",
               "The capital of Italy?": "**C**"}
    gen = Replying(replies)
    res = evaluate_mc_file(gen, path, fmt="letter_generative")
    assert [r["pred"] for r in res.per_item] == [1, 0, 2, 1, None, 2]
    assert res.acc == pytest.approx(4 / 6) and res.unparsed == 1 and res.format == "letter_generative"
    assert res.acc_norm is None and res.quarantined == len(bad_lines()) and gen.calls[0]["stop"] == ()
    assert res.summary()["max_new_tokens"] == 32 == gen.calls[0]["max_new_tokens"]
    assert gen.calls[0]["prompts"][0] == (
        "The following is a multiple choice question about arithmetic. Answer with the letter of the correct "
        "choice only.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nAnswer:")


def test_generative_shots_carry_their_letters():
    items = [{"question": g["question"], "choices": [str(c) for c in g["choices"]], "answer": a,
              "subject": g.get("subject") or ""} for g, a in zip(GOOD, GOOD_ANSWERS)]
    prompt = generative_prompt(items[1], [items[0]])
    assert prompt.endswith("What is 2 + 2?\nA. 3\nB. 4\nC. 5\nAnswer: B\n\n"
                           "What is 3 + 3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:")
    gen = Replying({it["question"]: "B" for it in items})
    res = evaluate_choices_generative(gen, items, k=1)
    assert res.shots == 1 and res.acc == pytest.approx(sum(a == 1 for a in GOOD_ANSWERS) / 6)


def test_unusable_files_and_formats_fail_clearly(tmp_path, scorer):
    with pytest.raises(ValueError, match="does not exist"):
        read_mc_file(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(raw for raw, _, _ in bad_lines()[:3]))
    with pytest.raises(ValueError, match=r"no usable line \(3 read, 3 bad; first: .*bad.jsonl:1: invalid JSON"):
        read_mc_file(bad)
    path, _ = write_file(tmp_path)
    with pytest.raises(ValueError, match="format 'mmlu'"):
        evaluate_mc_file(scorer, path, fmt="mmlu")
