"""Prompt suites: the YAML forms users write, the errors they get, spacing of checkpoints, side-by-side rows."""

import re

import pytest

from kiln.eval.suites import answer_suites, load_suite, side_by_side, spaced


def test_groups_plain_lists_and_per_prompt_budgets(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("in_domain: ['a', {prompt: 'b', max_new_tokens: 3}]\nout_of_domain: ['c']\n")
    assert load_suite(f) == {"in_domain": [{"prompt": "a", "max_new_tokens": None}, {"prompt": "b", "max_new_tokens": 3}],
                             "out_of_domain": [{"prompt": "c", "max_new_tokens": None}]}
    g = tmp_path / "plain.yaml"
    g.write_text("- x\n- y\n")
    assert list(load_suite(g)) == ["prompts"]


@pytest.mark.parametrize("text, message", [
    ("in_domain: 'not a list'", "`in_domain` must be a list"),
    ("in_domain: [{max_new_tokens: 3}]", "in_domain[0] must be a non-empty string"),
    ("in_domain: [{prompt: x, max_new_tokens: 0}]", "in_domain[0].max_new_tokens must be a positive integer"),
    ("in_domain: [''] ", "in_domain[0]"),
    ("in_domain: [a\n  b: : c", "not valid YAML"),
    ("42", "expected `in_domain:`"),
])
def test_bad_suites_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_suite(f)
    assert str(f) in str(e.value)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_suite(tmp_path / "nope.yaml")
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"in_domain: ['caf\xe9']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_suite(f)


def test_spaced_keeps_the_last_and_spreads_the_rest():
    assert spaced([1, 2, 3], 5) == [1, 2, 3]
    assert spaced(list(range(10)), 3) == [0, 4, 9] or spaced(list(range(10)), 3) == [0, 5, 9]
    assert spaced(list(range(10)), 1) == [9]


def test_answers_are_grouped_by_budget_and_laid_side_by_side():
    suites = {"s": {"g": [{"prompt": "a", "max_new_tokens": None}, {"prompt": "b", "max_new_tokens": 2},
                          {"prompt": "c", "max_new_tokens": None}]}}
    calls = []

    def gen(prompts, budget):
        calls.append((tuple(prompts), budget))
        return [f"{p}{budget}" for p in prompts]

    answers = answer_suites(suites, gen, 7)
    assert answers == {"s": {"g": ["a7", "b2", "c7"]}} and sorted(calls) == [(("a", "c"), 7), (("b",), 2)]
    rows = side_by_side(suites, {"step_1": answers, "step_2": {"s": {"g": ["x", "y", "z"]}}})
    assert rows[1] == {"suite": "s", "group": "g", "prompt": "b", "answers": {"step_1": "b2", "step_2": "y"}}
