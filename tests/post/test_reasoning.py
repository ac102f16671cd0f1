"""reasoning-gym tasks and the think-then-answer format: answer extraction, the format check, worked answers
scored by reasoning-gym's own verifiers, and user tasks from a file."""

from __future__ import annotations

import textwrap

import pytest

from kiln.post.reasoning import (SYSTEM_PROMPT, TaskItem, extract_answer, format_answer, format_ok, load_function,
                                 make_task, worked_answer)


@pytest.mark.parametrize("text, answer", [
    ("<think>2+2</think>\n<answer> 4 </answer>", "4"),
    ("<answer>1</answer> no, wait <answer>2</answer>", "2"),                     # the last closed one
    ("<think>x</think><answer>\nmulti\nline\n</answer>", "multi\nline"),
    ("<think>long</think>\n<answer>12 apples, cut off", "12 apples, cut off"),   # cut by max_new_tokens
    ("<answer>1</answer> then <answer>3 and", "1"),                                # a closed one wins
    ("The total is 1,234,567 dollars, or about 1.2e6", "6"),                      # last number...
    ("so x = -3.5", "-3.5"),
    ("we get 1,234,567 in all", "1234567"),                                       # ...thousands commas removed
    ("no digits here\nthe answer is yes\n\n", "the answer is yes"),               # last non-empty line
    ("", ""),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, ok", [
    ("<think>\nstep\n</think>\n<answer>4</answer>", True),
    ("  <think></think><answer>4</answer>\n", True),                   # empty reasoning, whitespace around
    ("<answer>4</answer>", False),                                     # no think
    ("<think>a</think>\n<answer>4</answer> and more", False),          # text after
    ("intro <think>a</think><answer>4</answer>", False),               # text before
    ("<think>a</think><answer> </answer>", False),                     # empty answer
    ("<think>a</think><answer>4</answer><answer>5</answer>", False),   # two answers
    ("<think>a <think> b</think><answer>4</answer>", False),
    ("<think>a</think>\n<answer>4", False),                            # cut off
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_system_prompt_and_format_answer_agree():
    assert all(tag in SYSTEM_PROMPT for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    assert format_ok(format_answer("because", "7")) and format_ok(format_answer("", "7"))
    assert extract_answer(format_answer("2 + 5 = 7, not 8", " 7 ")) == "7"


def test_basic_arithmetic_worked_answers_score_one():
    task = make_task("basic_arithmetic", {}, seed=3, size=20)
    assert len(task.items) == 20 and task.name == "basic_arithmetic"
    for item in task.items:
        target = worked_answer(item)
        assert format_ok(target)
        expression = item.raw["metadata"]["expression"]
        assert target == f"<think>\n{expression} = {item.answer}\n</think>\n<answer>{item.answer}</answer>"
        assert task.score(target, item) == 1.0
        assert task.score(f"<think>hmm</think><answer>{int(item.answer) + 1}</answer>", item) == 0.0
        assert task.score(f"I think it is {item.answer}", item) == 1.0   # no format: the last number
    assert task.score("<answer>not a number at all</answer>", task.items[0]) == 0.0


def test_items_depend_on_seed_only():
    a, b = make_task("chain_sum", {}, 0, 10), make_task("chain_sum", {}, 0, 10)
    c = make_task("chain_sum", {}, 1, 10)
    assert [i.question for i in a.items] == [i.question for i in b.items]
    assert [i.question for i in a.items] != [i.question for i in c.items]


def test_task_config_reaches_reasoning_gym():
    task = make_task("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, 0, 10)
    assert all(item.raw["metadata"]["num_terms"] == 2 for item in task.items)


def test_worked_answer_uses_the_worked_solution():
    task = make_task("gsm_symbolic", {}, 0, 3)
    for item in task.items:
        target = worked_answer(item)
        cot = item.raw["metadata"]["answer_cot"]
        assert format_ok(target) and "####" not in target and cot.split("\n")[0] in target
        assert task.score(target, item) == 1.0
    # no reasoning in the metadata: an empty think block, never invented text
    legs = make_task("leg_counting", {}, 0, 2).items[0]
    assert worked_answer(legs) == f"<think>\n</think>\n<answer>{legs.answer}</answer>"
    assert worked_answer(TaskItem("q", "42", {"question": "q", "answer": "42"})).endswith("<answer>42</answer>")


def test_reasoning_gym_errors():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'basic_arithmetc'.*basic_arithmetic"):
        make_task("basic_arithmetc", {}, 0, 5)
    with pytest.raises(ValueError, match="refuses config.*no_such_key"):
        make_task("basic_arithmetic", {"no_such_key": 1}, 0, 5)
    with pytest.raises(ValueError, match="size=0"):
        make_task("basic_arithmetic", {}, 0, 0)


def test_user_task_from_a_file(tmp_path):
    path = tmp_path / "my_tasks.py"
    path.write_text(textwrap.dedent("""
        def capitals(n=4):
            pairs = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Chad", "N'Djamena")]
            return [{"question": f"Capital of {c}?", "answer": a} for c, a in pairs[:n]]

        def broken():
            return [{"question": "no answer"}]

        def empty():
            return []
    """))
    task = make_task(f"{path}:capitals", {"n": 4}, seed=0, size=10)
    assert [i.answer for i in task.items] == ["Paris", "Tokyo", "Lima", "N'Djamena"]
    paris = task.items[0]
    assert task.score("<think>easy</think><answer>Paris</answer>", paris) == 1.0
    assert task.score("<think>easy</think><answer>  Paris \n</answer>", paris) == 1.0   # whitespace only
    assert task.score("<think>easy</think><answer>paris</answer>", paris) == 0.0      # exact match otherwise
    assert task.score("<answer>Lyon</answer>", paris) == 0.0
    assert worked_answer(paris) == "<think>\n</think>\n<answer>Paris</answer>"
    some = make_task(f"{path}:capitals", {}, seed=5, size=2)   # a sample chosen by the seed
    assert len(some.items) == 2 and {i.answer for i in some.items} <= {"Paris", "Tokyo", "Lima", "N'Djamena"}
    assert [i.answer for i in some.items] == [i.answer for i in make_task(f"{path}:capitals", {}, 5, 2).items]
    with pytest.raises(ValueError, match="item 0 .* needs \"question\" and \"answer\""):
        make_task(f"{path}:broken", {}, 0, 5)
    with pytest.raises(ValueError, match="non-empty list"):
        make_task(f"{path}:empty", {}, 0, 5)
    with pytest.raises(ValueError, match="has no function 'nope'.*capitals"):
        make_task(f"{path}:nope", {}, 0, 5)
    with pytest.raises(ValueError, match="does not exist"):
        make_task(f"{tmp_path / 'missing.py'}:capitals", {}, 0, 5)
    with pytest.raises(ValueError, match="calling it with config"):
        make_task(f"{path}:capitals", {"m": 1}, 0, 5)


def test_load_function_by_module():
    assert load_function("json:dumps")([1]) == "[1]"
    with pytest.raises(ValueError, match="cannot import"):
        load_function("no_such_module_x:f")
    with pytest.raises(ValueError, match="path.py:function"):
        load_function("nocolon")
