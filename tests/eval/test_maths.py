"""Maths word problems: reasoning-gym items, lm-eval gsm8k's prompt, exact match against a fake generator."""

import re

import pytest

from kiln.eval import maths

pytest.importorskip("reasoning_gym")


class FakeScorer:
    """Answers each prompt with `reply(item)`, finding the item by the last question in the prompt."""

    def __init__(self, items, reply, chat=False):
        self.by_question = {it.question: it for it in items}
        self.reply, self.chat, self.calls = reply, chat, []

    def generate_many(self, prompts, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "stop": tuple(stop),
                           "temperature": temperature, "n": n})
        out = []
        for p in prompts:
            q = next(q for q in self.by_question if p.endswith(f"Question: {q}\nAnswer:") or p.endswith(q))
            out.append([self.reply(self.by_question[q])] * n)
        return out


def test_items_are_the_same_for_a_seed_and_differ_across_seeds():
    a, b = maths.make_set("gsm_symbolic", seed=3, size=12), maths.make_set("gsm_symbolic", seed=3, size=12)
    def key(s):
        return [(i.question, i.answer, i.solution) for i in s.items]
    assert key(a) == key(b)
    c = maths.make_set("gsm_symbolic", seed=4, size=12)
    assert [i.question for i in a.items] != [i.question for i in c.items]
    for it in a.items:   # a worked solution in GSM8K's form, its one "####" line carrying the answer
        assert it.solution.endswith(f"\n#### {it.answer}") and it.solution.count("####") == 1
        assert re.fullmatch(r"-?\d+(\.\d+)?", it.answer)


def test_shots_never_contain_a_test_item():
    test = maths.make_set("gsm_symbolic", seed=0, size=40)
    questions = {it.question for it in test.items}
    shots = maths.pick_shots("gsm_symbolic", 5, maths.SHOT_SEED_OFFSET, None, questions)
    assert len(shots) == 5 and not questions & {s.question for s in shots}
    # A clash is dropped, not used: avoid the first two candidates and the shots move past them.
    pool = maths.make_set("gsm_symbolic", maths.SHOT_SEED_OFFSET, 28).items
    moved = maths.pick_shots("gsm_symbolic", 3, maths.SHOT_SEED_OFFSET, None, {pool[0].question, pool[1].question})
    assert [s.question for s in moved] == [p.question for p in pool[2:5]]
    # A shot seed equal to the test seed replays the test items: refused, never used as shots.
    with pytest.raises(ValueError, match="differ from the test items"):
        maths.pick_shots("gsm_symbolic", 3, 0, None, questions)


def test_base_prompt_is_lm_eval_gsm8k_format():
    s = maths.make_set("basic_arithmetic", seed=0, size=3)
    shot, item = s.items[1], s.items[2]
    assert maths.base_prompt(item, [shot]) == (
        f"Question: {shot.question}\nAnswer: {shot.solution}\n\nQuestion: {item.question}\nAnswer:")
    assert shot.solution == f"{shot.raw['metadata']['expression']} = {shot.answer}\n#### {shot.answer}"


