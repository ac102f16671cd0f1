"""BIG-bench JSON tasks: BIG-bench's prompt, multiple_choice_grade by the evalkit model, exact_str_match, bad files."""

import json

import pytest

import evalkit
from kiln.eval import bigbench
from kiln.eval.scoring import Scorer

CAPITALS = {"Paris": 0, "London": 1, "Rome": 0, "Oslo": 0}
TASK = {
    "name": "tiny_mixed", "description": "capitals and sums", "keywords": ["test"],
    "metrics": ["multiple_choice_grade", "exact_str_match", "bleu"], "preferred_score": "multiple_choice_grade",
    "task_prefix": "Answer the questions.\n", "example_input_prefix": "\nQuestion: ",
    "example_output_prefix": "\nAnswer: ", "choice_prefix": "\n - ", "few_shot_example_separator": "\n\n",
    "examples": [
        {"input": "What is the capital of England?", "target_scores": CAPITALS},
        {"input": "What is 2 + 2?", "target_scores": {"two": 0, "three": 0, "four": 1, "five": 0}},
        {"input": "Which is a city?", "target_scores": {"Paris": 1, "London": 0.5, "blue": 0}},
        {"input": "What is the capital of France?", "target": "Paris"},
        {"input": "What is 3 + 1?", "target": ["4", "four"]},
        {"input": "What is the capital of Italy?", "target": "Rome"},
        {"input": "What is the capital of France?", "target": "Paris"},          # a duplicate: dropped
    ],
}
REPLIES = {"What is the capital of France?": " Paris. It is large", "What is 3 + 1?": "four!",
           "What is the capital of Italy?": " rome", "What is the capital of England?": "London",
           "What is 2 + 2?": "4", "Which is a city?": "Paris\nbecause"}


class Generating:
    """The evalkit scorer's log-likelihoods, fixed generations (found by the example's input)."""

    chat = False

    def __init__(self, scorer):
        self.scorer, self.calls = scorer, []

    def loglikelihood(self, pairs):
        return self.scorer.loglikelihood(pairs)

    def generate_many(self, prompts, max_new_tokens, stop=(), temperature=0.0, top_p=1.0, n=1, seed=0):
        self.calls.append({"prompts": list(prompts), "stop": tuple(stop), "max_new_tokens": max_new_tokens})
        out = []
        for p in prompts:
            q = max((q for q in REPLIES if q in p), key=p.rfind)   # the last question in the prompt
            out.append([REPLIES[q]] * n)
        return out


@pytest.fixture(scope="module")
def scorer():
    tok = evalkit.tokenizer()
    return Scorer(evalkit.model(tok.vocab_size, max_seq_len=256), tok, batch_size=4)