def test_exact_match_with_right_wrong_and_unparseable_generations():
    size = 9
    items = maths.make_set("gsm_symbolic", seed=1, size=size).items
    kind = {it.question: i % 3 for i, it in enumerate(items)}

    def reply(it):
        return {0: f" Some working: 2 + 2 = 4.\n#### {int(it.answer):,}",   # thousands comma: still right
                1: f" 3 * 3 = 9\n#### {int(it.answer) + 1}",
                2: " I cannot solve this."}[kind[it.question]]

    scorer = FakeScorer(items, reply)
    res = maths.evaluate_maths(scorer, "gsm_symbolic", size=size, seed=1)
    assert res.n == size and res.shots == 5 and res.exact_match == pytest.approx(3 / 9)
    assert res.unparsed == 3 and res.verifier_acc == pytest.approx(3 / 9) and res.disagreements == 0
    call = scorer.calls[0]
    assert call["stop"] == ("Question:", "</s>", "<|im_end|>") and call["max_new_tokens"] == 256
    assert call["temperature"] == 0.0 and call["n"] == 1
    for p in call["prompts"]:   # five shots, then the item
        assert p.count("Question: ") == 6 and p.count("\n#### ") == 5 and p.endswith("\nAnswer:")
    for i, r in enumerate(res.per_item):
        assert r["question"] == items[i].question and r["target"] == items[i].answer
        assert r["correct"] is (i % 3 == 0)
        wrong = str(int(items[i].answer) + 1)
        assert r["extracted"] == [items[i].answer, wrong, None][i % 3]
    row = res.summary()
    assert row["format"] == "exact_match" and row["benchmark"] == "maths/gsm_symbolic" and row["shots"] == 5
    assert row["seed"] == 1 and row["shot_seed"] == 1 + maths.SHOT_SEED_OFFSET and "reasoning-gym" in row["generator"]
    assert "per_item" not in row


def test_verifier_disagreement_is_reported():
    """basic_arithmetic's verifier compares strings: "-4.0" fails it and passes the numeric exact match."""
    items = maths.make_set("basic_arithmetic", seed=0, size=6).items
    res = maths.evaluate_maths(FakeScorer(items, lambda it: f"#### {it.answer}.0"), "basic_arithmetic", size=6, k=2)
    assert res.exact_match == 1.0 and res.verifier_acc == 0.0 and res.disagreements == 6
    assert 0 < res.verifier_mean < 1   # the verifier's partial credit, reported apart


def test_chat_models_get_an_instruction_zero_shot():
    items = maths.make_set("gsm_symbolic", seed=2, size=4).items
    scorer = FakeScorer(items, lambda it: f"Let me think.\nThe answer is {it.answer}.", chat=True)
    res = maths.evaluate_maths(scorer, "gsm_symbolic", size=4, seed=2)
    assert res.exact_match == 1.0 and res.shots == 0 and res.chat and res.shot_seed is None
    call = scorer.calls[0]
    assert call["stop"] == () and call["prompts"] == [maths.chat_prompt(it) for it in items]
    assert all('"The answer is N."' in p for p in call["prompts"])
    with pytest.raises(ValueError, match="zero-shot"):
        maths.evaluate_maths(scorer, "gsm_symbolic", size=4, k=3)


def test_bad_task_names_and_non_numeric_tasks_fail_clearly():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'gsm_nope'"):
        maths.make_set("gsm_nope")
    with pytest.raises(ValueError, match="not a number"):
        maths.make_set("word_sorting", size=3)
    with pytest.raises(ValueError, match="refuses config"):
        maths.make_set("basic_arithmetic", size=3, config={"no_such_key": 1})
    with pytest.raises(ValueError, match="size=0"):
        maths.make_set("gsm_symbolic", size=0)


def test_through_the_real_scorer_generations_are_what_generate_many_gives():
    """The plumbing against kiln's Scorer (the evalkit model): prompts, stop strings and budget reach it."""
    import evalkit
    from kiln.eval.scoring import Scorer

    tok = evalkit.tokenizer()
    scorer = Scorer(evalkit.model(tok.vocab_size, max_seq_len=512), tok, batch_size=4)
    res = maths.evaluate_maths(scorer, size=3, k=1, max_new_tokens=6)
    items = maths.make_set(size=3).items
    shots = maths.pick_shots(maths.DEFAULT_TASK, 1, maths.SHOT_SEED_OFFSET, None, {it.question for it in items})
    direct = scorer.generate_many([maths.base_prompt(it, shots) for it in items], 6, stop=maths.STOP)
    assert [r["generation"] for r in res.per_item] == [d[0] for d in direct]
    assert res.exact_match == sum(r["correct"] for r in res.per_item) / 3