def write(tmp_path, data, name="task.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_prompt_is_big_bench_default_format(tmp_path):
    task = bigbench.load_task(write(tmp_path, {"examples": TASK["examples"][:2] + TASK["examples"][3:4]}))
    # BIG-bench's defaults; choices in numpy RandomState(42)'s permutation of the sorted texts
    assert bigbench.prompt(task, task.examples[0], [], 42) == (
        "\nQ: What is the capital of England?\n  choice: Oslo\n  choice: Rome\n  choice: London\n  choice: Paris\nA: ")
    assert bigbench.prompt(task, task.examples[2], [], 42) == "\nQ: What is the capital of France?\nA: "
    assert task.metrics == ["multiple_choice_grade", "exact_str_match"]   # inferred from the examples
    assert task.name == tmp_path.name


def test_multiple_choice_predictions_are_the_argmax_of_the_scorer(tmp_path, scorer):
    res = bigbench.evaluate_bigbench(Generating(scorer), write(tmp_path, TASK))
    assert res.n == 6 and res.duplicates == 1 and res.unsupported_metrics == ["bleu"]
    assert res.counts == {"multiple_choice_grade": 3, "exact_str_match": 6}
    grades = []
    for ex in TASK["examples"][:3]:
        ts = ex["target_scores"]
        order = {"Which is a city?": ["London", "Paris", "blue"],
                 "What is 2 + 2?": ["four", "two", "five", "three"],
                 "What is the capital of England?": ["Oslo", "Rome", "London", "Paris"]}[ex["input"]]
        ctx = f"Answer the questions.\n\nQuestion: {ex['input']}\n - " + "\n - ".join(order) + "\nAnswer: "
        lps = [s.logprob for s in scorer.loglikelihood([(ctx, c) for c in ts])]
        best = max(range(len(lps)), key=lps.__getitem__)
        item = next(r for r in res.per_item if r["prompt"] == ctx)
        assert item["pred"] == best and item["logprobs"] == pytest.approx(lps, abs=1e-5)
        grades.append(ts[list(ts)[best]])
    assert res.metrics["multiple_choice_grade"] == pytest.approx(sum(grades) / 3)
    assert res.score == res.metrics["multiple_choice_grade"] and res.preferred_score == "multiple_choice_grade"


def test_exact_str_match_postprocesses_like_big_bench(tmp_path, scorer):
    gen = Generating(scorer)
    res = bigbench.evaluate_bigbench(gen, write(tmp_path, TASK), max_new_tokens=20)
    by_input = {r["prompt"].rsplit("\nQuestion: ", 1)[1].split("\n")[0]: r for r in res.per_item}
    # default regex: up to the first sentence or line end; stripped; case matters; any listed target counts
    expect = {"What is the capital of France?": ("Paris", True), "What is 3 + 1?": ("four", True),
              "What is the capital of Italy?": ("rome", False),
              "What is the capital of England?": ("London", True),     # target from target_scores' best
              "What is 2 + 2?": ("4", False), "Which is a city?": ("Paris", True)}
    for q, (response, match) in expect.items():
        assert (by_input[q]["response"], by_input[q]["match"]) == (response, match), q
    assert res.metrics["exact_str_match"] == pytest.approx(4 / 6)
    assert gen.calls[0]["stop"] == ("\n\n\nQuestion: ",) and gen.calls[0]["max_new_tokens"] == 20
    row = res.summary()
    assert row["benchmark"] == "bigbench/tiny_mixed" and row["exact_str_match"] == res.metrics["exact_str_match"]
    assert "per_item" not in row and row["shots"] == 0


def test_stop_string_and_output_regex_of_the_task(tmp_path, scorer):
    data = {"metrics": ["exact_str_match"], "stop_string": ".", "output_regex": r"[A-Z]\w+\.",
            "examples": [{"input": "What is the capital of France?", "target": "Paris."},
                         {"input": "What is 3 + 1?", "target": "four"}]}
    res = bigbench.evaluate_bigbench(Generating(scorer), write(tmp_path, data))
    assert [r["response"] for r in res.per_item] == ["Paris.", ""] and res.score == 0.5
    assert bigbench.postprocess("ab. cd. ef", ".", None) == "ab."   # the stop string is kept, as in BIG-bench


def test_shots_are_other_examples_of_the_same_kind(tmp_path, scorer):
    path = write(tmp_path, TASK)
    task = bigbench.load_task(path)
    shots = bigbench.pick_shots(task, 1, 42)
    for ex, s in zip(task.examples, shots):
        assert s[0]["input"] != ex["input"] and ("target_scores" in s[0]) == ("target_scores" in ex)
    assert shots == bigbench.pick_shots(task, 1, 42)
    res = bigbench.evaluate_bigbench(Generating(scorer), path, k=1)
    for ex, s, r in zip(task.examples, shots, res.per_item):
        shot_text = bigbench.example_input(task, s[0], 42) + bigbench.shot_answer(s[0])
        assert r["prompt"] == "Answer the questions.\n" + shot_text + "\n\n" + bigbench.example_input(task, ex, 42)
    assert res.shots == 1
    with pytest.raises(ValueError, match=r"examples\[0\]: 3 shots need 3 other examples"):
        bigbench.evaluate_bigbench(Generating(scorer), path, k=3)


def test_a_directory_holding_task_json_is_accepted(tmp_path):
    write(tmp_path, TASK)
    assert bigbench.load_task(tmp_path).name == "tiny_mixed"
    sub = tmp_path / "parent"
    (sub / "part_one").mkdir(parents=True)
    write(sub / "part_one", TASK)
    write(sub, {"name": "parent", "metrics": ["multiple_choice_grade"], "subtasks": []})
    with pytest.raises(ValueError, match="subtasks.*part_one"):
        bigbench.load_task(sub)


@pytest.mark.parametrize("data, message", [
    ("{\"examples\": [\n  {\"input\": \"x\",}\n]}", r"task.json:2:\d+: invalid JSON"),
    ([1, 2], "top level: a JSON object is needed"),
    ({"metrics": ["bleu"]}, "examples: missing"),
    ({"examples": []}, "examples: must be a non-empty list"),
    ({"examples": [{"input": "a", "target": "b"}, "oops"]}, r"examples\[1\]: must be an object"),
    ({"examples": [{"input": "a", "target": "b"}, {"target": "c"}]}, r"examples\[1\]\.input: missing"),
    ({"examples": [{"input": 3, "target": "b"}]}, r"examples\[0\]\.input: must be a string"),
    ({"examples": [{"input": "a", "target": "b"}, {"input": "c"}]}, r"examples\[1\]: has neither"),
    ({"examples": [{"input": "a", "target_scores": {"x": 1}}]}, r"examples\[0\]\.target_scores: must map at least 2"),
    ({"examples": [{"input": "a", "target_scores": {"x": 1, "y": "high"}}]},
     r"examples\[0\]\.target_scores\['y'\]: score must be a number"),
    ({"examples": [{"input": "a", "target": ["b", 3]}]}, r"examples\[0\]\.target: must be a string or a non-empty"),
    ({"examples": [{"input": "a", "target": []}]}, r"examples\[0\]\.target: must be a string or a non-empty list"),
    ({"metrics": ["multiple_choice_grade"], "examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}},
                                                          {"input": "b", "target": "c"}]},
     r"examples\[1\]\.target_scores: missing"),
    ({"metrics": ["bleu", "rouge"], "examples": [{"input": "a", "target": "b"}]}, "metrics: .* names none"),
    ({"metrics": "exact_str_match", "examples": [{"input": "a", "target": "b"}]}, "metrics: must be a list"),
    ({"example_input_prefix": 3, "examples": [{"input": "a", "target": "b"}]}, "example_input_prefix: must be a str"),
    ({"append_choices_to_input": "yes", "examples": [{"input": "a", "target": "b"}]}, "append_choices_to_input"),
    ({"output_regex": "([a-", "examples": [{"input": "a", "target": "b"}]}, "output_regex: invalid regular"),
    ({"output_regex": "(a)(b)", "examples": [{"input": "a", "target": "b"}]}, "output_regex: has 2 groups"),
])
def test_malformed_tasks_name_the_file_and_the_example(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as e:
        bigbench.load_task(path)
    assert str(path) in str(e.value)


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        bigbench.load_task(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="a directory without a task.json"):
        bigbench.load_task(tmp_path)
    (tmp_path / "task.json").write_bytes(b'{"examples": [{"input": "\xff", "target": "b"}]}')
    with pytest.raises(ValueError, match=r"task.json: not UTF-8 \(byte 25\)"):
        bigbench.load_task(tmp_path)
